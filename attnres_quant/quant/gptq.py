"""GPTQ through llm-compressor (0.14): ``oneshot`` + ``GPTQModifier`` on the untraced
``basic`` pipeline.

Why ``basic``: the default ``sequential`` pipeline traces the decoder with torch.fx, and
the AttnRes depth loop (data-dependent Python control flow over a list of sources)
cannot be traced ("__bool__ should return bool, returned Tensor"). The ``basic``
pipeline runs the whole model eagerly on every calibration batch, accumulates each
target Linear's Hessian through hooks, and quantizes every module at the end -- plain
GPTQ (Hessians from the full-precision model), which works for any architecture.

After oneshot the targeted Linears hold weights already on the quantization grid plus
compressed-tensors scale/zero-point parameters and a wrapped forward; we strip the
wrapper so the result is a plain ``nn.Linear`` with dequantized weights (simulated),
which runs anywhere.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile

import torch
from torch import nn


def _dummy_processor(vocab_size: int):
    """llm-compressor insists on a processor when given a dataset; ours is pre-tokenized."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<0>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", pad_token="<0>")


def _strip_compressed_tensors(module: nn.Module) -> None:
    """Turn a compressed-tensors fake-quantized Linear back into a plain nn.Linear."""
    for attr in ("forward",):
        if attr in module.__dict__:
            del module.__dict__[attr]
    for attr in ("quantization_scheme", "quantization_status", "quantization_enabled"):
        if attr in module.__dict__:
            delattr(module, attr)
    for pname in [n for n, _ in module.named_parameters(recurse=False) if n != "weight" and n != "bias"]:
        delattr(module, pname)
    for bname in [n for n, _ in module.named_buffers(recurse=False)]:
        if bname.startswith(("weight_", "input_", "output_")):
            delattr(module, bname)


def gptq_quantize(model: nn.Module, groups: dict[tuple[str, int | None, bool], list[str]],
                  calibration: list[torch.Tensor], *, block_size: int = 128, dampening: float = 0.01,
                  actorder: str | None = "static", quiet: bool = True) -> None:
    """Run GPTQ in place on the named Linear modules.

    ``groups`` maps (bits "int4"/"int8", group_size or None, symmetric) -> module names.
    ``calibration``: token-id tensors [B, T] (batches of equal length within a tensor).
    """
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    config_groups = {}
    for i, ((bits, group_size, symmetric), names) in enumerate(groups.items()):
        weights = {"num_bits": int(bits[-1]), "type": "int", "symmetric": bool(symmetric),
                   "strategy": "group" if group_size else "channel"}
        if group_size:
            weights["group_size"] = int(group_size)
        config_groups[f"group_{i}"] = {"targets": [f"re:^{re.escape(n)}$" for n in names], "weights": weights}
    modifier = GPTQModifier(config_groups=config_groups, block_size=block_size, dampening_frac=dampening,
                            actorder=actorder)

    rows = [r for t in calibration for r in t.reshape(-1, t.shape[-1]).tolist()]
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    vocab = int(model.config.vocab_size)
    was_training = model.training
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        # oneshot re-reads the config from model.config.name_or_path to refuse pre-quantized models.
        old_name = getattr(model.config, "_name_or_path", "")
        model.config.save_pretrained(tmp)
        model.config._name_or_path = tmp
        sink = io.StringIO()
        logger_state = logging.getLogger().level
        try:
            with contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                if quiet:
                    _loguru().disable("llmcompressor")
                    _loguru().disable("compressed_tensors")
                oneshot(model=model, processor=_dummy_processor(vocab), dataset=dataset, recipe=modifier,
                        pipeline="basic", num_calibration_samples=len(rows),
                        max_seq_length=max(len(r) for r in rows), shuffle_calibration_samples=False,
                        output_dir=None)
        finally:
            try:  # the global session keeps a reference to the model; release it
                from llmcompressor.core.session_functions import active_session

                active_session().reset()
            except Exception:  # noqa: BLE001
                pass
            if quiet:
                _loguru().enable("llmcompressor")
                _loguru().enable("compressed_tensors")
            model.config._name_or_path = old_name
            logging.getLogger().setLevel(logger_state)
    names = {n for ns in groups.values() for n in ns}
    for name, module in model.named_modules():
        if name in names:
            _strip_compressed_tensors(module)
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            pass
    model.train(was_training)


def _loguru():
    from loguru import logger

    return logger
