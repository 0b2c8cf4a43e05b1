"""Apply a variant to a fresh copy of the baseline: ``quantize(model, variant, calibration)``."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .depth import kv_granularity, set_kv_cache, set_softmax, set_sources, set_state
from .plan import Plan, resolve_plan
from .formats import add_activation_quantizer as add_format_activation_quantizer
from .formats import fake_quantize_weight as fmt_fake_quantize_weight
from .policy import FLOAT_WEIGHTS, FP_FORMATS, QUANT_ACTIVATIONS, Variant
from .rtn import add_activation_quantizer, fake_quantize_weight_

_FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class QuantizedModel:
    model: nn.Module
    plan: Plan
    simulated: bool  # True when the quantized Linear layers are simulated (quantize-dequantize)
    kernel: str  # e.g. "simulated-rtn", "simulated-gptq", "bitsandbytes-nf4", "torchao-int8-dynamic"
    weight_bytes: int  # bytes of weights as stored (packed int4 = 0.5 byte/weight + scales)
    avg_bits: float  # bits per weight incl. scale overhead
    simulated_parts: list[str] = field(default_factory=list)  # simulated pieces inside a real-kernel variant
    notes: list[str] = field(default_factory=list)
    # Method records (JSON-ready): awq {smoothed, mean_layer_error, ...}, gguf {fallbacks, bytes},
    # kv_cache {precision, granularity, bytes_per_token, baseline_bytes_per_token}.
    details: dict = field(default_factory=dict)

    def plan_summary(self) -> dict:
        """JSON-ready record for results.json: summary, kernel, simulated flag, notes and plan rows."""
        return {**self.plan.summary(), "weight_bytes": self.weight_bytes, "avg_bits": self.avg_bits,
                "simulated": self.simulated, "kernel": self.kernel, "simulated_parts": self.simulated_parts,
                "notes": self.notes, "details": self.details, "rows": [r.as_dict() for r in self.plan.rows]}

    def info(self) -> dict:
        return {"variant": self.plan.variant.name, "method": self.plan.variant.method, "simulated": self.simulated,
                "kernel": self.kernel, "weight_bytes": self.weight_bytes, "avg_bits": self.avg_bits,
                "simulated_parts": self.simulated_parts, "notes": self.notes, "details": self.details}


def calibration_batches(tokenizer=None, samples: int = 16, seq_len: int = 256, seed: int = 0, *,
                        vocab_size: int | None = None) -> torch.Tensor:
    """Calibration token ids [samples, seq_len] for GPTQ / static activation scales.

    With a tokenizer: the tiny models' own training mix, never evaluation text -- half the rows are
    one window from each of a seeded sample of stdlib *train*-split files, the rest come from
    shuffled proxy-task *training* items of every family. Without one: seeded random tokens over
    ``vocab_size``.
    """
    if tokenizer is None:
        if vocab_size is None:
            raise ValueError("calibration_batches needs a tokenizer or vocab_size")
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (samples, seq_len), generator=g)
    import random

    from ..data.corpus import proxy_train_texts, stdlib_files

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    half = samples // 2
    rows: list[list[int]] = []
    files = stdlib_files("train")
    for _, path in random.Random(seed).sample(files, min(len(files), 4 * half)):
        ids = encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= seq_len and len(rows) < half:
            rows.append(ids[:seq_len])
    n_items = 4 * samples
    while len(rows) < samples:
        proxy = encode("\n\n".join(proxy_train_texts(n_items, seed=seed)))
        windows = [proxy[i:i + seq_len] for i in range(0, len(proxy) - seq_len + 1, seq_len)]
        if len(windows) >= samples - len(rows) or n_items > 100_000:
            rows += windows[: samples - len(rows)]
            break
        n_items *= 4
    if len(rows) < samples:
        raise ValueError(f"could not build {samples} calibration rows of {seq_len} tokens")
    return torch.tensor(rows, dtype=torch.long)


def as_batches(calibration, vocab_size: int, n: int = 8, seq_len: int = 64, seed: int = 0,
               device=None) -> tuple[list[torch.Tensor], str | None]:
    """Normalise calibration input to a list of LongTensor [B, T]; random tokens when None."""
    note = None
    if calibration is None:
        calibration = calibration_batches(None, n, seq_len, seed, vocab_size=vocab_size)
        note = (f"no calibration data given: {n} random token sequences of length {seq_len} were used "
                "(pass calibration=token ids for meaningful GPTQ/static scales)")
    if isinstance(calibration, torch.Tensor):
        batches = [calibration if calibration.dim() == 2 else calibration.unsqueeze(0)]
    else:
        batches = []
        for item in calibration:
            if isinstance(item, dict):
                item = item["input_ids"]
            t = torch.as_tensor(item)
            batches.append(t if t.dim() == 2 else t.unsqueeze(0))
    if device is not None:
        batches = [b.to(device) for b in batches]
    return batches, note


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def _run(model: nn.Module, batches: list[torch.Tensor]) -> None:
    for b in batches:
        model(input_ids=b, use_cache=False)


def _untie(model: nn.Module, plan: Plan) -> None:
    """Give a tensor its own storage when two rows share it but get different treatment."""
    seen: set[int] = set()
    for row in plan.weight_rows():
        w = row.part.module.weight
        ptr = id(w)
        if ptr in seen and row.tied_to is None:
            row.part.module.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            if hasattr(model.config, "tie_word_embeddings"):
                model.config.tie_word_embeddings = False
        seen.add(ptr)


def quantize(model: nn.Module, variant: Variant, calibration=None, *, source: str = "config",
             inplace: bool = False) -> QuantizedModel:
    """Quantize a fresh deep copy of ``model`` (the baseline is never touched) according to ``variant``.

    ``calibration``: token ids (LongTensor [N, T], a list of them, or dicts with ``input_ids``) for GPTQ
    and static activation scales; random tokens (and a note) when None and needed.
    """
    base_plan = resolve_plan(model, variant, source)  # every policy error before any model work
    method = variant.method
    from .methods import check_can_run

    check_can_run(base_plan, _device(model), f"{source}, variant {variant.name!r}")  # method x device
    base_weight_rows = [r for r in base_plan.weight_rows() if r.tied_to is None]
    needs_calib = any(r.method in ("gptq", "awq") for r in base_weight_rows) or any(
        (r.resolved.activation in ("int8", "int4", "fp8") and r.resolved.activation_scheme == "static")
        or r.resolved.activation == "nvfp4"
        for r in base_weight_rows if r.part.is_linear)
    batches: list[torch.Tensor] = []
    notes: list[str] = []
    if needs_calib:
        batches, note = as_batches(calibration, int(model.config.vocab_size), device=_device(model))
        if note:
            notes.append(note)
    details: dict = {}

    # 0. AWQ (llm-compressor) works on its own float32 copy of the *baseline* (full-precision depth path,
    # no hooks yet), and returns it: that copy is the quantized model (``inplace`` does not apply).
    awq_names = {r.part.name for r in base_weight_rows if r.method == "awq"}
    if awq_names:
        from .awq import apply_awq

        r0 = next(r for r in base_weight_rows if r.method == "awq")
        opts = variant.options
        targets = [n for n, _ in model.named_modules() if n in awq_names]  # (module order)
        res = apply_awq(model, batches, bits=r0.precision, group_size=r0.resolved.group_size,
                        symmetric=bool(r0.resolved.symmetric), targets=targets,
                        duo_scaling=opts.get("duo_scaling", True), n_grid=int(opts.get("n_grid", 20)),
                        measure=bool(opts.get("measure", True)))
        qmodel = res.model
        details["awq"] = {"quantized": len(res.quantized), "smoothed": list(res.smoothed),
                          "mean_layer_error": res.mean_layer_error() if res.layer_errors else None,
                          "sublayer_errors": res.sublayer_errors, "bits": res.bits, "group_size": res.group_size,
                          "symmetric": res.symmetric}
        msg = (f"awq (llm-compressor AWQModifier, basic pipeline): {len(res.quantized)} projections quantized, "
               f"{len(res.smoothed)} smoothing mappings applied")
        if res.layer_errors:
            msg += f", mean relative layer-output error {res.mean_layer_error():.3g} on the calibration data"
        notes.append(msg)
    else:
        qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()
    plan = resolve_plan(qmodel, variant, source)
    mdtype = _model_dtype(qmodel)
    notes = list(plan.notes) + notes
    simulated_parts: list[str] = []
    _untie(qmodel, plan)
    kv_gran = kv_granularity(variant.options)

    # 1. depth path and KV cache hooks (simulated; set first so calibration sees them). A family's own
    # computations carry their PrecisionHook (Family.hooks, e.g. mHC's hc.*); the standard setters below
    # serve DepthMixer / kv_quantizer / state_quantizer.
    for row in plan.rows:
        if row.is_weight:
            continue
        res, module = row.resolved, row.part.module
        if row.part.hook is not None:
            row.part.hook.apply(module, getattr(res, row.part.hook.field), mdtype)
        elif row.component == "depth.softmax":
            set_softmax(module, res.compute)
        elif row.component == "depth.sources":
            set_sources(module, res.storage, mdtype)
        elif row.component == "attn.kv_cache":
            set_kv_cache(module, res.storage, mdtype, kv_gran)
        elif row.component == "attn.state":
            set_state(module, res.storage)
        if row.method == "sim":
            simulated_parts.append(f"{row.component}@{row.name}={row.precision}")

    kv = _kv_details(qmodel, plan, kv_gran)
    if kv:
        details["kv_cache"] = kv
    weight_rows = [r for r in plan.weight_rows() if r.tied_to is None]

    # 2. GPTQ (llm-compressor) on the Linear rows that ask for it.
    gptq_groups: dict[tuple, list[str]] = {}
    for r in weight_rows:
        if r.method == "gptq":
            key = (r.precision, r.resolved.group_size if r.resolved.group_size and
                   r.resolved.group_size < r.part.shape[-1] else None, bool(r.resolved.symmetric))
            gptq_groups.setdefault(key, []).append(r.part.name)
    if gptq_groups:
        from .gptq import gptq_quantize

        opts = variant.options
        steps = gptq_layer_groups(gptq_groups) if opts.get("layerwise", True) else [gptq_groups]
        for groups in steps:
            with _calibration_context(qmodel):  # Kimi: every routed expert sees every calibration token
                gptq_quantize(qmodel, groups, batches, block_size=int(opts.get("block_size", 128)),
                              dampening=float(opts.get("dampening", 0.01)), actorder=opts.get("actorder", "static"))

    # 2b. GGUF (llama.cpp types) on the rows that ask for it; llama.cpp's fallback where rows do not fit.
    gguf_bytes = None
    gguf_rows = [r for r in weight_rows if r.method == "gguf"]
    if gguf_rows:
        from .gguf_quant import apply_gguf

        report = apply_gguf(qmodel, {r.part.name: (r.fallback or r.precision) for r in gguf_rows}, fallback=True)
        for r in gguf_rows:
            got = report[r.part.name]["type"].lower()
            if got != ("f16" if r.precision == "fp16" else r.precision):
                raise RuntimeError(f"gguf: {r.name} became {got}, the plan says {r.precision}")
        gguf_bytes = sum(v["bytes"] for v in report.values())
        planned = sum(r.numel * r.bits for r in gguf_rows) / 8
        details["gguf"] = {"bytes": int(gguf_bytes),
                           "fallbacks": {f"{r.part.name}.weight": {"requested": r.fallback, "type": r.precision}
                                         for r in gguf_rows if r.fallback}}
        gguf_bytes = gguf_bytes - planned

    # 3. RTN / float casts (nvfp4: q/k/v and gate/up share one global scale, as llm-compressor fuses them).
    from .formats import fused_global_amax

    nv_amax = fused_global_amax({r.part.name: r.part.module.weight.data for r in weight_rows
                                 if r.method == "rtn" and r.precision == "nvfp4"})
    with torch.no_grad():
        for r in weight_rows:
            w = r.part.module.weight
            if r.method == "cast":
                w.data.copy_(w.data.to(_FLOAT[r.precision]).to(w.dtype))
            elif r.method == "rtn" and r.precision in FP_FORMATS:  # quant/formats.py (compressed-tensors' arithmetic)
                w.data.copy_(fmt_fake_quantize_weight(w.data, r.precision, r.resolved.group_size,
                                                      global_amax=nv_amax.get(r.part.name)))
            elif r.method == "rtn":  # in place, a block of rows at a time: bounded float32 temporaries
                fake_quantize_weight_(w.data, r.precision, r.resolved.group_size, bool(r.resolved.symmetric))
            if r.method in ("cast", "rtn") and method in ("bnb", "torchao"):
                simulated_parts.append(f"{r.name}={r.precision}")

    # 4. Activation quantizers (simulated) on Linear inputs; static scales from calibration.
    static = []
    for r in plan.weight_rows():
        a = r.resolved.activation
        if r.part.is_linear and a in QUANT_ACTIVATIONS and method in ("rtn", "gptq"):
            add = add_activation_quantizer if a in ("int8", "int4") else add_format_activation_quantizer
            q = add(r.part.module, a, r.resolved.activation_scheme)
            if q.observing:  # static scales (and nvfp4's global scale) come from calibration
                static.append(q)
    if static:
        with _calibration_context(qmodel):  # Kimi: every routed expert observes every calibration token
            _run(qmodel, batches)
        for q in static:
            q.freeze()

    # 5. Real kernels.
    kernel = {"none": "none", "rtn": "simulated-rtn", "gptq": "simulated-gptq", "awq": "simulated-awq",
              "gguf": "simulated-gguf"}.get(method, "")
    weight_bytes = plan.summary()["weight_bytes"]
    if gguf_bytes is not None:  # measured packed bytes (equal to the plan's bits by construction)
        weight_bytes = int(round(weight_bytes + gguf_bytes))
    if method == "bnb":
        from .bnb import apply_bnb

        targets = {r.part.name: (r.precision, r.resolved.group_size) for r in weight_rows if r.method == "bnb"}
        real = apply_bnb(qmodel, targets, threshold=float(variant.options.get("threshold", 6.0)))
        planned = sum(r.numel * r.bits for r in weight_rows if r.method == "bnb") / 8
        weight_bytes = int(weight_bytes - planned + real)
        kinds = sorted({p for p, _ in targets.values()})
        kernel = "bitsandbytes-" + "+".join(kinds) if kinds else "none"
    elif method == "torchao":
        from .torchao_method import apply_torchao

        targets = {r.part.name: (r.precision, r.resolved.activation, r.resolved.group_size)
                   for r in weight_rows if r.method == "torchao"}
        kinds = apply_torchao(qmodel, targets)
        kernel = "torchao-" + "+".join(sorted(kinds)) if kinds else "none"
    if kernel == "none" and simulated_parts:
        kernel = "simulated-depth"
    simulated = method in ("rtn", "gptq", "awq", "gguf") or (method == "none" and bool(simulated_parts))
    if method in ("bnb", "torchao") and simulated_parts:
        notes.append("simulated inside a real-kernel variant: " + ", ".join(simulated_parts[:8]) +
                     (" ..." if len(simulated_parts) > 8 else ""))
    s = plan.summary()
    return QuantizedModel(qmodel, plan, simulated, kernel, int(weight_bytes), float(s["avg_bits"]),
                          simulated_parts, notes, details)


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def gptq_layer_groups(groups: dict[tuple, list[str]]) -> list[dict[tuple, list[str]]]:
    """Split GPTQ targets into one llm-compressor run per decoder layer, **last layer first**.

    The ``basic`` pipeline keeps a Hessian (4 * in_features^2 bytes) for every target at once -- more
    than the model itself for a whole network. Quantizing one layer per run, from the output end, keeps
    one layer's Hessians, and every layer is still calibrated on the outputs of full-precision layers
    below it: the same Hessians, hence the same weights, as one run over everything. Targets outside
    the decoder layers run first when they are the output head (``lm_head``, downstream of every layer);
    any other such target (its position in the network unknown) keeps the single run.
    """
    by_layer: dict[int, dict[tuple, list[str]]] = {}
    head: dict[tuple, list[str]] = {}
    for key, names in groups.items():
        for name in names:
            m = _LAYER_INDEX.search(name)
            if m:
                by_layer.setdefault(int(m.group(1)), {}).setdefault(key, []).append(name)
            elif name.split(".")[-1] == "lm_head":
                head.setdefault(key, []).append(name)
            else:
                return [groups]
    return ([head] if head else []) + [by_layer[i] for i in sorted(by_layer, reverse=True)]


def _calibration_context(model: nn.Module):
    """The architecture family's calibration mode (Kimi: calibrate all routed experts), else a no-op."""
    import contextlib

    from ..architectures import family_for_model

    fam = family_for_model(model)
    ctx = getattr(fam, "calibration_context", None) if fam is not None else None
    return ctx(model) if ctx is not None else contextlib.nullcontext()


def _kv_details(model: nn.Module, plan: Plan, granularity: str) -> dict:
    """KV-cache bytes per token of context (all layers) as planned, and at the baseline dtype."""
    rows = [r for r in plan.rows if r.component == "attn.kv_cache"]
    if not rows or not any(r.method == "sim" for r in rows):
        return {}
    from .kv_cache import kv_cache_bytes_per_token

    cfg = model.config
    from ..architectures import family_for_model

    latent = family_for_model(model).kv_cache_bytes
    if latent is not None:  # a family's own cache layout (Kimi: the MLA latent cache)
        n_mla = len(rows)
        return {"precisions": sorted({r.precision for r in rows}), "granularity": granularity, "cache": "mla latent",
                "bytes_per_token": sum(latent(cfg, r.precision, granularity) / n_mla for r in rows),
                "baseline_bytes_per_token": latent(cfg, plan.model_dtype, granularity)}
    n = int(cfg.num_hidden_layers)
    per_layer = [kv_cache_bytes_per_token(cfg, r.precision, granularity) / n for r in rows]
    return {"precisions": sorted({r.precision for r in rows}), "granularity": granularity,
            "bytes_per_token": sum(per_layer),
            "baseline_bytes_per_token": kv_cache_bytes_per_token(cfg, plan.model_dtype, granularity)}


def layer_output_error(baseline: nn.Module, quantized: nn.Module, batches: list[torch.Tensor],
                       names: list[str] | None = None) -> dict[str, float]:
    """Relative squared error ||W'x - Wx||^2 / ||Wx||^2 of every Linear (or ``names``) on the
    baseline's own inputs to that Linear (so errors do not compound across layers)."""
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    base_mods = dict(baseline.named_modules())
    q_mods = dict(quantized.named_modules())
    names = names or [n for n, m in base_mods.items() if isinstance(m, nn.Linear) and n in q_mods]
    for n in names:
        hooks.append(base_mods[n].register_forward_pre_hook(
            lambda m, args, n=n: inputs.setdefault(n, []).append(args[0].detach())))
    try:
        _run(baseline, batches)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    with torch.no_grad():
        for n in names:
            if n not in inputs:  # not called as a module (e.g. pseudo-queries)
                continue
            num = den = 0.0
            for x in inputs.get(n, []):
                ref = base_mods[n](x).float()
                got = q_mods[n](x).float()
                num += (got - ref).pow(2).sum().item()
                den += ref.pow(2).sum().item()
            out[n] = num / den if den else 0.0
    return out


__all__ = ["QuantizedModel", "quantize", "calibration_batches", "as_batches", "layer_output_error"]
