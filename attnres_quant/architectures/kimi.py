"""Kimi-Linear / Kimi K3 family: which checkpoints it loads, how, and its component names.

* Model types: ``kimi_linear`` (Moonshot's ``KimiLinearConfig``; Block AttnRes when
  ``attn_res_block_size`` is set, the standard residual otherwise) and ``kimi_k3`` (a
  ``KimiK3Config`` whose ``text_config`` is a Kimi-Linear model stored under
  ``language_model.``; the vision tower and the multimodal projector are not loaded).
* Loading (:func:`load_kimi`): a local directory with config.json and safetensors weights
  (``model.safetensors``, ``model.safetensors.index.json`` shards, or ``model-*.safetensors``),
  offline, never running the checkpoint's own code: the model is ours
  (:mod:`.kimi_modeling`) and equals Moonshot's code (tests/test_kimi.py).
* Components (:func:`kimi_component`): a pure function from a module or parameter name to
  ``(component, layer, expert)``, SPEC section 2 extended for this family; computations
  (depth softmax/sources, the MLA latent cache, the KDA state) come from :func:`kimi_parts`.

Wired through the registry in :mod:`attnres_quant.architectures` (loading, components, plan).
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError
from .base import ComponentRef, Family, FamilyPart
from .base import torch_dtype as _torch_dtype
from .compressed import ACTIVATION_FIELDS, WEIGHT_FIELDS, check_quantization_config, decompress_module, module_group

MODEL_TYPES = ("kimi_linear", "kimi_k3")
K3_TEXT_PREFIX = "language_model."
K3_SKIPPED_PREFIXES = ("vision_tower.", "mm_projector.", "multi_modal_projector.")

# Weight components of this family, then computations.
WEIGHT_COMPONENTS = (
    "embed", "norm", "lm_head", "depth.query", "depth.key_norm",
    "attn.q", "attn.k", "attn.v", "attn.o", "attn.gate", "attn.conv", "attn.decay",
    "attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b",
    "mlp.gate", "mlp.up", "mlp.down",
    "moe.router", "moe.experts.gate", "moe.experts.up", "moe.experts.down",
    "moe.shared.gate", "moe.shared.up", "moe.shared.down",
    "moe.latent.down", "moe.latent.up",  # K3's latent MoE projections (routed_expert_{down,up}_proj)
)
COMPUTE_COMPONENTS = ("depth.softmax", "depth.sources", "attn.kv_cache", "attn.state")
COMPONENTS = WEIGHT_COMPONENTS + COMPUTE_COMPONENTS
# Components a method's default never quantizes unless a rule asks for them (the K3 ignore lesson:
# llm-compressor's patch_kimi_k3_ignore keeps *_res_proj out of quantization by hand).
DEFAULT_KEEP = ("depth.query", "depth.key_norm", "moe.router", "attn.decay", "norm")
KEEP_REASON = "AttnRes pseudo-queries and key norms, routers, KDA decay, norms -- the K3 ignore lesson"


_L = r"model\.layers\.(?P<layer>\d+)\."
_RULES: list[tuple[re.Pattern, str]] = [(re.compile(p), c) for p, c in [
    (r"model\.embed_tokens", "embed"),
    (r"lm_head", "lm_head"),
    (r"model\.norm", "norm"),
    (r"model\.output_attn_res_proj", "depth.query"),
    (r"model\.output_attn_res_norm", "depth.key_norm"),
    (_L + r"(input_layernorm|post_attention_layernorm)", "norm"),
    (_L + r"(self_attention|mlp)_res_proj", "depth.query"),
    (_L + r"(self_attention|mlp)_res_norm", "depth.key_norm"),
    (_L + r"self_attn\.(?P<p>q|k|v|o)_proj", "attn.{p}"),
    (_L + r"self_attn\.q_a_proj", "attn.q_a"),
    (_L + r"self_attn\.q_b_proj", "attn.q_b"),
    (_L + r"self_attn\.kv_a_proj_with_mqa", "attn.kv_a"),
    (_L + r"self_attn\.kv_b_proj", "attn.kv_b"),
    (_L + r"self_attn\.(q_a_layernorm|kv_a_layernorm|o_norm)", "norm"),
    (_L + r"self_attn\.(q|k|v)_conv1d", "attn.conv"),
    (_L + r"self_attn\.(A_log|dt_bias)", "attn.decay"),
    (_L + r"self_attn\.(f_a|f_b|g_a|g_b|g|b)_proj", "attn.gate"),  # KDA gates; MLA's output gate g_proj
    (_L + r"mlp\.(?P<p>gate|up|down)_proj", "mlp.{p}"),
    (_L + r"block_sparse_moe\.gate(\.(weight|e_score_correction_bias))?", "moe.router"),
    (_L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<w>w1|w2|w3)", "moe.experts.{w}"),
    (_L + r"block_sparse_moe\.shared_experts\.(?P<p>gate|up|down)_proj", "moe.shared.{p}"),
    (_L + r"block_sparse_moe\.routed_expert_(?P<p>down|up)_proj", "moe.latent.{p}"),
    (_L + r"block_sparse_moe\.routed_expert_norm", "norm"),
]]
_EXPERT_W = {"w1": "gate", "w3": "up", "w2": "down"}
# Tensor suffixes: plain weights and compressed-tensors' packed formats (for naming checkpoint tensors).
_SUFFIX = re.compile(r"\.(weight|bias|weight_packed|weight_scale|weight_zero_point|weight_global_scale|"
                     r"weight_shape|weight_g_idx|input_scale|input_global_scale|input_zero_point)$")


def kimi_component(name: str, num_layers: int | None = None) -> ComponentRef | None:
    """Component, layer and expert of a Kimi module / parameter / checkpoint tensor name.

    Accepts names with or without K3's ``language_model.`` prefix and with or without a tensor
    suffix (``.weight``, compressed-tensors' ``.weight_packed`` ...).  Returns None for names that
    are not parts (containers, the vision tower).  ``num_layers`` gives the final norm and the
    output depth mix their layer index (after the last layer), as for the reference model.
    """
    if name.startswith(K3_TEXT_PREFIX):
        name = name[len(K3_TEXT_PREFIX):]
    for candidate in (name, _SUFFIX.sub("", name)):
        for pattern, comp in _RULES:
            m = pattern.fullmatch(candidate)
            if m is None:
                continue
            groups = m.groupdict()
            if "{p}" in comp:
                comp = comp.format(p=groups["p"])
            elif "{w}" in comp:
                comp = comp.format(w=_EXPERT_W[groups["w"]])
            layer = int(groups["layer"]) if groups.get("layer") is not None else None
            if layer is None and comp in ("norm", "depth.query", "depth.key_norm"):
                layer = num_layers
            expert = int(groups["expert"]) if groups.get("expert") is not None else None
            return ComponentRef(comp, layer, expert)
    return None


KimiPart = FamilyPart  # (the registry's part record; the old name stays importable)


def kimi_parts(model) -> Iterator[KimiPart]:
    """Every parameter (by name) and every computation hook of a loaded Kimi model."""
    from .kimi_modeling import KimiDeltaAttention, KimiMLAAttention
    from ..model.depth import DepthMixer

    L = model.config.num_hidden_layers
    for pname, _ in model.named_parameters():
        ref = kimi_component(pname, L)
        if ref is None:
            raise ValueError(f"Kimi parameter {pname!r} has no component")
        yield KimiPart(pname, ref, "weight")
    for mname, module in model.named_modules():
        if isinstance(module, DepthMixer):
            for comp in ("depth.softmax", "depth.sources"):
                yield KimiPart(mname, ComponentRef(comp, module.sublayer // 2), "compute")
        elif isinstance(module, KimiMLAAttention):
            yield KimiPart(mname, ComponentRef("attn.kv_cache", module.layer_idx), "compute")
        elif isinstance(module, KimiDeltaAttention):
            yield KimiPart(mname, ComponentRef("attn.state", module.layer_idx), "compute")


# --------------------------------------------------------------------------- config
def is_kimi_config(config: dict) -> bool:
    return config.get("model_type") in MODEL_TYPES


def text_config_dict(config: dict) -> tuple[dict, str]:
    """(the Kimi-Linear text config, the tensor-name prefix of the text model) of a config.json dict."""
    mt = config.get("model_type")
    if mt == "kimi_linear":
        return dict(config), ""
    if mt == "kimi_k3":
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise UserError("A kimi_k3 config.json needs a `text_config` object", where="config.json",
                            fix="use the checkpoint's original config.json")
        return dict(text), K3_TEXT_PREFIX
    raise UserError(f"model_type {mt!r} is not a Kimi model", where="config.json",
                    fix=f"this loader reads model_type {' or '.join(MODEL_TYPES)}")


def build_config(config: dict):
    from .kimi_modeling import KimiAttnResConfig

    text, _ = text_config_dict(config)
    for key in ("auto_map", "architectures", "quantization_config", "transformers_version", "torch_dtype", "dtype"):
        text.pop(key, None)
    try:
        return KimiAttnResConfig(**text)
    except (TypeError, ValueError) as exc:
        raise UserError(f"The Kimi config could not be read ({exc})", where="config.json",
                        fix="check the text model's fields against Moonshot's KimiLinearConfig") from None


# --------------------------------------------------------------------------- loading
def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (an index's shards, or the single file)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        files = sorted(directory.glob("model-*.safetensors"))
    if not files:
        raise UserError("The checkpoint has no safetensors weights", where=str(directory),
                        fix="point at a directory with model.safetensors or model.safetensors.index.json")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"Weight shards listed in the index are missing: {', '.join(missing[:5])}",
                        where=str(directory), fix="download the complete checkpoint")
    return files


def load_kimi(path: str | Path, *, dtype: Any = "bfloat16", device: Any = "cpu"):
    """Load a Kimi-Linear / Kimi K3 checkpoint directory into :class:`KimiAttnResForCausalLM`.

    Returns ``(model, notes)``: the model in eval mode, and notes about what was skipped (the K3
    vision tower, multi-token-prediction layers, and "as shipped: <format> for <components>" for a
    compressed-tensors MXFP4 checkpoint, whose packed Linear weights are dequantized into ``dtype``).
    Missing, unexpected or mis-shaped text-model weights are a ``UserError``.
    """
    import torch
    from safetensors import safe_open

    from .kimi_modeling import KimiAttnResForCausalLM

    directory = Path(path)
    where = f"model path {str(path)!r}"
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise UserError("The checkpoint has no config.json", where=where,
                        fix="point at a checkpoint directory (config.json + safetensors)")
    with open(cfg_file, encoding="utf-8") as fh:
        raw = json.load(fh)
    _, prefix = text_config_dict(raw)
    qcfg = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config")
    packed_format = check_quantization_config(qcfg, where) if qcfg else None
    config = build_config(raw)
    torch_dtype = _torch_dtype(dtype)
    notes: list[str] = []
    if raw.get("auto_map"):
        notes.append("config.json names remote code (auto_map); it is not run: the Kimi model is attnres_quant's own")
    with torch.device("meta"):
        model = KimiAttnResForCausalLM(config)
    expected = dict(model.state_dict())
    L = config.num_hidden_layers
    state: dict[str, torch.Tensor] = {}
    skipped: dict[str, int] = {}
    unexpected: list[str] = []
    packed: dict[str, dict[str, torch.Tensor]] = {}  # module name -> {weight_packed, weight_scale, ...}
    ct_fields = WEIGHT_FIELDS + ACTIVATION_FIELDS
    mtp = re.compile(r"model\.layers\.(\d+)\.")
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if prefix and not key.startswith(prefix):
                    group = next((p for p in K3_SKIPPED_PREFIXES if key.startswith(p)), None)
                    if group is not None:
                        skipped[group] = skipped.get(group, 0) + 1
                    else:
                        unexpected.append(key)
                    continue
                name = key[len(prefix):]
                if packed_format is not None and name.rpartition(".")[2] in ct_fields:
                    module, _, field = name.rpartition(".")
                    packed.setdefault(module, {})[field] = fh.get_tensor(key)
                    continue
                m = mtp.match(name)
                if name not in expected and m and int(m.group(1)) >= L:
                    skipped["multi-token-prediction layers"] = skipped.get("multi-token-prediction layers", 0) + 1
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                tensor = fh.get_tensor(key)
                # (an fp8 `weight` of a float-quantized module stays fp8 until it is decompressed)
                if tensor.is_floating_point() and tensor.dtype.itemsize > 1 and torch_dtype is not None:
                    tensor = tensor.to(torch_dtype)
                state[name] = tensor
    shipped: dict[str, set[str]] = {}
    dropped_act: set[str] = set()
    labels: dict[str, set[str]] = {}
    modules = dict(model.named_modules())
    for module, parts in sorted(packed.items()):
        name = f"{module}.weight"
        if name in expected and not any(f in parts for f in WEIGHT_FIELDS):  # activation-only group
            dropped_act.add("activation-only")
            continue
        if name not in expected or "weight_scale" not in parts:
            unexpected.extend(f"{prefix}{module}.{f}" for f in parts)
            continue
        if "weight_packed" not in parts and name in state:  # float-/int-/naive-quantized: `weight` holds the codes
            parts["weight"] = state.pop(name)
        try:
            fmt, group = module_group(prefix + module, modules[module], qcfg)
            tensor = decompress_module(parts, fmt, group)
        except (KeyError, ValueError) as exc:
            raise UserError(f"The compressed-tensors module {prefix}{module} cannot be decompressed ({exc})",
                            where=where, fix="check the checkpoint's quantization_config against its tensors")
        if any(f in parts for f in ACTIVATION_FIELDS) or (group.get("input_activations") or None):
            dropped_act.add(fmt)
        # dtype "auto": the dtype the checkpoint's dense weights have (the embedding's).
        target = torch_dtype or getattr(state.get("model.embed_tokens.weight"), "dtype", torch.bfloat16)
        state[name] = tensor.to(target)
        ref = kimi_component(name, L)
        shipped.setdefault(fmt, set()).add(ref.component if ref else "other")
        labels.setdefault(fmt, set()).add(_format_label(fmt, group))
    tied = bool(config.tie_word_embeddings)
    missing = sorted(k for k in expected if k not in state and not (tied and k == "lm_head.weight"))
    wrong = sorted(k for k, t in state.items() if tuple(t.shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing weights {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected weights {_short(sorted(unexpected))}")
    if wrong:
        problems.append(f"weights of the wrong shape {_short(wrong)}")
    if problems:
        raise UserError("The Kimi checkpoint does not match its config: " + "; ".join(problems), where=where,
                        fix="check that config.json belongs to these weights (Moonshot's parameter names)")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    for group, n in skipped.items():
        notes.append(f"skipped {n} tensors of {group.rstrip('.')} (not part of the text model studied here)")
    for fmt, comps in shipped.items():
        notes.append(f"as shipped: {'/'.join(sorted(labels[fmt]))} for {', '.join(sorted(comps))} "
                     "(dequantized on load)")
    if dropped_act:
        notes.append(f"input-activation quantization of the {', '.join(sorted(dropped_act))} groups is not applied "
                     "(a run-time computation, not a weight: the loaded model computes in its dtype)")
    model = model.to(device).eval()
    model._kimi_as_shipped = {fmt: sorted(c) for fmt, c in shipped.items()}
    for note in notes:
        warnings.warn(f"{where}: {note}", UserWarning, stacklevel=2)
    return model, notes


def _format_label(fmt: str, group: dict) -> str:
    """mxfp4 / nvfp4 / mxfp8, else the group's weights as fp8 / int4 / int8 (for notes)."""
    head = fmt.split("-")[0]
    if head in ("mxfp4", "nvfp4", "mxfp8"):
        return head
    w = group.get("weights") or {}
    return f"{'fp' if w.get('type') == 'float' else 'int'}{w.get('num_bits', '?')}"


def _short(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def is_kimi_model(model) -> bool:
    from .kimi_modeling import KimiAttnResForCausalLM

    return isinstance(model, KimiAttnResForCausalLM)


# --------------------------------------------------------------------------- wiring helpers
# Methods the plan accepts on this family, and why the others are refused (at plan time).
METHODS = ("none", "rtn", "gptq", "awq", "gguf", "bnb")
REFUSED_METHODS = {
    "torchao": "torchao quantize_ on this family is untested (routed experts run on token subsets)",
}


def method_problem(method: str, options: dict | None = None) -> str | None:
    """Why ``method`` (with its ``options``) cannot run on this family (None when it can)."""
    if method == "gguf" and (options or {}).get("preset"):
        return ("a gguf `preset` reproduces llama-quantize's per-tensor mix for Llama-layout layers (attn_v / "
                "ffn_down in every layer); KDA/MLA/MoE layers have no such mix here -- give plain GGUF types "
                "(default/rules with q4_0, q4_k, q8_0 ...) instead")
    if method in METHODS:
        return None
    return REFUSED_METHODS.get(method, f"method {method!r} is not supported on this family")


@contextlib.contextmanager
def calibrate_all_experts(model):
    """During calibration every routed expert sees every token (its Hessian is never empty), while the
    forward still adds only the routed experts' outputs -- llm-compressor's "calibrate all experts"."""
    from .kimi_modeling import KimiSparseMoe

    moes = [m for m in model.modules() if isinstance(m, KimiSparseMoe)]
    for m in moes:
        m.calibrate_all_experts = True
    try:
        yield model
    finally:
        for m in moes:
            m.calibrate_all_experts = False


def family_name(config: dict) -> str:
    """``kimi_linear-attnres`` / ``kimi_linear`` (standard residual) / ``kimi_k3-attnres`` ..."""
    text, _ = text_config_dict(config)
    return f"{config.get('model_type')}" + ("-attnres" if text.get("attn_res_block_size") else "")


def check_config(config: dict, where: str) -> tuple[str, str, int | None, list[str]]:
    """(model_type, family, block size in sub-layers, notes) of a Kimi config.json, as loading._check_config."""
    notes = []
    build_config(config)  # UserError on a config our model cannot build
    text, _ = text_config_dict(config)
    k = text.get("attn_res_block_size")
    if config.get("auto_map"):
        notes.append(f"{where}: config.json names remote code (auto_map); it is not run: the Kimi family runs on "
                     "attnres_quant's own model (architectures/kimi_modeling.py)")
    if config.get("model_type") == "kimi_k3":
        notes.append(f"{where}: kimi_k3: only the text model (language_model.) is loaded; the vision tower and "
                     "projector are skipped")
    return config.get("model_type"), family_name(config), (2 * k if k else None), notes


def structure(config: dict, dtype: Any = "bfloat16"):
    """The model on the meta device (no weights), in ``dtype`` as ``load_kimi`` would load it."""
    import torch

    from .kimi_modeling import KimiAttnResForCausalLM

    cfg = build_config(config)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = KimiAttnResForCausalLM(cfg)
    torch_dtype = _torch_dtype(dtype)
    if torch_dtype is None:  # "auto": the checkpoint's declared dtype (bf16 when it declares none)
        text, _ = text_config_dict(config)
        declared = config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype") or text.get("dtype")
        try:
            torch_dtype = _torch_dtype(declared or "bfloat16")
        except UserError:
            torch_dtype = torch.bfloat16
    model = model.to(torch_dtype or torch.bfloat16)
    return model.eval()


def tokenizer_status(directory: Path, tokenizer: str | None, trust_remote_code: bool) -> tuple[bool, str | None]:
    """(a tokenizer will load, note) without loading it.

    Order: an explicit ``tokenizer`` directory; the checkpoint's own tokenizer files when they need
    no remote code; Moonshot's tiktoken tokenizer (``tokenization_kimi.py``, ``auto_map`` in
    tokenizer_config.json) only with ``trust_remote_code`` and the ``tiktoken`` package.
    """
    import importlib.util

    if tokenizer:
        if not Path(tokenizer).expanduser().is_dir():
            raise UserError(f"tokenizer directory {tokenizer!r} does not exist", where="model tokenizer",
                            fix="point `tokenizer:` at a directory saved with transformers' save_pretrained")
        return True, None
    tok_cfg = directory / "tokenizer_config.json"
    files = {p.name for p in directory.iterdir()}
    if not tok_cfg.is_file() and "tokenizer.json" not in files:
        return False, (f"{directory}: no tokenizer files; the tokenizer is None (give the model entry a "
                       "`tokenizer: DIR`)")
    remote = False
    if tok_cfg.is_file():
        with open(tok_cfg, encoding="utf-8") as fh:
            remote = bool((json.load(fh) or {}).get("auto_map"))
    if not remote:
        return True, None
    why = []
    if not trust_remote_code:
        why.append("it is remote code (tokenization_kimi.py): set `trust_remote_code: true` on the model entry")
    if importlib.util.find_spec("tiktoken") is None:
        why.append("it needs the `tiktoken` package (pip install tiktoken)")
    if why:
        return False, (f"{directory}: Moonshot's Kimi tokenizer is tiktoken-based and is not loaded ("
                       + "; ".join(why) + "), or give the model entry a `tokenizer: DIR`; the tokenizer is None, "
                       "so tasks and quality metrics cannot run")
    return True, None


def load_tokenizer(directory: Path, tokenizer: str | None, trust_remote_code: bool):
    """The tokenizer as :func:`tokenizer_status` describes, or None."""
    ok, _ = tokenizer_status(directory, tokenizer, trust_remote_code)
    if not ok:
        return None
    from transformers import AutoTokenizer

    path = Path(tokenizer).expanduser() if tokenizer else directory
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code and not tokenizer,
                                             local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"The tokenizer could not be loaded ({type(exc).__name__}: {exc})", where=str(path),
                        fix="repair the tokenizer files or give the model entry another `tokenizer: DIR`") from None


def latent_cache_bytes_per_token(config, precision: str = "bf16", granularity: str = "per_token", *,
                                 scale_bytes: int = 2) -> float:
    """Bytes the MLA latent cache holds per token of context, all MLA layers: ``kv_lora_rank`` +
    ``qk_rope_head_dim`` values per layer, plus (per_token fp8/int8/int4) one scale per token for each
    of the two cached tensors."""
    bits = {"bf16": 16, "fp16": 16, "fp32": 32, "fp8": 8, "int8": 8, "int4": 4}[precision]
    n_mla = sum(1 for i in range(config.num_hidden_layers) if not config.is_kda_layer(i))
    width = int(config.kv_lora_rank or 0) + int(config.qk_rope_head_dim or 0)
    scales = 2 * scale_bytes if (granularity == "per_token" and precision in ("fp8", "int8", "int4")) else 0
    return n_mla * (width * bits / 8 + scales)


def kda_state_bytes(config, precision: str = "fp32") -> float:
    """Bytes of the KDA recurrent states of one sequence (all KDA layers): H x V x K per layer."""
    bits = {"bf16": 16, "fp16": 16, "fp32": 32, "fp8": 8, "int8": 8, "int4": 4}[precision]
    lac = config.linear_attn_config or {}
    n_kda = sum(1 for i in range(config.num_hidden_layers) if config.is_kda_layer(i))
    return n_kda * int(lac.get("num_heads", 0)) * int(lac.get("head_dim", 0)) ** 2 * bits / 8


# --------------------------------------------------------------------------- AWQ
def awq_mappings(model) -> list[tuple[str, tuple[str, ...]]]:
    """llm-compressor AWQ smoothing mappings, one per norm and layer (exact names: KDA, MLA, dense and MoE
    layers differ): ``input_layernorm`` -> the attention's input projections (KDA: q/k/v, the forget and
    output gate down-projections, beta; MLA: q or q_a, kv_a, the output gate), ``post_attention_layernorm``
    -> the MLP's gate/up, or the router, the shared expert's gate/up and every routed expert's w1/w3 (the
    latent down-projection instead of the experts for a latent MoE).  The first balance layer sees every
    token (AWQ reads the activation statistics there).  No mapping touches ``*_res_proj`` /
    ``*_res_norm``: the depth mix happens before these norms, so the depth path is bit-identical."""
    from .kimi_modeling import KimiDeltaAttention

    maps = []
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        attn = layer.self_attn
        if isinstance(attn, KimiDeltaAttention):
            names = ["q_proj", "k_proj", "v_proj", "f_a_proj", "b_proj",
                     "g_proj" if attn.use_full_rank_gate else "g_a_proj"]
        else:
            names = ["q_a_proj" if attn.q_lora_rank is not None else "q_proj", "kv_a_proj_with_mqa"]
            if hasattr(attn, "g_proj"):
                names.append("g_proj")
        maps.append((_exact(pre + "input_layernorm"), tuple(_exact(f"{pre}self_attn.{n}") for n in names)))
        if hasattr(layer, "block_sparse_moe"):
            moe = layer.block_sparse_moe
            # The router reads the same normed input: it balances too (its columns times s, exact), so
            # routing is unchanged; it is not quantized (DEFAULT_KEEP), and it sees every token.
            bal = [f"{pre}block_sparse_moe.gate"]
            if hasattr(moe, "shared_experts"):
                bal += [f"{pre}block_sparse_moe.shared_experts.{n}_proj" for n in ("gate", "up")]
            if moe.latent:
                bal.append(f"{pre}block_sparse_moe.routed_expert_down_proj")
            else:
                bal += [f"{pre}block_sparse_moe.experts.{e}.{w}" for e in range(len(moe.experts)) for w in ("w1", "w3")]
            maps.append((_exact(pre + "post_attention_layernorm"), tuple(_exact(n) for n in bal)))
        else:
            maps.append((_exact(pre + "post_attention_layernorm"),
                         (_exact(pre + "mlp.gate_proj"), _exact(pre + "mlp.up_proj"))))
    return maps


def _exact(name: str) -> str:
    return "re:^" + re.escape(name) + "$"


# Components whose Linears AWQ quantizes (llm-compressor's group quantizer; the smoothed ones get scales).
AWQ_COMPONENTS = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.gate", "attn.q_a", "attn.q_b", "attn.kv_a",
                  "attn.kv_b", "mlp.gate", "mlp.up", "mlp.down", "moe.experts.gate", "moe.experts.up",
                  "moe.experts.down", "moe.shared.gate", "moe.shared.up", "moe.shared.down", "moe.latent.down",
                  "moe.latent.up")


# --------------------------------------------------------------------------- registry adapters
def _check_config(config: dict, where: str, trust_remote_code: bool):
    return check_config(config, where)  # never runs remote code: trust_remote_code is irrelevant


def _tokenizer_status(directory: Path, files: set[str], tokenizer: str | None, trust_remote_code: bool, where: str):
    return tokenizer_status(directory, tokenizer, trust_remote_code)


def _structure(directory: Path, config: dict, dtype: str, trust_remote_code: bool):
    return structure(config, dtype)


def _load(src, directory: Path, trust_remote_code: bool):
    """``(model, tokenizer)``; the loader's notes are kept on the model (``describe`` reports them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, notes = load_kimi(directory, dtype=src.dtype, device=src.device)
    model._load_notes = list(notes)
    return model.eval(), load_tokenizer(directory, src.tokenizer, trust_remote_code)


def describe(model) -> dict:
    """Family label (``kimi_linear-attnres`` ...), block size in sub-layers and the Kimi extras."""
    cfg = model.config
    src = getattr(model, "_attnres_source", None)
    model_type = src.model_type if src is not None else (getattr(cfg, "model_type", None) or type(model).__name__)
    block = getattr(cfg, "attnres_block_size", None)
    return {"model_type": model_type, "family": model_type + ("-attnres" if block else ""), "block_size": block,
            "attnres_block_size": block,  # in sub-layers (FLA's name; what the report reads)
            "attn_res_block_size": getattr(cfg, "attn_res_block_size", None),
            "num_experts": getattr(cfg, "num_experts", None),
            "kda_layers": sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_kda_layer(i)),
            "load_notes": list(getattr(model, "_load_notes", [])),
            "as_shipped": dict(getattr(model, "_kimi_as_shipped", {}))}


def _handles_model(model) -> bool:
    if not type(model).__name__.startswith("Kimi"):  # cheap: no modelling import for other families' models
        return False
    return is_kimi_model(model)


def _kv_cache_bytes(config, precision: str, granularity: str) -> float:
    return latent_cache_bytes_per_token(config, precision, granularity)


FAMILY = Family(
    name="kimi", model_types=MODEL_TYPES, components=COMPONENTS, compute_components=COMPUTE_COMPONENTS,
    handles_model=_handles_model, check_config=_check_config, tokenizer_status=_tokenizer_status,
    structure=_structure, load=_load, describe=describe, parts=kimi_parts, component=kimi_component,
    default_keep=DEFAULT_KEEP, keep_reason=KEEP_REASON, method_problem=method_problem,
    calibration_context=calibrate_all_experts, awq_components=AWQ_COMPONENTS, awq_mappings=awq_mappings,
    kv_cache_bytes=_kv_cache_bytes,
    awq_note=("awq folds its smoothing scales into every layer's input_layernorm / post_attention_layernorm gains "
              "and multiplies the balanced input columns (attention input projections; MoE router, shared and "
              "routed experts' gate/up): the routers say keep but change exactly in fp32 (rounded once to the "
              "model dtype), so routing is unchanged; the depth path (depth.query/key_norm) is never rescaled"),
)

__all__ = ["FAMILY", "Family", "is_kimi_model", "MODEL_TYPES", "COMPONENTS", "WEIGHT_COMPONENTS",
           "COMPUTE_COMPONENTS", "DEFAULT_KEEP", "ComponentRef", "KimiPart", "kimi_component", "kimi_parts",
           "is_kimi_config", "text_config_dict", "build_config", "load_kimi", "weight_files", "METHODS",
           "method_problem", "latent_cache_bytes_per_token", "kda_state_bytes", "structure", "check_config"]
