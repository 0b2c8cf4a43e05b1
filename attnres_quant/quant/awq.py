"""AWQ (activation-aware weight quantization) through llm-compressor's ``AWQModifier``.

``apply_awq(model, calibration_batches, bits=4, group_size=128, ...)`` returns an
:class:`AWQResult` holding a *copy* of the model whose targeted ``nn.Linear`` weights are
the dequantized (simulated) AWQ-int4/int8 weights and whose pre-norms carry the folded
AWQ scales, plus per-layer output errors on the calibration data.

How llm-compressor is driven (and why not ``oneshot``):

* llm-compressor 0.14's AWQ is the transform ``llmcompressor.modifiers.transform.awq.AWQModifier``
  (smoothing-scale grid search) followed by a ``QuantizationModifier`` (group-wise minmax
  int quantization). We run both through the library's own lifecycle -- the active
  ``CompressionSession`` (``initialize`` / ``finalize``) and its untraced ``basic``
  calibration pipeline -- i.e. exactly what ``oneshot(pipeline="basic")`` does after its
  pre-processing, minus that pre-processing: ``oneshot`` insists on a tokenizer/processor
  and re-reads the config from ``model.config.name_or_path`` (an in-memory model has
  none), neither of which a pre-tokenized study needs.
* The ``sequential`` pipeline cannot trace the AttnRes depth loop (data-dependent Python
  control flow); ``basic`` runs the model eagerly with hooks, which is all AWQ needs: it
  caches the inputs of each mapping's parent module (``attn`` / ``mlp``) and replays that
  module during the grid search.
* On a machine without an accelerator llm-compressor 0.14 pins cached activations with
  ``Tensor.pin_memory()``, which raises "Cannot access accelerator device when none is
  available"; we make ``IntermediatesCache.pin_memory`` a no-op while AWQ runs on CPU.

Smoothing points for AttnRes models (FLA names), per layer N:

* ``model.layers.N.attn_norm`` -> ``attn.q_proj``, ``attn.k_proj``, ``attn.v_proj``
* ``attn.v_proj`` -> ``attn.o_proj`` (only when num_kv_heads == num_heads; llm-compressor
  skips the pair when the shapes differ, e.g. under GQA)
* ``model.layers.N.mlp_norm`` -> ``mlp.gate_proj``, ``mlp.up_proj``
* ``mlp.up_proj`` -> ``mlp.down_proj``

The scale s (one per input channel) multiplies the balance layers' weight columns and
divides the smoothing layer's weight (norm gain / v_proj, up_proj rows): exact in full
precision. The depth mix happens *before* the pre-norm (x_j = sum_s alpha_s v_s, then
``attn_norm(x_j)``), and the pseudo-queries score the sources through their own key norms
(``attn_res_norm``/``mlp_res_norm``), so dividing ``attn_norm``/``mlp_norm`` by s leaves
the depth path's pseudo-queries, key norms, logits and softmax untouched (tests check the
depth parameters are bit-identical). The mappings come from the model's family in the
architecture registry (``Family.awq_mappings``): the reference family's are :data:`ATTNRES_MAPPINGS`;
the Kimi family's are per layer (``architectures.kimi.awq_mappings``); the Llama family uses
llm-compressor's own architecture mappings. The family's ``calibration_context`` (Kimi: every routed
expert sees every token) is active while the calibration data runs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

_TARGET_RE = re.compile(r"(^|\.)(q|k|v|o|gate|up|down)_proj$")

from ..architectures.reference import AWQ_MAPPINGS as ATTNRES_MAPPINGS  # noqa: E402  (the reference family's)


@dataclass
class AWQResult:
    """What :func:`apply_awq` (or :func:`apply_rtn_reference`) returns."""

    model: nn.Module  # the copy: plain nn.Linear layers with dequantized weights, smoothed norms
    quantized: list[str]  # names of the quantized Linear modules
    layer_errors: dict[str, float]  # per Linear: relative output MSE vs the baseline (calibration data)
    sublayer_errors: dict[str, float]  # per attn / mlp block: relative output MSE vs the baseline
    search: list[dict] = field(default_factory=list)  # llm-compressor's per-mapping grid-search record
    smoothed: list[str] = field(default_factory=list)  # smoothing layers whose scales were applied
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # smoothing layer -> AWQ scale s
    method: str = "awq"
    backend: str = "llm-compressor AWQModifier + QuantizationModifier (basic pipeline)"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    def mean_layer_error(self) -> float:
        v = list(self.layer_errors.values())
        return sum(v) / len(v) if v else float("nan")


# --------------------------------------------------------------------------- helpers
def _bits(bits) -> int:
    if isinstance(bits, str):
        bits = int(bits.lower().removeprefix("int"))
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"AWQ supports integer weights of 2/3/4/8 bits, got {bits}")
    return int(bits)


def default_targets(model: nn.Module, skip: Callable[[str], bool] | None = None) -> list[str]:
    """Names of the Linear layers AWQ quantizes by default: attention and MLP projections
    (``*.{q,k,v,o,gate,up,down}_proj``); never lm_head, embeddings or the depth pseudo-queries."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _TARGET_RE.search(name) and not (skip and skip(name)):
            out.append(name)
    return out


def _batches(calibration_batches) -> list[dict]:
    out = []
    items = [calibration_batches] if isinstance(calibration_batches, torch.Tensor) else calibration_batches
    for item in items:
        if isinstance(item, dict):
            ids = torch.as_tensor(item["input_ids"])
            extra = {k: v for k, v in item.items() if k == "attention_mask"}
        else:
            ids, extra = torch.as_tensor(item), {}
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        out.append({"input_ids": ids.long(), **extra, "use_cache": False})
    if not out:
        raise ValueError("AWQ needs calibration data: pass a non-empty list of token-id tensors [B, T]")
    return out


def _config_groups(model: nn.Module, names: list[str], bits: int, group_size: int | None, symmetric: bool):
    """compressed-tensors config groups; a layer whose input width is <= group_size is quantized
    per output channel (one group spans the whole row)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    modules = dict(model.named_modules())
    by_kind: dict[int | None, list[str]] = {}
    for n in names:
        cols = modules[n].in_features
        g = group_size if group_size and group_size < cols else None
        if g is not None and cols % g:
            raise ValueError(f"AWQ group_size {g} does not divide the input width {cols} of {n}; "
                             "choose a group size that divides every targeted layer's input width")
        by_kind.setdefault(g, []).append(n)
    groups = {}
    for i, (g, ns) in enumerate(sorted(by_kind.items(), key=lambda kv: kv[0] or 0)):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="group" if g else "channel", group_size=g)
        groups[f"group_{i}"] = QuantizationScheme(targets=[f"re:^{re.escape(n)}$" for n in ns], weights=args)
    return groups


def _strip(module: nn.Module) -> None:
    """compressed-tensors Linear (wrapped forward + scale/zero-point) -> plain nn.Linear."""
    module.__dict__.pop("forward", None)
    for attr in ("quantization_scheme", "quantization_status", "quantization_enabled", "weight_observer"):
        if attr in module.__dict__:
            delattr(module, attr)
        elif attr in getattr(module, "_modules", {}):
            del module._modules[attr]
    for pname in [n for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]:
        delattr(module, pname)
    for bname in [n for n, _ in module.named_buffers(recurse=False)]:
        if bname.startswith(("weight_", "input_", "output_")):
            delattr(module, bname)


@contextlib.contextmanager
def _quiet(enabled: bool):
    if not enabled:
        yield
        return
    from loguru import logger

    sink = io.StringIO()
    logger.disable("llmcompressor")
    logger.disable("compressed_tensors")
    try:
        with contextlib.redirect_stderr(sink):
            yield
    finally:
        logger.enable("llmcompressor")
        logger.enable("compressed_tensors")


@contextlib.contextmanager
def _cpu_pin_memory_workaround(model: nn.Module):
    """llm-compressor 0.14 pins cached activations even without an accelerator (which raises)."""
    from unittest import mock

    from llmcompressor.pipelines.cache import IntermediatesCache

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu or not torch.accelerator.is_available():
        with mock.patch.object(IntermediatesCache, "pin_memory", lambda self, *a, **k: None):
            yield
    else:
        yield


def _basic_calibration(model: nn.Module, loader, session) -> None:
    """llm-compressor's ``basic`` pipeline, with one fix: the sequential-epoch-end event (where
    AWQ smooths) fires while quantization is still disabled, as the ``sequential`` pipeline does.
    llm-compressor 0.14's BasicPipeline fires it after leaving ``DisableQuantization``, so AWQ's
    full-precision reference pass runs the balance Linears through fake quantization with
    weight qparams not yet computed (uninitialised memory: NaN or garbage, and the mapping is
    skipped or mis-scaled)."""
    from llmcompressor.core import LifecycleCallbacks
    from llmcompressor.utils import calibration_forward_context
    from llmcompressor.utils.helpers import DisableQuantization

    LifecycleCallbacks.calibration_start()
    with calibration_forward_context(model), DisableQuantization(model):
        for batch_idx, batch in enumerate(loader):
            session.state.current_batch_idx = batch_idx
            model(**batch)
        LifecycleCallbacks.sequential_epoch_end(list(model.modules()))
    LifecycleCallbacks.calibration_end()


def _run_llm_compressor(work: nn.Module, batches: list[dict], names: list[str], bits: int,
                        group_size: int | None, symmetric: bool, awq_kwargs: dict | None,
                        mappings, quiet: bool, original: nn.Module | None = None, context=None
                        ) -> tuple[list[dict], list[str], dict[str, torch.Tensor]]:
    """Run [AWQModifier] + QuantizationModifier on ``work`` in place through the session
    lifecycle and the basic pipeline; then replace every targeted Linear's weight by its
    dequantized value and strip the compressed-tensors wrappers."""
    from compressed_tensors.quantization import forward_quantize
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from torch.utils.data import DataLoader

    recipe = []
    awq = None
    if awq_kwargs is not None:
        from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier

        maps = None
        if mappings is not None:
            maps = [m if isinstance(m, AWQMapping) else AWQMapping(m[0], list(m[1])) for m in mappings]
        awq = AWQModifier(mappings=maps, **awq_kwargs)
        recipe.append(awq)
    recipe.append(QuantizationModifier(config_groups=_config_groups(work, names, bits, group_size, symmetric)))
    # The basic pipeline moves every batch value to the device (tensors only): use_cache goes
    # through the config instead, so cached parent-module kwargs never hold a KV cache.
    loader = DataLoader([{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches],
                        batch_size=None, shuffle=False)
    search, smoothed = [], []
    was_training = work.training
    old_use_cache = getattr(work.config, "use_cache", None)
    work.config.use_cache = False
    work.eval()
    with _quiet(quiet), _cpu_pin_memory_workaround(work):
        session = active_session()
        session.reset()
        try:
            session.initialize(model=work, start=-1, recipe=recipe, calib_data=loader)
            with context(work) if context is not None else contextlib.nullcontext():
                _basic_calibration(work, loader, session)
            if awq is not None:
                search = [dict(m) for m in awq._error_metrics]
                smoothed = [m["layer_name"] for m in search]
            session.finalize()
        finally:
            session.reset()
            work.train(was_training)
            work.config.use_cache = old_use_cache
    modules = dict(work.named_modules())
    scales = _recover_scales(original, work, search) if original is not None else {}
    with torch.no_grad():
        for n in names:
            m = modules[n]
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                raise RuntimeError(f"llm-compressor did not attach a quantization scheme to {n}")
            deq = forward_quantize(m, m.weight, "weight", scheme.weights)
            _strip(m)
            m.weight.data.copy_(deq.to(m.weight.dtype))
    for m in work.modules():
        # flags llm-compressor's DisableQuantization leaves on every module, and the instance
        # ``forward`` its disable_lm_head context restores as a bound copy of the class method
        m.__dict__.pop("quantization_enabled", None)
        fwd = m.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is type(m).forward and fwd.__self__ is m:
            del m.__dict__["forward"]
    if hasattr(work.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(work.config, "quantization_config")
    return search, smoothed, scales


@torch.no_grad()
def _recover_scales(original: nn.Module, work: nn.Module, search: list[dict]) -> dict[str, torch.Tensor]:
    """The per-channel AWQ scale s of every applied mapping, read back from the smoothed (not yet
    quantized) weights: a smoothing norm's gain became g / s; a smoothing Linear's output rows
    (v_proj, up_proj) became W / s, so its outputs are y / s."""
    orig = dict(original.named_modules())
    new = dict(work.named_modules())
    out = {}
    for rec in search:
        name = rec["layer_name"]
        w0 = orig[name].weight.detach().float()
        w1 = new[name].weight.detach().float()
        if w0.dim() == 1:  # a norm gain: g -> g / s
            s = torch.where(w1 != 0, w0 / w1, torch.ones_like(w0))
        else:
            # A smoothing Linear (v_proj, up_proj) may itself have been rescaled as a balance layer
            # (its input columns), so read s from its single balance layer (o_proj, down_proj),
            # whose input columns became W[:, c] * s_c.
            bal = rec.get("parent_name")
            if bal not in new or not isinstance(new[bal], nn.Linear):
                continue
            b0 = orig[bal].weight.detach().float()
            b1 = new[bal].weight.detach().float()
            den = (b0 * b0).sum(0)
            s = torch.where(den != 0, (b0 * b1).sum(0) / den.clamp_min(1e-30), torch.ones_like(den))
        out[name] = s.cpu()
    return out


def _prepare(model, calibration_batches, bits, group_size, symmetric, skip, targets):
    bits = _bits(bits)
    names = list(targets) if targets is not None else default_targets(model, skip)
    if targets is not None and skip is not None:
        names = [n for n in names if not skip(n)]
    if not names:
        raise ValueError("AWQ: no Linear layer selected for quantization")
    batches = _batches(calibration_batches)
    device = next(model.parameters()).device
    batches = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in batches]
    orig_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    work = copy.deepcopy(model).float()
    return bits, names, batches, orig_dtype, work


# --------------------------------------------------------------------------- public
def apply_awq(model: nn.Module, calibration_batches, *, bits: int | str = 4, group_size: int | None = 128,
              symmetric: bool = False, skip: Callable[[str], bool] | None = None,
              targets: Iterable[str] | None = None, duo_scaling: bool | str = True, n_grid: int = 20,
              mappings=None, measure: bool = True, quiet: bool = True) -> AWQResult:
    """AWQ weight quantization (simulated) of a copy of ``model``; ``model`` is not modified.

    Args:
        model: an ``AttnResForCausalLM`` (or a Llama-family HF model).
        calibration_batches: token ids -- a LongTensor [B, T], or a list of them / of dicts
            with ``input_ids`` (and optionally ``attention_mask``).
        bits: 4 or 8 (or ``"int4"``/``"int8"``); group_size: input channels per scale
            (``None`` = per output channel; a layer narrower than the group is per channel);
            symmetric: symmetric (no zero point) or asymmetric (AWQ's usual) integer grid.
        skip: predicate on a module name; True leaves that Linear unquantized (it may still be
            rescaled exactly by a smoothing mapping it balances). targets: explicit Linear names
            (default: every ``*.{q,k,v,o,gate,up,down}_proj``).
        duo_scaling, n_grid: llm-compressor's AWQ grid-search settings (s = mean|x|^a / mean|w|^(1-a)
            with duo scaling, s = mean|x|^a without; a on an n_grid-point grid over [0, 1]).
        mappings: (smooth_layer, [balance_layers]) pairs in llm-compressor syntax; default
            the model family's (``Family.awq_mappings``: :data:`ATTNRES_MAPPINGS` for AttnRes models,
            per-layer ones for Kimi, llm-compressor's own for the Llama family).
        measure: compute per-layer output errors on the calibration batches.

    The search runs in float32 on a copy; the result is cast back to ``model``'s dtype (the
    dequantized grid values then round once to bf16, as a bf16 W4A16 kernel would).
    """
    bits, names, batches, orig_dtype, work = _prepare(model, calibration_batches, bits, group_size,
                                                      symmetric, skip, targets)
    from ..architectures import family_for_model

    fam = family_for_model(model)
    if mappings is None:
        mappings = fam.awq_mappings(model)
    search, smoothed, scales = _run_llm_compressor(work, batches, names, bits, group_size, symmetric,
                                                   {"duo_scaling": duo_scaling, "n_grid": n_grid}, mappings,
                                                   quiet, original=model, context=fam.calibration_context)
    work = work.to(orig_dtype)
    out_scales = {n: s for n, s in scales.items() if n in names}
    layer_err, sub_err = (layer_output_errors(model, work, batches, names, output_scales=out_scales)
                          if measure else ({}, {}))
    return AWQResult(work, names, layer_err, sub_err, search, smoothed, scales, "awq", bits=bits,
                     group_size=group_size, symmetric=symmetric)


def apply_rtn_reference(model: nn.Module, calibration_batches, *, bits: int | str = 4,
                        group_size: int | None = 128, symmetric: bool = False,
                        skip: Callable[[str], bool] | None = None, targets: Iterable[str] | None = None,
                        measure: bool = True, quiet: bool = True) -> AWQResult:
    """The same llm-compressor group quantizer as :func:`apply_awq` without the AWQ scales
    (round-to-nearest, minmax per group): the like-for-like baseline for AWQ's gain."""
    bits, names, batches, orig_dtype, work = _prepare(model, calibration_batches, bits, group_size,
                                                      symmetric, skip, targets)
    _run_llm_compressor(work, batches, names, bits, group_size, symmetric, None, None, quiet)
    work = work.to(orig_dtype)
    layer_err, sub_err = (layer_output_errors(model, work, batches, names) if measure else ({}, {}))
    return AWQResult(work, names, layer_err, sub_err, [], [], {}, "rtn", backend="llm-compressor QuantizationModifier",
                     bits=bits, group_size=group_size, symmetric=symmetric)


# ------------------------------------------------------------------------ error metric
@torch.no_grad()
def layer_output_errors(base: nn.Module, quant: nn.Module, calibration_batches,
                        names: Iterable[str] | None = None,
                        output_scales: dict[str, torch.Tensor] | None = None
                        ) -> tuple[dict[str, float], dict[str, float]]:
    """Relative output MSE, sum ||y_q - y||^2 / sum ||y||^2 over the calibration tokens, of every
    named Linear and of every attention / MLP sub-layer block, **with the baseline's sub-layer
    inputs**: for AttnRes models each sub-layer j of both models is fed the baseline's depth mix
    x_j (captured at its pre-norm), so errors do not compound across layers and AWQ's folded
    norm scales are included. For other models both models run the same batches end to end
    (errors then include upstream propagation).

    ``output_scales`` maps a Linear that AWQ used as a smoothing layer (v_proj, up_proj: rows
    divided by s) to s; its quantized output is multiplied back by s before comparing.

    Returns (per-Linear errors, per-block errors keyed ``model.layers.N.attn`` / ``.mlp``).
    """
    output_scales = output_scales or {}
    batches = _batches(calibration_batches)
    device = next(base.parameters()).device
    batches = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in batches]
    names = list(names) if names is not None else default_targets(base)
    num: dict[str, float] = {}
    den: dict[str, float] = {}

    def acc(key, y, yq):
        y, yq = y.float(), yq.float()
        if key in output_scales:
            yq = yq * output_scales[key].to(yq.device)
        num[key] = num.get(key, 0.0) + float((yq - y).pow(2).sum())
        den[key] = den.get(key, 0.0) + float(y.pow(2).sum())

    def capture(model, store):
        hooks = []
        mods = dict(model.named_modules())
        for n in names:
            if n in mods:
                hooks.append(mods[n].register_forward_hook(
                    lambda _m, _a, out, n=n: store.__setitem__(n, out.detach())))
        return hooks

    inner_b = getattr(base, "model", None)
    inner_q = getattr(quant, "model", None)
    if inner_b is not None and hasattr(inner_b, "sublayers") and hasattr(inner_q, "sublayers"):
        subs_b = inner_b.sublayers()[:-1]
        subs_q = inner_q.sublayers()[:-1]
        mods_b = {id(m): n for n, m in base.named_modules()}
        for batch in batches:
            saved: dict[int, dict] = {}
            hooks = []
            for s in subs_b:
                hooks.append(s.pre_norm.register_forward_pre_hook(
                    lambda _m, a, k, j=s.index: saved.setdefault(j, {}).update(norm=(a, k)), with_kwargs=True))
                hooks.append(s.fn.register_forward_pre_hook(
                    lambda _m, a, k, j=s.index: saved.setdefault(j, {}).update(fn=(a, k)), with_kwargs=True))
            try:
                base(**batch)
            finally:
                for h in hooks:
                    h.remove()
            for sb, sq in zip(subs_b, subs_q):
                norm_args, norm_kwargs = saved[sb.index]["norm"]
                fn_args, fn_kwargs = saved[sb.index]["fn"]
                outs_b, outs_q = {}, {}
                hb, hq = capture(base, outs_b), capture(quant, outs_q)
                try:
                    yb = sb.fn(sb.pre_norm(*norm_args, **norm_kwargs), *fn_args[1:], **fn_kwargs)
                    yq = sq.fn(sq.pre_norm(*norm_args, **norm_kwargs), *fn_args[1:], **fn_kwargs)
                finally:
                    for h in hb + hq:
                        h.remove()
                acc(mods_b[id(sb.fn)], yb, yq)
                for n in outs_b:
                    if n in outs_q:
                        acc(n, outs_b[n], outs_q[n])
    else:
        for batch in batches:
            outs_b, outs_q = {}, {}
            hb, hq = capture(base, outs_b), capture(quant, outs_q)
            try:
                base(**batch)
                quant(**batch)
            finally:
                for h in hb + hq:
                    h.remove()
            for n in outs_b:
                if n in outs_q:
                    acc(n, outs_b[n], outs_q[n])
    rel = {k: num[k] / max(den[k], 1e-30) for k in num}
    layer = {n: rel[n] for n in names if n in rel}
    blocks = {k: v for k, v in rel.items() if k not in layer}
    return layer, blocks


__all__ = ["ATTNRES_MAPPINGS", "AWQResult", "apply_awq", "apply_rtn_reference", "default_targets",
           "layer_output_errors"]
