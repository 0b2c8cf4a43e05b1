"""Model loading: ``zoo:NAME``, a local checkpoint directory, or a Hugging Face hub id.

Public API
----------
``load_model(path, *, dtype="bfloat16", device="cpu", allow_pickle=False, trust_remote_code=False)``
    -> ``(model, tokenizer)``; the tokenizer is ``None`` (with a warning) when the
    checkpoint directory has no tokenizer files.
``preflight_model(path, *, dtype=..., device=..., allow_pickle=..., trust_remote_code=...)``
    -> ``ModelSource``: every check ``load_model`` makes, without reading weights
    (the pipeline runs it before any heavy work).
``zoo_path(name)`` -> ``pathlib.Path`` of a bundled checkpoint (``attnres_quant/zoo/NAME``).
``zoo_names()`` -> the bundled checkpoint names.
``describe_model(model)`` -> ``dict`` (family, block size, parameter count, dtype, ...).

Safety defaults (SPEC section 7): weights are read from safetensors only; a
pickle checkpoint (``pytorch_model.bin``) needs ``allow_pickle=True`` and a
checkpoint that ships its own modelling code (``auto_map`` in config.json)
needs ``trust_remote_code=True``.  Every refusal is a ``UserError`` raised
before any weight is read.

Families
--------
* ``model_type: attnres`` (ours) and ``model_type: transformer``
  (flash-linear-attention's ``TransformerConfig``, same field and parameter
  names) load into the reference implementation ``attnres_quant.model``.
* Llama-family causal LMs (``llama``, ``qwen2``, ``qwen3``, ``mistral``) load
  through transformers as standard-residual comparators.
* Families of the architecture registry (``attnres_quant.architectures``): Kimi-Linear /
  Kimi K3 (``model_type`` ``kimi_linear`` / ``kimi_k3``) load into attnres_quant's own Kimi
  model (never the checkpoint's remote code); their tokenizer comes from a ``tokenizer``
  directory, the checkpoint's own files, or Moonshot's tiktoken tokenizer with
  ``trust_remote_code`` (``architectures.kimi.tokenizer_status``).
* Any other causal LM that transformers knows loads with a warning (untested).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
ZOO_PREFIX = "zoo:"

ATTNRES_MODEL_TYPES = ("attnres", "transformer")
LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral")

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "vocab.txt")
# Small files fetched from the hub by the preflight (no weights).
_HUB_META_PATTERNS = ["config.json", "generation_config.json", "*.index.json", "tokenizer*", "vocab*",
                      "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model",
                      "chat_template*", "*.tiktoken"]

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32", "auto": "auto"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Keys transformers may report as unexpected that carry no weights (old Llama checkpoints).
_BENIGN_UNEXPECTED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class LoadingWarning(UserWarning):
    """A checkpoint loads, but with something the user should know."""


@dataclass
class ModelSource:
    """What the preflight found out about a model path (no weights read)."""

    spec: str                    # the path as given
    kind: str                    # "zoo" | "local" | "hub"
    directory: Path | None       # local directory (for hub: the snapshot of config/tokenizer files)
    model_type: str
    family: str                  # attnres-block | attnres-full | standard | llama | qwen2 | ...
    block_size: int | None
    weights_format: str          # "safetensors" | "pickle"
    weight_files: list[str]
    has_tokenizer: bool
    dtype: str
    device: str
    config: dict[str, Any] = field(repr=False, default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    hub_id: str | None = None
    tokenizer: str | None = None  # explicit tokenizer directory (registry families)

    @property
    def is_attnres_reference(self) -> bool:
        return self.model_type in ATTNRES_MODEL_TYPES


# --------------------------------------------------------------------------- zoo
def zoo_names() -> list[str]:
    """Bundled checkpoint names (directories of ``attnres_quant/zoo`` holding a config.json)."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if p.is_dir() and (p / "config.json").is_file())


def zoo_path(name: str) -> Path:
    """Directory of the bundled checkpoint ``name`` (``tiny-block``, ``tiny-standard``, ...)."""
    name = name[len(ZOO_PREFIX):] if name.startswith(ZOO_PREFIX) else name
    path = ZOO_DIR / name
    if name and "/" not in name and (path / "config.json").is_file():
        return path
    available = zoo_names()
    listed = ", ".join(f"zoo:{n}" for n in available) if available else "none are installed yet"
    raise UserError(
        f"No bundled checkpoint named {name!r}",
        where=f"model path 'zoo:{name}' (looked in {ZOO_DIR})",
        fix=f"use one of the bundled checkpoints ({listed}), a local checkpoint directory or a hub id"
            + ("" if available else "; the tiny models are produced by `python -m attnres_quant train "
                                     "configs/train/<name>.yaml`"),
    )


# --------------------------------------------------------------------------- helpers
def _normalise_dtype(dtype: Any) -> str:
    import torch

    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype).lower()
    if name not in DTYPES:
        raise UserError(f"Unknown model dtype {dtype!r}", where="model dtype",
                        fix="use one of bfloat16, float16, float32 or auto (the checkpoint's own dtype)")
    return DTYPES[name]


def _check_device(device: Any) -> str:
    import torch

    name = str(device)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"Unknown device {name!r} ({exc})", where="model device",
                        fix="use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"Device {name!r} was requested but no CUDA device is available",
                            where="model device", fix="use device: cpu on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"Device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)",
                            where="model device", fix="pick an existing CUDA device index")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise UserError(f"Unsupported device {name!r}", where="model device", fix="use cpu or cuda")
    return name


def _hub_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        return False


def _looks_like_local_path(spec: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that does not exist is a missing directory."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def _read_json(path: Path, where: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path.name} is not valid JSON ({exc})", where=where,
                        fix="repair or re-export the checkpoint's config") from None
    if not isinstance(data, dict):
        raise UserError(f"{path.name} does not hold a JSON object", where=where,
                        fix="repair or re-export the checkpoint's config")
    return data


def _weights(files: set[str], where: str, allow_pickle: bool) -> tuple[str, list[str], list[str]]:
    """(format, weight files, warnings) for a checkpoint's file names."""
    notes: list[str] = []
    safetensors = sorted(f for f in files if f == "model.safetensors" or re.fullmatch(r"model-.*\.safetensors", f))
    if "model.safetensors.index.json" in files or safetensors:
        return "safetensors", (["model.safetensors.index.json"] if "model.safetensors.index.json" in files
                               else safetensors), notes
    pickles = sorted(f for f in files if f in PICKLE_FILES or re.fullmatch(r"pytorch_model-.*\.bin", f))
    if pickles:
        if not allow_pickle:
            raise UserError(
                "The checkpoint has only pickle weights (pytorch_model.bin) and loading pickle files can run "
                "arbitrary code, so it is refused by default",
                where=where,
                fix="convert it to safetensors, or set `allow_pickle: true` on the model's entry (`model:` or "
                    "`models:`) in the study config (load_model(..., allow_pickle=True)) if you trust its origin")
        notes.append(f"{where}: loading pickle weights ({', '.join(pickles)}) because allow_pickle is set; "
                     "only do this for checkpoints you trust")
        return "pickle", pickles, notes
    raise UserError("The checkpoint has no weight files (model.safetensors or model.safetensors.index.json)",
                    where=where, fix="point the model path at a complete checkpoint directory")


def _registry_family(config: dict):
    """The architecture-registry family of a config.json dict (Kimi ...), or None."""
    from .architectures import family_for_config

    return family_for_config(config)


def _check_config(config: dict, where: str, trust_remote_code: bool) -> tuple[str, str, int | None, list[str]]:
    """(model_type, family, block size, warnings) from a config.json dict."""
    fam = _registry_family(config)
    if fam is not None:  # our own modelling code: the checkpoint's auto_map is never run
        return fam.check_config(config, where)
    notes: list[str] = []
    if config.get("auto_map"):
        if not trust_remote_code:
            raise UserError(
                "The checkpoint ships its own modelling code (`auto_map` in config.json); running remote code "
                "is refused by default",
                where=where,
                fix="set `trust_remote_code: true` on the model's entry (`model:` or `models:`) in the study config "
                    "(load_model(..., trust_remote_code=True)) only if you trust the code in that checkpoint")
        notes.append(f"{where}: running the checkpoint's own modelling code because trust_remote_code is set")
    model_type = config.get("model_type")
    if not model_type:
        raise UserError("config.json has no `model_type`", where=where,
                        fix="use a transformers-format checkpoint (config.json with model_type)")
    block = None
    if model_type in ATTNRES_MODEL_TYPES:
        block = config.get("attnres_block_size")
        if block is not None and (not isinstance(block, int) or isinstance(block, bool)
                                  or not (block == 1 or (block >= 2 and block % 2 == 0))):
            raise UserError(f"attnres_block_size must be null, 1 or an even integer; got {block!r}",
                            where=f"{where} (config.json)", fix="fix attnres_block_size in config.json")
        unsupported = []
        if config.get("qk_norm"):
            unsupported.append("qk_norm=true (query/key RMSNorm)")
        if config.get("window_size") is not None:
            unsupported.append(f"window_size={config['window_size']} (sliding-window attention)")
        if config.get("elementwise_affine") is False:
            unsupported.append("elementwise_affine=false (weightless norms)")
        if "rope_theta" in config and config["rope_theta"] is None:
            unsupported.append("rope_theta=null (attention without RoPE)")
        if config.get("hidden_act", "swish") not in ("swish", "silu"):
            unsupported.append(f"hidden_act={config['hidden_act']!r}")
        if unsupported:
            raise UserError(
                "The reference AttnRes model does not implement " + ", ".join(unsupported),
                where=f"{where} (config.json)",
                fix="use a checkpoint without these options, or run it with flash-linear-attention itself")
        family = "standard" if block is None else ("attnres-full" if block == 1 else "attnres-block")
        return model_type, family, block, notes
    if not config.get("auto_map"):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            raise UserError(f"Unknown model_type {model_type!r}", where=f"{where} (config.json)",
                            fix="use an AttnRes/FLA checkpoint (model_type attnres or transformer) or a "
                                "transformers causal LM such as llama, qwen2, qwen3 or mistral")
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise UserError(f"model_type {model_type!r} is not a causal language model", where=f"{where}",
                            fix="use a decoder-only causal LM checkpoint")
        if model_type not in LLAMA_FAMILY:
            notes.append(f"{where}: model_type {model_type!r} is not one of the tested families "
                         f"({', '.join(ATTNRES_MODEL_TYPES + LLAMA_FAMILY)}); loading it through transformers "
                         "as a standard-residual model, and precision-policy components may not all resolve")
    return model_type, model_type, None, notes


def _has_tokenizer(files: set[str]) -> bool:
    return any(f in files for f in TOKENIZER_FILES)


def _hub_snapshot(repo_id: str, patterns: list[str] | None, where: str) -> Path:
    """Download (or find in the cache) the given files of a hub repo; clear errors offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise UserError("huggingface_hub is not installed", where=where, fix="pip install huggingface_hub") from None
    offline = _hub_offline()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear message
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        if isinstance(exc, GatedRepoError):
            raise UserError(f"Hub repository {repo_id!r} is gated", where=where,
                            fix="accept its licence on huggingface.co and log in (huggingface-cli login)") from None
        if isinstance(exc, RepositoryNotFoundError):
            raise UserError(f"No hub repository {repo_id!r} (or it is private)", where=where,
                            fix="check the id, or log in if it is private; a local directory path must exist") \
                from None
        if offline:
            raise UserError(
                f"{repo_id!r} is not a local directory or zoo name, and the Hugging Face hub is offline "
                "(HF_HUB_OFFLINE=1) with no cached copy",
                where=where,
                fix="download it on a machine with network (`huggingface-cli download "
                    f"{repo_id} --local-dir DIR`) and point the model path at DIR, or unset HF_HUB_OFFLINE") \
                from None
        raise UserError(
            f"Could not reach the Hugging Face hub for {repo_id!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})",
            where=where,
            fix=f"check the network, or download it elsewhere (`huggingface-cli download {repo_id} "
                "--local-dir DIR`) and point the model path at DIR") from None


def _hub_files(repo_id: str, snapshot: Path, where: str) -> set[str]:
    """File names of a hub repo (from the API when online, else from the cached snapshot)."""
    files = {p.name for p in snapshot.iterdir()}
    if _hub_offline():
        # Weights of a cached snapshot are visible only if they were downloaded.
        return files
    try:
        from huggingface_hub import HfApi

        return files | {f for f in HfApi().list_repo_files(repo_id) if "/" not in f}
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"Could not list the files of hub repository {repo_id!r} ({type(exc).__name__})",
                        where=where, fix="check the network or use a local directory") from None


# --------------------------------------------------------------------------- preflight
def _resolve(spec: str) -> tuple[str, Path, str, str | None]:
    """(kind, local directory with at least config.json, where-text, hub id) for a model path."""
    hub_id = None
    if spec.startswith(ZOO_PREFIX):
        kind, directory = "zoo", zoo_path(spec[len(ZOO_PREFIX):])
        where = f"model path {spec!r} ({directory})"
    else:
        local = Path(os.path.expanduser(spec))
        if local.exists():
            if not local.is_dir():
                raise UserError(f"{spec!r} is a file, not a checkpoint directory", where="model path",
                                fix="point at the directory holding config.json and the weights")
            kind, directory, where = "local", local.resolve(), f"model path {spec!r}"
        elif _looks_like_local_path(spec) or not _HUB_ID.match(spec):
            raise UserError(f"Checkpoint directory {spec!r} does not exist", where="model path",
                            fix="check the path (relative paths are resolved from the current directory "
                                f"{os.getcwd()}), or use zoo:NAME (available: "
                                f"{', '.join(zoo_names()) or 'none installed'})")
        else:
            kind, hub_id, where = "hub", spec, f"model path {spec!r} (Hugging Face hub id)"
            directory = _hub_snapshot(spec, _HUB_META_PATTERNS, where)
    return kind, directory, where, hub_id


def preflight_model(path: str, *, dtype: Any = "bfloat16", device: Any = "cpu", allow_pickle: bool = False,
                    trust_remote_code: bool = False, tokenizer: str | None = None) -> ModelSource:
    """Check a model path without reading weights; raise ``UserError`` on anything ``load_model`` would refuse.

    For a hub id this downloads (or finds cached) only config and tokenizer files.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise UserError("The model path is empty", where="model path",
                        fix="give zoo:NAME, a local checkpoint directory or a hub id")
    spec = str(path).strip()
    dtype_name = _normalise_dtype(dtype)
    device_name = _check_device(device)
    kind, directory, where, hub_id = _resolve(spec)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError("The checkpoint has no config.json", where=where,
                        fix="point at a transformers-format checkpoint directory (config.json + weights)")
    config = _read_json(config_file, where)
    model_type, family, block, notes = _check_config(config, where, trust_remote_code)
    files = _hub_files(hub_id, directory, where) if hub_id else {p.name for p in directory.iterdir()}
    if hub_id and _hub_offline() and not any(f.endswith((".safetensors", ".bin", ".index.json")) for f in files):
        raise UserError(f"The hub is offline (HF_HUB_OFFLINE=1) and the local cache has the config of {hub_id!r} "
                        "but not its weights", where=where,
                        fix=f"download it on a machine with network (`huggingface-cli download {hub_id} "
                            "--local-dir DIR`) and point the model path at DIR, or unset HF_HUB_OFFLINE")
    fmt, weight_files, wnotes = _weights(files, where, allow_pickle)
    notes += wnotes
    has_tok = _has_tokenizer(files)
    fam = _registry_family(config)
    if fam is not None:
        has_tok, tok_note = fam.tokenizer_status(directory, tokenizer, trust_remote_code)
        if tok_note:
            notes.append(tok_note)
    elif tokenizer:  # an explicit tokenizer directory replaces the checkpoint's files
        if not Path(os.path.expanduser(tokenizer)).is_dir():
            raise UserError(f"tokenizer directory {tokenizer!r} does not exist", where=where,
                            fix="point `tokenizer:` at a directory saved with transformers' save_pretrained")
        has_tok = True
    elif has_tok:
        tok_cfg = directory / "tokenizer_config.json"
        if tok_cfg.is_file() and _read_json(tok_cfg, where).get("auto_map") and not trust_remote_code:
            raise UserError("The checkpoint's tokenizer ships its own code (`auto_map` in tokenizer_config.json); "
                            "running remote code is refused by default", where=where,
                            fix="set `trust_remote_code: true` on the model's entry (`model:` or `models:`) in the "
                                "study config only if you trust that code")
    else:
        notes.append(f"{where}: no tokenizer files (tokenizer.json / tokenizer_config.json); the tokenizer is None "
                     "and evaluation tasks that need text cannot run")
    return ModelSource(spec=spec, kind=kind, directory=directory, model_type=model_type, family=family,
                       block_size=block, weights_format=fmt, weight_files=weight_files, has_tokenizer=has_tok,
                       dtype=dtype_name, device=device_name, config=config, warnings=notes, hub_id=hub_id,
                       tokenizer=tokenizer)


def structure_model(path: str, *, trust_remote_code: bool = False, dtype: Any = "bfloat16", **_ignored):
    """The model's module structure on the ``meta`` device: names, shapes and dtypes, no weights read.

    Used to resolve precision plans before any heavy work; the config is checked as by
    ``preflight_model`` (remote code refused without ``trust_remote_code``).  Extra keyword
    arguments (``allow_pickle``, ``device``) are accepted and ignored: no weight file is opened.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import model as _registers_attnres  # noqa: F401

    spec = str(path).strip()
    dtype_name = _normalise_dtype(dtype)
    _kind, directory, where, _hub = _resolve(spec)
    if not (directory / "config.json").is_file():
        raise UserError("The checkpoint has no config.json", where=where,
                        fix="point at a transformers-format checkpoint directory (config.json + weights)")
    raw = _read_json(directory / "config.json", where)
    _check_config(raw, where, trust_remote_code)
    fam = _registry_family(raw)
    if fam is not None:
        return fam.structure(raw, dtype_name)
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code, local_files_only=True)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code,
            dtype=None if dtype_name == "auto" else getattr(torch, dtype_name))
    return skeleton.eval()


# --------------------------------------------------------------------------- load
def checkpoint_dir(src: ModelSource, *, trust_remote_code: bool = False) -> Path:
    """Local directory holding the weights of a preflighted source (downloads them for a hub id)."""
    if src.kind != "hub":
        return src.directory
    weight_patterns = (["*.safetensors", "model.safetensors.index.json"] if src.weights_format == "safetensors"
                       else ["*.bin", "pytorch_model.bin.index.json"])
    extra = ["*.py"] if trust_remote_code else []
    return _hub_snapshot(src.hub_id, _HUB_META_PATTERNS + weight_patterns + extra,
                         f"model path {src.spec!r} (Hugging Face hub id)")


def load_model(path: str, *, dtype: Any = "bfloat16", device: Any = "cpu", allow_pickle: bool = False,
               trust_remote_code: bool = False, tokenizer: str | None = None):
    """Load ``(model, tokenizer)`` from ``zoo:NAME``, a local directory or a hub id (see module docstring).

    The model is in eval mode on ``device`` in ``dtype``.  Missing or mismatched weights are an error
    (a partly random model must never enter a study); so are unexpected weights for AttnRes checkpoints.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from . import model as _registers_attnres  # noqa: F401  (AutoConfig/AutoModel registration)

    src = preflight_model(path, dtype=dtype, device=device, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    for note in src.warnings:
        warnings.warn(note, LoadingWarning, stacklevel=2)
    directory = checkpoint_dir(src, trust_remote_code=trust_remote_code)
    where = f"model path {src.spec!r}"
    fam = _registry_family(src.config)
    if fam is not None:
        return _load_family(fam, src, directory, trust_remote_code)
    torch_dtype = "auto" if src.dtype == "auto" else getattr(torch, src.dtype)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weights_only.*")
            model, info = AutoModelForCausalLM.from_pretrained(
                str(directory), dtype=torch_dtype, use_safetensors=src.weights_format == "safetensors",
                trust_remote_code=trust_remote_code, local_files_only=True, output_loading_info=True,
                ignore_mismatched_sizes=True)  # reported below as a UserError naming the tensors
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise UserError(f"The checkpoint could not be loaded ({type(exc).__name__}: {detail[:400]})", where=where,
                        fix="check that the weights are complete and belong to config.json "
                            "(see docs/checkpoints.md)") from exc
    _check_loading_info(info, src, where)
    model = model.to(src.device).eval()
    tokenizer = None
    if src.has_tokenizer:
        from transformers import AutoTokenizer

        try:
            tok_dir = os.path.expanduser(src.tokenizer) if src.tokenizer else str(directory)
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code,
                                                      local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"The checkpoint's tokenizer files could not be loaded ({type(exc).__name__}: {exc})",
                            where=where, fix="repair the tokenizer files or re-save them with transformers") \
                from None
    model._attnres_source = src  # provenance for describe_model / reports
    return model, tokenizer


def _load_family(fam, src: ModelSource, directory: Path, trust_remote_code: bool):
    """Load a registry family's checkpoint (Kimi ...) with its own loader and tokenizer rule."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the loader's notes are kept on the model instead
        model, notes = fam.load(directory, dtype=src.dtype, device=src.device)
    tokenizer = fam.load_tokenizer(directory, src.tokenizer, trust_remote_code)
    model._attnres_source = src
    model._load_notes = list(notes)
    return model.eval(), tokenizer


def _check_loading_info(info: dict, src: ModelSource, where: str) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in (info.get("unexpected_keys") or []) if not _BENIGN_UNEXPECTED.search(k))
    mismatched = list(info.get("mismatched_keys") or [])
    problems = []
    if missing:
        problems.append(f"missing weights {_short(missing)}")
    if mismatched:
        names = [m[0] if isinstance(m, tuple) else m for m in mismatched]
        problems.append(f"weights of the wrong shape {_short(names)}")
    if unexpected and src.is_attnres_reference:
        problems.append(f"unexpected weights {_short(unexpected)} (parts the reference model does not implement)")
    if problems:
        raise UserError("The checkpoint does not match its config: " + "; ".join(problems), where=where,
                        fix="check that config.json belongs to these weights (FLA names: model.embeddings, "
                            "model.layers.N.attn.*, ...; see docs/checkpoints.md)")
    if unexpected:
        warnings.warn(f"{where}: ignored unexpected weights {_short(unexpected)}", LoadingWarning, stacklevel=3)


def _short(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# --------------------------------------------------------------------------- describe
def describe_model(model) -> dict:
    """Family, residual mode, sizes, parameter count and dtype of a loaded model."""
    from .architectures import family_for_model

    cfg = model.config
    model_type = getattr(cfg, "model_type", None) or type(model).__name__
    fam = family_for_model(model)
    block = getattr(cfg, "attnres_block_size", None) if model_type in ATTNRES_MODEL_TYPES or fam else None
    extra: dict = {}
    if fam is not None and getattr(fam, "describe", None) is not None:  # the family describes itself (mHC)
        src0 = getattr(model, "_attnres_source", None)
        model_type = src0.model_type if src0 is not None else model_type
        extra = fam.describe(model)
        family = extra.pop("family")
    elif fam is not None:  # Kimi: block size in sub-layers here, in decoder layers as attn_res_block_size
        src0 = getattr(model, "_attnres_source", None)
        model_type = src0.model_type if src0 is not None else model_type
        family = model_type + ("-attnres" if block else "")
        extra = {"attnres_block_size": block,  # in sub-layers (FLA's name; what the report reads)
                 "attn_res_block_size": getattr(cfg, "attn_res_block_size", None),
                 "num_experts": getattr(cfg, "num_experts", None),
                 "kda_layers": sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_kda_layer(i)),
                 "load_notes": list(getattr(model, "_load_notes", [])),
                 "as_shipped": dict(getattr(model, "_kimi_as_shipped", {}))}
    elif model_type in ATTNRES_MODEL_TYPES:
        family = "standard" if block is None else ("attnres-full" if block == 1 else "attnres-block")
    else:
        family = model_type
    params = {id(p): p for p in model.parameters()}  # tied weights once
    n_params = sum(p.numel() for p in params.values())
    first = next(iter(params.values()), None)
    n_layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_kv_heads", None) or getattr(cfg, "num_key_value_heads", None) or heads
    src = getattr(model, "_attnres_source", None)
    return {
        "family": family,
        "model_type": model_type,
        "architecture": type(model).__name__,
        "residual": "attnres" if block is not None else "standard",
        "block_size": block,
        "num_layers": n_layers,
        "num_sublayers": 2 * n_layers if isinstance(n_layers, int) else None,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_heads": heads,
        "num_kv_heads": kv,
        "vocab_size": getattr(cfg, "vocab_size", None),
        "parameters": int(n_params),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "source": src.spec if src is not None else getattr(cfg, "_name_or_path", None) or None,
        **extra,
    }


__all__ = ["load_model", "preflight_model", "structure_model", "zoo_path", "zoo_names", "describe_model",
           "checkpoint_dir", "ModelSource", "LoadingWarning", "ZOO_DIR"]
