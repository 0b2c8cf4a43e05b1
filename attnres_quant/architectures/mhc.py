"""mHC family (Manifold-Constrained Hyper-Connections, DeepSeek-V4 style): which checkpoints it loads, how,
its component names and its precision hooks.

* Model types: ``attnres_mhc`` (our minimal mHC variant of the reference dense transformer,
  :mod:`.mhc_modeling`: the reference sub-layers with ``hc_mult`` residual streams) and ``deepseek_v4``
  (transformers' native ``DeepseekV4ForCausalLM``: MLA-style shared-KV attention with compressors and an
  indexer, hash/top-k MoE with a shared expert, mHC residuals).
* Loading (:func:`load_mhc`): a local directory (config.json + safetensors), offline, through
  ``from_pretrained`` of our class or transformers' class; missing, unexpected or mis-shaped weights are a
  ``UserError``; the tokenizer as for the transformers-built families (:mod:`.hf`).  On a DeepSeek-V4 model
  the mHC sites are then run by our :class:`HyperConnection` (the same Parameters, the same arithmetic --
  tests/test_mhc.py) so the precision hooks below attach.
* Components: ``hc.fn`` (every mapping parameter: ``fn``/``base``/``scale`` of each site, ``hc_fn``/
  ``hc_base``/``hc_scale`` of the head), the computations ``hc.pre``/``hc.post``/``hc.comb`` (``compute``, like
  ``depth.softmax``) and ``hc.streams`` (``storage``, like ``depth.sources``), plus attn.*, mlp.*, moe.*,
  ``embed``, ``norm``, ``lm_head``.  A method's default never reaches ``hc.fn`` (nor routers and norms) unless a
  rule names it, and the plan says so.

Wired through the registry (:mod:`attnres_quant.architectures`) by ``FAMILY``; the ``hc.*`` computations reach
the plan and the quantizer as ``Family.hooks`` (:data:`HOOKS`, one :class:`~.base.PrecisionHook` each).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError
from . import hf
from .base import ComponentRef, Family, FamilyPart, PrecisionHook
from .base import torch_dtype as _torch_dtype

MODEL_TYPES = ("attnres_mhc", "deepseek_v4")

WEIGHT_COMPONENTS = (
    "embed", "norm", "lm_head", "hc.fn",
    "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down",
    # DeepSeek-V4 attention: q-LoRA, one shared key-value head, grouped output (o_a) then o, per-head sinks,
    # the KV compressor (CSA / HCA layers) and the lightning indexer (CSA layers).
    "attn.q_a", "attn.q_b", "attn.kv", "attn.o_a", "attn.sink", "attn.compressor", "attn.indexer",
    "moe.router", "moe.experts.gate", "moe.experts.up", "moe.experts.down",
    "moe.shared.gate", "moe.shared.up", "moe.shared.down",
)
HC_COMPUTE = ("hc.pre", "hc.post", "hc.comb", "hc.streams")
COMPUTE_COMPONENTS = HC_COMPUTE + ("attn.kv_cache",)
COMPONENTS = WEIGHT_COMPONENTS + COMPUTE_COMPONENTS
# What a method's default never quantizes unless a rule names it: the mHC mapping parameters (like
# depth.query on AttnRes models: a few numbers per layer that steer every stream), routers, DeepSeek-V4's
# per-head attention sinks (logit offsets, like KDA's decay) and norms.
DEFAULT_KEEP = ("hc.fn", "moe.router", "attn.sink", "norm")
KEEP_REASON = ("the mHC mapping parameters, routers, attention sinks and norms -- the residual-path parameters are "
               "kept as AttnRes pseudo-queries are")


# --------------------------------------------------------------------------- component names
_L = r"model\.layers\.(?P<layer>\d+)\."
_RULES: list[tuple[re.Pattern, str]] = [(re.compile(p), c) for p, c in [
    (r"model\.(embeddings|embed_tokens)", "embed"),
    (r"lm_head", "lm_head"),
    (r"model\.norm", "norm"),
    (r"model\.hc_head\.(hc_fn|hc_base|hc_scale)", "hc.fn"),
    (_L + r"(attn_hc|ffn_hc)\.(fn|base|scale)", "hc.fn"),
    # ours (the reference model's names)
    (_L + r"(attn_norm|mlp_norm)", "norm"),
    (_L + r"attn\.(?P<p>q|k|v|o)_proj", "attn.{p}"),
    (_L + r"mlp\.(?P<p>gate|up|down)_proj", "mlp.{p}"),
    # DeepSeek-V4
    (_L + r"(input_layernorm|post_attention_layernorm)", "norm"),
    (_L + r"self_attn\.(q_a_norm|kv_norm|compressor\.kv_norm|compressor\.indexer\.kv_norm)", "norm"),
    (_L + r"self_attn\.compressor\.indexer\.(q_b_proj|kv_proj|gate_proj|scorer\.weights_proj|position_bias)",
     "attn.indexer"),
    (_L + r"self_attn\.compressor\.(kv_proj|gate_proj|position_bias)", "attn.compressor"),
    (_L + r"self_attn\.q_a_proj", "attn.q_a"),
    (_L + r"self_attn\.q_b_proj", "attn.q_b"),
    (_L + r"self_attn\.kv_proj", "attn.kv"),
    (_L + r"self_attn\.o_a_proj", "attn.o_a"),
    (_L + r"self_attn\.o_b_proj", "attn.o"),
    (_L + r"self_attn\.sinks", "attn.sink"),
    (_L + r"mlp\.gate", "moe.router"),
    (_L + r"mlp\.experts\.gate_up_proj", "moe.experts.gate"),  # fused gate+up; parts() splits it
    (_L + r"mlp\.experts\.down_proj", "moe.experts.down"),
    (_L + r"mlp\.shared_experts\.(?P<p>gate|up|down)_proj", "moe.shared.{p}"),
]]
_SUFFIX = re.compile(r"\.weight$")
_EXPERTS = re.compile(r"(?P<module>" + _L + r"mlp\.experts)\.(?P<param>gate_up_proj|down_proj)")


def mhc_component(name: str, num_layers: int | None = None) -> ComponentRef | None:
    """Component and layer of a module / parameter / checkpoint tensor name (None: not a part).  The final
    norm and the head's mapping parameters get layer ``num_layers`` (after the last layer)."""
    for candidate in (name, _SUFFIX.sub("", name)):
        for pattern, comp in _RULES:
            m = pattern.fullmatch(candidate)
            if m is None:
                continue
            groups = m.groupdict()
            if "{p}" in comp:
                comp = comp.format(p=groups["p"])
            layer = int(groups["layer"]) if groups.get("layer") is not None else None
            if layer is None and comp in ("norm", "hc.fn"):
                layer = num_layers
            return ComponentRef(comp, layer)
    return None


# --------------------------------------------------------------------------- parts
class ExpertSlice:
    """Stands in for one routed expert's gate, up or down matrix inside DeepSeek-V4's fused 3-D expert
    Parameters: ``.weight`` is a view of the rows of that expert (one cached view, so writes through
    ``weight.data`` land in the fused Parameter and the view keeps one identity for the plan)."""

    def __init__(self, module, param: str, index: tuple):
        self._module, self._param, self._index = module, param, index
        self._view = getattr(module, param).data[index]

    @property
    def weight(self):
        return self._view

    @weight.setter
    def weight(self, value):  # a rewrite (e.g. untying) copies into the fused Parameter
        self._view.copy_(value.data if hasattr(value, "data") else value)

    def __repr__(self) -> str:
        return f"ExpertSlice({self._param}{list(self._index)})"


def _expert_parts(module, mname: str, param: str, layer: int) -> Iterator[FamilyPart]:
    w = getattr(module, param)
    n_exp = w.shape[0]
    if param == "down_proj":
        for e in range(n_exp):
            yield FamilyPart(f"{mname}.down_proj[{e}]", ComponentRef("moe.experts.down", layer, e), "weight",
                          ExpertSlice(module, param, (e,)))
        return
    inter = w.shape[1] // 2  # gate rows first, then up (DeepseekV4Experts._apply_gate: chunk(2))
    for e in range(n_exp):
        for comp, rows in (("moe.experts.gate", slice(0, inter)), ("moe.experts.up", slice(inter, 2 * inter))):
            yield FamilyPart(f"{mname}.gate_up_proj[{e},{rows.start}:{rows.stop}]", ComponentRef(comp, layer, e),
                          "weight", ExpertSlice(module, param, (e, rows)))


def mhc_parts(model) -> Iterator[FamilyPart]:
    """Every parameter (routed experts: per expert and matrix, ``holder`` an :class:`ExpertSlice`), then every
    computation hook."""
    from ..model.modeling_attnres import Attention
    from .mhc_modeling import HyperConnection, HyperHead

    L = model.config.num_hidden_layers
    modules = dict(model.named_modules())
    for pname, _ in model.named_parameters():
        m = _EXPERTS.fullmatch(pname)
        if m is not None:
            yield from _expert_parts(modules[m["module"]], m["module"], m["param"], int(m["layer"]))
            continue
        ref = mhc_component(pname, L)
        if ref is None:
            raise ValueError(f"mHC-family parameter {pname!r} has no component")
        yield FamilyPart(pname, ref, "weight")
    for mname, module in model.named_modules():
        if isinstance(module, HyperConnection):
            layer = int(mname.split(".")[2])
            for comp in HC_COMPUTE:
                yield FamilyPart(mname, ComponentRef(comp, layer), "compute")
        elif isinstance(module, HyperHead):
            for comp in ("hc.pre", "hc.streams"):  # the head collapses only
                yield FamilyPart(mname, ComponentRef(comp, L), "compute")
        elif isinstance(module, Attention):
            yield FamilyPart(mname, ComponentRef("attn.kv_cache", module.layer_idx), "compute")


# --------------------------------------------------------------------------- precision hooks
def _map_compute(compute: str | None):
    """None / torch dtype / logit quantizer for a map's ``compute`` precision."""
    import torch

    from ..quant.rtn import fake_quantize_fp8, fake_quantize_per_token

    if compute in (None, "fp32"):
        return None
    floats = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if compute in floats:
        return floats[compute]
    if compute == "fp8":
        return lambda x: fake_quantize_fp8(x, per_token=False)
    if compute == "int8":  # symmetric, one scale per token over the map's logits
        return lambda x: fake_quantize_per_token(x, "int8")
    if compute == "fp8_e5m2":
        from ..quant.formats import E5M2LogitQuantizer

        return E5M2LogitQuantizer()
    raise ValueError(f"unknown hc compute precision {compute!r}")


def _compute_hook(map_name: str) -> PrecisionHook:
    def apply(module, compute, _model_dtype) -> None:
        module.compute = {**module.compute, map_name: _map_compute(compute)}

    def row(compute, _mdtype):
        prec = compute or "fp32"
        return prec, ("per-token" if prec == "int8" else "elementwise"), prec == "fp32"

    return PrecisionHook("compute", f".{map_name}", row, apply)


def _apply_streams(module, storage, model_dtype) -> None:
    from ..quant.depth import storage_quantizer

    module.stream_quantizer = storage_quantizer(storage, model_dtype)


def _streams_row(storage, mdtype):
    from ..quant.formats import storage_granularity

    prec = storage or mdtype
    gran = "per-token-stream" if prec in ("int8", "int4", "fp8") else storage_granularity(prec)
    return prec, gran, prec in (mdtype, "fp32")


HOOKS = {"hc.pre": _compute_hook("pre"), "hc.post": _compute_hook("post"), "hc.comb": _compute_hook("comb"),
         "hc.streams": PrecisionHook("storage", ".streams", _streams_row, _apply_streams)}


# --------------------------------------------------------------------------- config / loading
def _read_config(directory: Path, where: str) -> dict:
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise UserError("The checkpoint has no config.json", where=where,
                        fix="point at a checkpoint directory (config.json + safetensors)")
    with open(cfg_file, encoding="utf-8") as fh:
        return json.load(fh)


_DROP = ("auto_map", "architectures", "transformers_version", "torch_dtype", "dtype", "model_type")


def build_config(config: dict):
    """Our ``MHCConfig`` or transformers' ``DeepseekV4Config`` from a config.json dict (UserError if invalid)."""
    fields = {k: v for k, v in config.items() if k not in _DROP}
    mt = config.get("model_type")
    try:
        if mt == "attnres_mhc":
            from .mhc_modeling import MHCConfig

            return MHCConfig(**fields)
        if mt == "deepseek_v4":
            from transformers import DeepseekV4Config

            return DeepseekV4Config(**fields)
    except (TypeError, ValueError) as exc:
        raise UserError(f"The {mt} config could not be read ({str(exc).splitlines()[0][:300]})",
                        where="config.json", fix="check the config fields (docs/residual_designs.md)") from None
    raise UserError(f"model_type {mt!r} is not an mHC model", where="config.json",
                    fix=f"this loader reads model_type {' or '.join(MODEL_TYPES)}")


def family_name(config: dict) -> str:
    return "attnres-mhc" if config.get("model_type") == "attnres_mhc" else f"{config.get('model_type')}-mhc"


def check_config(config: dict, where: str) -> tuple[str, str, int | None, list[str]]:
    """(model_type, family, block size (None: no depth path), notes) of an mHC config.json."""
    build_config(config)
    notes = []
    if config.get("auto_map"):
        notes.append(f"{where}: config.json names remote code (auto_map); it is not run: the mHC family runs on "
                     "attnres_quant's model or transformers' own DeepSeek-V4 classes")
    return config.get("model_type"), family_name(config), None, notes


def _model_class(model_type: str):
    if model_type == "attnres_mhc":
        from .mhc_modeling import MHCForCausalLM

        return MHCForCausalLM
    from transformers import DeepseekV4ForCausalLM

    return DeepseekV4ForCausalLM


def structure(config: dict, dtype: Any = "bfloat16"):
    """The model on the meta device (no weights), in the dtype ``load_mhc`` would give it."""
    import torch

    cfg = build_config(config)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model_class(config.get("model_type"))(cfg)
    torch_dtype = _torch_dtype(dtype) or _torch_dtype(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    model = model.to(torch_dtype)
    if config.get("model_type") == "deepseek_v4":
        _keep_fp32_as_transformers(model)
        _norms_in_model_dtype(model, torch_dtype)
        from .mhc_modeling import attach_hc_hooks

        attach_hc_hooks(model)
    return model.eval()


def _keep_fp32_as_transformers(model) -> None:
    """The skeleton's dtypes as ``from_pretrained`` gives them: DeepSeek-V4's ``_keep_in_fp32_modules_strict`` (the
    mHC sites and head, sinks, position biases, router bias, norms) stay fp32 whatever the load dtype."""
    import torch

    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and keep & set(name.split(".")):
                t.data = t.data.float()


def _norms_in_model_dtype(model, dtype) -> bool:
    """Hold DeepSeek-V4's RMSNorm weights in the model dtype when it is not fp32.

    transformers keeps them fp32, and ``DeepseekV4RMSNorm`` returns ``weight * x`` -- fp32 -- which then meets
    bf16 projections (q_a_proj after input_layernorm, q_b_proj after q_a_norm, lm_head after the final norm) and
    fails: transformers 5.17's own DeepSeek-V4 cannot run a bf16 forward on CPU.  With the weight in the model
    dtype the norm still computes its statistics in fp32 and returns the model dtype.  Returns whether any
    weight was cast."""
    import torch
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

    if dtype in (None, torch.float32):
        return False
    cast = False
    for module in model.modules():
        if isinstance(module, DeepseekV4RMSNorm) and module.weight.dtype != dtype:
            module.to(dtype)
            cast = True
    return cast


def load_mhc(path: str | Path, *, dtype: Any = "bfloat16", device: Any = "cpu"):
    """Load an ``attnres_mhc`` or ``deepseek_v4`` checkpoint directory; returns ``(model, notes)``."""
    directory = Path(path)
    where = f"model path {str(path)!r}"
    raw = _read_config(directory, where)
    build_config(raw)  # a clear error before transformers reads it
    torch_dtype = _torch_dtype(dtype)
    cls = _model_class(raw.get("model_type"))
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = cls.from_pretrained(str(directory), dtype=torch_dtype or "auto", local_files_only=True,
                                              use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise UserError(f"The checkpoint could not be loaded ({type(exc).__name__}: {detail[:300]})", where=where,
                        fix="check that the weights are complete safetensors and belong to config.json") from None
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "wrong-shape")):
        keys = sorted(k[0] if isinstance(k, tuple) else k for k in (info.get(key) or []))
        if keys:
            problems.append(f"{what} weights {', '.join(keys[:5])}" + (f" and {len(keys) - 5} more"
                                                                       if len(keys) > 5 else ""))
    if problems:
        raise UserError("The mHC checkpoint does not match its config: " + "; ".join(problems), where=where,
                        fix="check that config.json belongs to these weights")
    if raw.get("model_type") == "deepseek_v4":
        from .mhc_modeling import attach_hc_hooks

        if _norms_in_model_dtype(model, torch_dtype or model.model.embed_tokens.weight.dtype):
            notes.append("DeepSeek-V4 RMSNorm weights are held in the model dtype (transformers keeps them fp32, "
                         "which makes its own bf16 forward fail on fp32 norm outputs meeting bf16 projections); the "
                         "norm statistics stay fp32")
        attach_hc_hooks(model)
        notes.append("DeepSeek-V4 loaded with transformers' classes; its mHC sites run through attnres_quant's "
                     "HyperConnection (same parameters and arithmetic) so hc.* precision hooks attach; "
                     "multi-token-prediction (mtp.*) tensors, if any, are not loaded")
    return model.to(device).eval(), notes


def is_mhc_model(model) -> bool:
    from .mhc_modeling import MHCForCausalLM

    if isinstance(model, MHCForCausalLM):
        return True
    return type(model).__name__ == "DeepseekV4ForCausalLM"


def describe(model) -> dict:
    """Family label (``attnres-mhc``, ``deepseek_v4-mhc``), no depth block, and the mHC extras."""
    cfg = model.config
    mt = getattr(cfg, "model_type", "")
    return {"model_type": mt, "family": family_name({"model_type": mt}), "block_size": None, "residual": "mhc",
            "hc_mult": int(cfg.hc_mult), "hc_sinkhorn_iters": int(cfg.hc_sinkhorn_iters), "hc_eps": float(cfg.hc_eps),
            "num_experts": getattr(cfg, "n_routed_experts", None),
            "load_notes": list(getattr(model, "_load_notes", []))}


METHODS = ("none", "rtn")


def method_problem(method: str, options: dict | None = None) -> str | None:
    if method in METHODS:
        return None
    return (f"method {method!r} is not wired for the mHC family yet (only rtn and none are tested on it: the "
            "fused DeepSeek-V4 experts are not nn.Linear modules and the other methods' pipelines are untested "
            "on mHC streams)")


# --------------------------------------------------------------------------- memory per token
STORAGE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}


def residual_bytes_per_token(hidden: int, vectors: int, precision: str = "bf16", *, scale_bytes: int = 2) -> float:
    """Bytes per token of ``vectors`` residual vectors of width ``hidden`` held between sub-layers, at a storage
    precision; int8 / int4 / fp8 add one scale (``scale_bytes``) per vector (per token and stream / source)."""
    bits = STORAGE_BITS[precision]
    scales = vectors * scale_bytes if precision in ("fp8", "int8", "int4") else 0
    return vectors * hidden * bits / 8 + scales


# --------------------------------------------------------------------------- registry adapters
def _check_config(config: dict, where: str, trust_remote_code: bool):
    return check_config(config, where)  # never runs remote code: trust_remote_code is irrelevant


def _structure(directory: Path, config: dict, dtype: str, trust_remote_code: bool):
    return structure(config, dtype)


def _load(src, directory: Path, trust_remote_code: bool):
    """``(model, tokenizer)``; the loader's notes are kept on the model (``describe`` reports them)."""
    model, notes = load_mhc(directory, dtype=src.dtype, device=src.device)
    model._load_notes = list(notes)
    return model, hf.load_tokenizer(src, directory, trust_remote_code, f"model path {src.spec!r}")


def _handles_model(model) -> bool:
    if not type(model).__name__.startswith(("MHC", "DeepseekV4")):  # cheap: no modelling import otherwise
        return False
    return is_mhc_model(model)


FAMILY = Family(
    name="mhc", model_types=MODEL_TYPES, components=COMPONENTS, compute_components=COMPUTE_COMPONENTS,
    handles_model=_handles_model, check_config=_check_config, tokenizer_status=hf.tokenizer_status,
    structure=_structure, load=_load, describe=describe, parts=mhc_parts, component=mhc_component,
    default_keep=DEFAULT_KEEP, method_problem=method_problem, hooks=HOOKS, keep_reason=KEEP_REASON,
)

__all__ = ["FAMILY", "MODEL_TYPES", "COMPONENTS", "WEIGHT_COMPONENTS", "COMPUTE_COMPONENTS", "HC_COMPUTE",
           "DEFAULT_KEEP", "HOOKS", "mhc_component", "mhc_parts", "load_mhc", "structure", "check_config",
           "build_config", "describe", "residual_bytes_per_token", "ExpertSlice"]
