"""Loading shared by the families that transformers builds (``reference``, ``llama``): the remote-code
rule, the tokenizer rule, the meta-device skeleton and ``AutoModelForCausalLM.from_pretrained`` with
every missing / mis-shaped weight an error; the tokenizer rule also serves ``mhc``.  Not a family itself (no
``FAMILY``)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from ..errors import UserError

# Keys transformers may report as unexpected that carry no weights (old Llama checkpoints).
_BENIGN_UNEXPECTED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def ships_our_code(config: dict) -> bool:
    """A self-describing checkpoint of ours: its auto_map names the code this package ships
    (``model.remote_code``); the package's own modelling code loads it, never the copy."""
    from ..model.remote_code import is_our_auto_map

    return is_our_auto_map(config)


def remote_code_allowed(config: dict, trust_remote_code: bool) -> bool:
    """trust_remote_code as handed to transformers: never for our own self-describing checkpoints."""
    return trust_remote_code and not ships_our_code(config)


def check_remote_code(config: dict, where: str, trust_remote_code: bool) -> list[str]:
    """Refuse a config naming its own modelling code (``auto_map``) unless ``trust_remote_code``; our own
    self-describing checkpoints (zoo, convert, export) are loaded by the package's classes instead."""
    if not config.get("auto_map") or ships_our_code(config):
        return []
    if not trust_remote_code:
        raise UserError(
            "The checkpoint ships its own modelling code (`auto_map` in config.json); running remote code "
            "is refused by default",
            where=where,
            fix="set `trust_remote_code: true` on the model's entry (`model:` or `models:`) in the study config "
                "(load_model(..., trust_remote_code=True)) only if you trust the code in that checkpoint")
    return [f"{where}: running the checkpoint's own modelling code because trust_remote_code is set"]


def tokenizer_status(directory: Path, files: set[str], tokenizer: str | None, trust_remote_code: bool,
                     where: str) -> tuple[bool, str | None]:
    """(a tokenizer will load, note): an explicit ``tokenizer`` directory, else the checkpoint's files
    (whose own tokenizer code, ``auto_map`` in tokenizer_config.json, needs ``trust_remote_code``)."""
    from ..loading import TOKENIZER_FILES, _read_json

    if tokenizer:  # an explicit tokenizer directory replaces the checkpoint's files
        if not Path(os.path.expanduser(tokenizer)).is_dir():
            raise UserError(f"tokenizer directory {tokenizer!r} does not exist", where=where,
                            fix="point `tokenizer:` at a directory saved with transformers' save_pretrained")
        return True, None
    if any(f in files for f in TOKENIZER_FILES):
        tok_cfg = directory / "tokenizer_config.json"
        if tok_cfg.is_file() and _read_json(tok_cfg, where).get("auto_map") and not trust_remote_code:
            raise UserError("The checkpoint's tokenizer ships its own code (`auto_map` in tokenizer_config.json); "
                            "running remote code is refused by default", where=where,
                            fix="set `trust_remote_code: true` on the model's entry (`model:` or `models:`) in the "
                                "study config only if you trust that code")
        return True, None
    return False, (f"{where}: no tokenizer files (tokenizer.json / tokenizer_config.json); the tokenizer is None "
                   "and evaluation tasks that need text cannot run")


def structure(directory: Path, config: dict, dtype: str, trust_remote_code: bool):
    """The model transformers would build from ``directory``, on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import model as _registers_attnres  # noqa: F401

    trust_remote_code = remote_code_allowed(config, trust_remote_code)
    cfg = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code, local_files_only=True)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = AutoModelForCausalLM.from_config(
            cfg, trust_remote_code=trust_remote_code, dtype=None if dtype == "auto" else getattr(torch, dtype))
    return skeleton.eval()


def load(src, directory: Path, trust_remote_code: bool, *, strict_unexpected: bool = False):
    """``(model, tokenizer)`` through ``AutoModelForCausalLM.from_pretrained``; missing or mis-shaped weights
    are an error, and so are unexpected ones with ``strict_unexpected`` (a family's own model)."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from .. import model as _registers_attnres  # noqa: F401  (AutoConfig/AutoModel registration)

    where = f"model path {src.spec!r}"
    trust_remote_code = remote_code_allowed(src.config, trust_remote_code)
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
    _check_loading_info(info, where, strict_unexpected)
    model = model.to(src.device).eval()
    return model, load_tokenizer(src, directory, trust_remote_code, where)


def load_tokenizer(src, directory: Path, trust_remote_code: bool, where: str):
    """The tokenizer ``tokenizer_status`` promised at preflight (``src.has_tokenizer``), or None."""
    if not src.has_tokenizer:
        return None
    from transformers import AutoTokenizer

    try:
        tok_dir = os.path.expanduser(src.tokenizer) if src.tokenizer else str(directory)
        return AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"The checkpoint's tokenizer files could not be loaded ({type(exc).__name__}: {exc})",
                        where=where, fix="repair the tokenizer files or re-save them with transformers") from None


def _check_loading_info(info: dict, where: str, strict_unexpected: bool) -> None:
    from ..loading import LoadingWarning, _short

    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in (info.get("unexpected_keys") or []) if not _BENIGN_UNEXPECTED.search(k))
    mismatched = list(info.get("mismatched_keys") or [])
    problems = []
    if missing:
        problems.append(f"missing weights {_short(missing)}")
    if mismatched:
        names = [m[0] if isinstance(m, tuple) else m for m in mismatched]
        problems.append(f"weights of the wrong shape {_short(names)}")
    if unexpected and strict_unexpected:
        problems.append(f"unexpected weights {_short(unexpected)} (parts the reference model does not implement)")
    if problems:
        raise UserError("The checkpoint does not match its config: " + "; ".join(problems), where=where,
                        fix="check that config.json belongs to these weights (FLA names: model.embeddings, "
                            "model.layers.N.attn.*, ...; see docs/checkpoints.md)")
    if unexpected:
        warnings.warn(f"{where}: ignored unexpected weights {_short(unexpected)}", LoadingWarning, stacklevel=4)


def describe_common(model) -> dict:
    """The model_type of a transformers model (its config's, or its class name)."""
    return {"model_type": getattr(model.config, "model_type", None) or type(model).__name__}


__all__ = ["check_remote_code", "tokenizer_status", "structure", "load", "load_tokenizer", "describe_common"]
