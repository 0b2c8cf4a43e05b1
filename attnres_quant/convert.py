"""``convert`` verb: retrofit a Llama-style PreNorm checkpoint into a Block (or Full) AttnRes checkpoint.

    python -m attnres_quant convert SRC OUT --block-size S

SRC is a local checkpoint directory, ``zoo:NAME`` or a hub id, in Llama naming
(``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``) or a
standard-residual AttnRes/FLA checkpoint (``attnres_block_size: null``).  OUT
receives an FLA-named checkpoint (config ``model_type: transformer``,
``model.safetensors`` or shards + index, the tokenizer files copied, and
``conversion_card.json``) with zero pseudo-queries and unit key norms.

By the identity property (SPEC section 1) the converted model's logits equal the
source's up to the RMSNorm epsilon: with zero pseudo-queries every depth softmax
is uniform, the mix is the residual stream divided by the number of sources,
and the pre-norm removes that scale.  ``--verify`` (default: for models up to
1e9 parameters) runs both models in fp32 on random tokens and records the
maximum absolute logit difference.

What cannot be represented is refused before anything is written: an output
projection bias or MLP biases, QK-norm (Qwen3), non-default RoPE scaling,
``head_dim`` different from hidden_size / num_heads, partial rotary, activations
other than SiLU, sliding-window attention (unless ``--ignore-sliding-window``),
or any tensor without an FLA counterpart.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .architectures.reference import MODEL_TYPES as ATTNRES_TYPES  # the reference family's model types
from .errors import UserError

LLAMA_TYPES = ("llama", "qwen2", "mistral")  # the Llama-family types this converter maps (not qwen3: QK-norm)
VERIFY_AUTO_MAX_PARAMS = 1_000_000_000

# Llama name -> FLA name (per layer; N is the layer index).
_LAYER_MAP = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_proj.bias": "attn.q_proj.bias",
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {"model.embed_tokens.weight": "model.embeddings.weight", "model.norm.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # non-persistent buffer in old checkpoints
_COPY_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model",
                  "chat_template*", "*.tiktoken", "generation_config.json")


# --------------------------------------------------------------------------- config
def _rope_theta(cfg: dict, where: str) -> float:
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    for label, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if isinstance(block, dict):
            rope_type = block.get("rope_type", block.get("type", "default"))
            if rope_type not in (None, "default"):
                raise UserError(
                    f"RoPE scaling {rope_type!r} ({label}) cannot be converted: the AttnRes model implements "
                    "plain RoPE only",
                    where=f"{where} (config.json {label})",
                    fix="convert a checkpoint with default RoPE (rope_type 'default'), or add this RoPE variant "
                        "to the reference model first")
    theta = (params or {}).get("rope_theta") if isinstance(params, dict) else None
    if theta is None:
        theta = cfg.get("rope_theta", 10000.0)
    return float(theta)


def convert_config(src: dict, block_size: int, *, ignore_sliding_window: bool = False, where: str = "source",
                   dtype: str | None = None) -> dict:
    """FLA-named ``config.json`` dict of the retrofitted model; ``UserError`` for what cannot be converted."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or not (
            block_size == 1 or (block_size >= 2 and block_size % 2 == 0)):
        raise UserError(f"--block-size must be 1 (Full AttnRes) or an even integer (Block AttnRes); got {block_size!r}",
                        where="convert --block-size",
                        fix="pass 1, 2, 4, ... (S sub-layers = S/2 transformer layers per block)")
    model_type = src.get("model_type")
    if model_type in ATTNRES_TYPES:
        if src.get("attnres_block_size") is not None:
            raise UserError(f"The source is already an AttnRes model (attnres_block_size="
                            f"{src['attnres_block_size']})", where=where,
                            fix="convert a standard-residual checkpoint (attnres_block_size null or a Llama-style "
                                "model)")
        for key, bad in (("qk_norm", True), ("elementwise_affine", False)):
            if src.get(key) is bad:
                raise UserError(f"{key}={bad} cannot be converted", where=f"{where} (config.json)",
                                fix="use a checkpoint without it")
        if src.get("window_size") is not None and not ignore_sliding_window:
            raise UserError(f"Sliding-window attention (window_size={src['window_size']}) cannot be converted",
                            where=f"{where} (config.json)",
                            fix="pass --ignore-sliding-window to convert anyway (identical outputs only for "
                                "sequences up to the window)")
        out = {k: src[k] for k in ("hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads", "qkv_bias",
                                   "rope_theta", "max_position_embeddings", "hidden_ratio", "intermediate_size",
                                   "initializer_range", "norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
                                   "tie_word_embeddings", "vocab_size") if k in src}
        if out.get("intermediate_size") is None:
            from .model.configuration_attnres import default_intermediate_size

            out["intermediate_size"] = default_intermediate_size(src["hidden_size"], src.get("hidden_ratio"))
    elif model_type in LLAMA_TYPES:
        problems = []
        d, heads = src["hidden_size"], src["num_attention_heads"]
        kv = src.get("num_key_value_heads") or heads
        if d % heads:
            problems.append(f"hidden_size {d} is not a multiple of num_attention_heads {heads}")
        elif src.get("head_dim") not in (None, d // heads):
            problems.append(f"head_dim {src['head_dim']} differs from hidden_size / num_attention_heads = "
                            f"{d // heads} (the AttnRes model derives head_dim)")
        if src.get("hidden_act", "silu") not in ("silu", "swish"):
            problems.append(f"hidden_act {src['hidden_act']!r} (only SiLU/SwiGLU)")
        if src.get("mlp_bias"):
            problems.append("mlp_bias=true (MLP biases)")
        if model_type == "llama" and src.get("attention_bias"):
            problems.append("attention_bias=true (Llama puts a bias on o_proj too; only q/k/v biases are supported)")
        if src.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
            problems.append(f"partial_rotary_factor {src['partial_rotary_factor']}")
        if src.get("pretraining_tp", 1) not in (None, 1):
            problems.append(f"pretraining_tp {src['pretraining_tp']} (re-save the model with transformers first)")
        if problems:
            raise UserError("Cannot convert: " + "; ".join(problems), where=f"{where} (config.json)",
                            fix="only Llama-style PreNorm models (RMSNorm, RoPE, GQA, SwiGLU, optional q/k/v "
                                "bias) convert exactly")
        sliding = None
        if model_type == "mistral":
            sliding = src.get("sliding_window")
        elif model_type == "qwen2" and src.get("use_sliding_window"):
            sliding = src.get("sliding_window")
        layer_types = src.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types) and sliding is None:
            sliding = src.get("sliding_window") or "per-layer"
        if sliding is not None and not ignore_sliding_window:
            raise UserError(f"Sliding-window attention (sliding_window={sliding}) cannot be represented: the "
                            "AttnRes model attends to the whole context",
                            where=f"{where} (config.json)",
                            fix="pass --ignore-sliding-window to convert anyway; outputs are identical for "
                                "sequences no longer than the window")
        out = {
            "hidden_size": d, "num_hidden_layers": src["num_hidden_layers"], "num_heads": heads,
            "num_kv_heads": kv, "qkv_bias": model_type == "qwen2" or bool(src.get("attention_bias")),
            "rope_theta": _rope_theta(src, where),
            "max_position_embeddings": src.get("max_position_embeddings", 2048),
            "hidden_ratio": 4, "intermediate_size": src["intermediate_size"],
            "initializer_range": src.get("initializer_range", 0.02), "norm_eps": src.get("rms_norm_eps", 1e-6),
            "pad_token_id": src.get("pad_token_id"), "bos_token_id": src.get("bos_token_id"),
            "eos_token_id": src.get("eos_token_id"),
            "tie_word_embeddings": bool(src.get("tie_word_embeddings", False)), "vocab_size": src["vocab_size"],
        }
    else:
        extra = " (Qwen3 uses QK-norm, which the AttnRes model does not implement)" if model_type == "qwen3" else ""
        raise UserError(f"Cannot convert model_type {model_type!r}{extra}", where=f"{where} (config.json)",
                        fix="convert a Llama-style checkpoint (llama, qwen2, mistral) or a standard-residual "
                            "AttnRes/FLA checkpoint")
    pad = out.get("pad_token_id")
    if isinstance(pad, int) and not -out["vocab_size"] <= pad < out["vocab_size"]:
        out["pad_token_id"] = None  # outside the embedding (some configs use it as "no pad"); forward-neutral
    out.setdefault("qkv_bias", False)
    out.update({
        "model_type": "transformer", "architectures": ["TransformerForCausalLM"],
        "attnres_block_size": block_size, "hidden_act": "swish", "qk_norm": False, "window_size": None,
        "elementwise_affine": True, "use_cache": True,
    })
    if dtype:
        out["dtype"] = dtype
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- tensors
def rename_tensor(name: str, model_type: str) -> str | None:
    """FLA name of a source tensor; ``None`` for tensors to drop; ``KeyError`` if it has no counterpart."""
    if _DROPPED.search(name):
        return None
    if model_type in ATTNRES_TYPES:
        return name
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_KEY.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise KeyError(name)


def _source_tensor_index(directory: Path, weight_files: list[str], fmt: str) -> dict[str, str]:
    """Source tensor name -> file holding it (no tensor data read for safetensors)."""
    index: dict[str, str] = {}
    if weight_files and weight_files[0].endswith(".index.json"):
        with open(directory / weight_files[0], encoding="utf-8") as fh:
            return dict(json.load(fh)["weight_map"])
    if fmt == "safetensors":
        from safetensors import safe_open

        for f in weight_files:
            with safe_open(str(directory / f), framework="pt") as sf:
                index.update({k: f for k in sf.keys()})
        return index
    for f in weight_files:
        state = _torch_load(directory / f, mmap=True)
        index.update({k: f for k in state})
    return index


def _torch_load(path: Path, mmap: bool = False) -> dict:
    """``torch.load(weights_only=True)``; a pickle holding more than tensors is refused naming the file."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = (str(exc).strip().splitlines() or ["no detail"])[0][:200]
        raise UserError(f"the pickle file {str(path)!r} was refused by torch's safe (weights-only) loader: it holds "
                        f"more than tensors ({detail})", where="convert SRC",
                        fix="do not load this file; obtain safetensors weights from a trusted source") from None


def _read_file(path: Path, fmt: str) -> dict:
    if fmt == "safetensors" or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return _torch_load(path)


def _expected_shapes(config: dict) -> dict[str, tuple]:
    """Parameter names and shapes of the reference model for ``config`` (built on the meta device)."""
    import torch

    from .model import FLATransformerConfig, FLATransformerForCausalLM

    cfg = FLATransformerConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FLATransformerForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _depth_tensors(config: dict, dtype) -> dict:
    """Zero pseudo-queries and unit key norms for every sub-layer and the final mix."""
    import torch

    d = config["hidden_size"]
    out = {}
    for i in range(config["num_hidden_layers"]):
        for kind in ("attn", "mlp"):
            out[f"model.layers.{i}.{kind}_res_proj.weight"] = torch.zeros(1, d, dtype=dtype)
            out[f"model.layers.{i}.{kind}_res_norm.weight"] = torch.ones(d, dtype=dtype)
    out["model.res_proj.weight"] = torch.zeros(1, d, dtype=dtype)
    out["model.res_norm.weight"] = torch.ones(d, dtype=dtype)
    return out


# --------------------------------------------------------------------------- conversion
def convert_checkpoint(src: str, out: str | os.PathLike, *, block_size: int, dtype: str = "auto",
                       allow_pickle: bool = False, ignore_sliding_window: bool = False, overwrite: bool = False,
                       verify: str | bool = "auto") -> dict:
    """Write the retrofitted checkpoint to ``out``; returns the conversion card (also written as JSON)."""
    import torch
    from safetensors.torch import save_file

    from .loading import TOKENIZER_FILES, LoadingWarning, checkpoint_dir, preflight_model

    if verify is True:
        verify = "yes"
    elif verify is False:
        verify = "no"
    if verify not in ("auto", "yes", "no"):
        raise UserError(f"--verify must be auto, yes or no; got {verify!r}", where="convert --verify",
                        fix="use --verify auto|yes|no")
    dtype_map = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtype_map:
        raise UserError(f"Unknown --dtype {dtype!r}", where="convert --dtype", fix="use auto, float32, bfloat16 "
                                                                                   "or float16")
    where = f"convert source {src!r}"
    info = preflight_model(src, dtype="float32", allow_pickle=True, trust_remote_code=False)
    if info.weights_format == "pickle" and not allow_pickle:
        raise UserError("The source has only pickle weights (pytorch_model.bin); reading them can run arbitrary "
                        "code, so it is refused by default", where=where,
                        fix="pass --allow-pickle if you trust the checkpoint (the output is safetensors)")
    src_cfg = info.config
    model_type = src_cfg.get("model_type")
    # Validate everything before touching OUT.
    out_cfg = convert_config(src_cfg, block_size, ignore_sliding_window=ignore_sliding_window, where=where)
    out_dir = Path(out).expanduser().resolve()
    src_dir = checkpoint_dir(info)
    if out_dir == Path(src_dir).resolve():
        raise UserError("OUT is the source directory", where="convert OUT", fix="write to a new directory")
    replacing = _check_out_dir(out_dir, overwrite)

    index = _source_tensor_index(src_dir, info.weight_files, info.weights_format)
    renamed: dict[str, str] = {}
    unknown = []
    for name in index:
        try:
            new = rename_tensor(name, model_type)
        except KeyError:
            unknown.append(name)
            continue
        if new is not None:
            renamed[name] = new
    if unknown:
        raise UserError(f"{len(unknown)} source tensors have no AttnRes counterpart: "
                        + ", ".join(sorted(unknown)[:6]) + (" ..." if len(unknown) > 6 else ""),
                        where=where, fix="only Llama-style PreNorm models convert (no QK-norm, no o_proj/MLP biases)")
    tied = bool(out_cfg.get("tie_word_embeddings"))
    if tied:
        renamed = {k: v for k, v in renamed.items() if v != "lm_head.weight"}
    expected = _expected_shapes(out_cfg)
    depth_names = {k for k in expected if "res_proj" in k or "res_norm" in k}
    produced = set(renamed.values())
    missing = sorted(set(expected) - depth_names - produced)
    extra = sorted(produced - set(expected))
    if missing or extra:
        raise UserError("The source tensors do not match its config: "
                        + (f"missing {', '.join(missing[:6])}" if missing else "")
                        + ("; " if missing and extra else "")
                        + (f"unexpected {', '.join(extra[:6])}" if extra else ""),
                        where=where, fix="check that config.json belongs to these weights")

    files = sorted(set(index[k] for k in renamed)) or sorted(set(index.values()))
    n = len(files)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    except OSError as exc:
        raise _write_error(out_dir, exc) from None
    weight_map: dict[str, str] = {}
    total_bytes = 0
    out_dtype_name = None
    n_params = 0
    try:
        for i, f in enumerate(files):
            tensors = _read_file(src_dir / f, info.weights_format)
            shard = {}
            for old, new in renamed.items():
                if index[old] != f:
                    continue
                t = tensors[old]
                if tuple(t.shape) != expected[new]:
                    raise UserError(f"Tensor {old} has shape {tuple(t.shape)}, expected {expected[new]} for the "
                                    "converted config", where=where, fix="check that config.json belongs to these "
                                                                         "weights")
                if dtype_map[dtype] is not None:
                    t = t.to(dtype_map[dtype])
                shard[new] = t.contiguous()
            del tensors
            if i == n - 1:
                ref = shard.get("model.embeddings.weight")
                if ref is None:
                    ref = next(iter(shard.values())) if shard else None
                depth_dtype = dtype_map[dtype] or (ref.dtype if ref is not None else torch.float32)
                shard.update(_depth_tensors(out_cfg, depth_dtype))
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            for k, t in shard.items():
                weight_map[k] = name
                total_bytes += t.numel() * t.element_size()
                n_params += t.numel()
                if k == "model.embeddings.weight":
                    out_dtype_name = str(t.dtype).removeprefix("torch.")
            del shard
        if n > 1:
            with open(tmp / "model.safetensors.index.json", "w", encoding="utf-8") as fh:
                json.dump({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                          fh, indent=2)
        if out_dtype_name:
            out_cfg["dtype"] = out_dtype_name
        with open(tmp / "config.json", "w", encoding="utf-8") as fh:
            json.dump(out_cfg, fh, indent=2)
            fh.write("\n")
        from .model.remote_code import write_remote_code

        write_remote_code(tmp)  # self-describing: trust_remote_code loads it without attnres_quant
        copied = _copy_tokenizer(Path(info.directory), tmp)
        if src_dir != info.directory:
            copied += [c for c in _copy_tokenizer(Path(src_dir), tmp) if c not in copied]
        card = {
            "tool": "attnres_quant convert",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": info.spec,
            "source_model_type": model_type,
            "attnres_block_size": block_size,
            "mode": "full" if block_size == 1 else "block",
            "pseudo_queries": "zero",
            "key_norms": "ones",
            "parameters": n_params,
            "dtype": out_dtype_name,
            "ignore_sliding_window": bool(ignore_sliding_window),
            "tokenizer_files": copied,
            "identity_property": "logits equal the source's up to the RMSNorm epsilon (SPEC section 1)",
        }
        has_tokenizer = any(c in TOKENIZER_FILES for c in copied)
        card["tokenizer"] = has_tokenizer
        if not has_tokenizer:
            warnings.warn(f"{where}: no tokenizer files to copy; the converted checkpoint has no tokenizer",
                          LoadingWarning, stacklevel=2)
        with open(tmp / "conversion_card.json", "w", encoding="utf-8") as fh:
            json.dump(card, fh, indent=2)
        if replacing:
            _replace_checkpoint_files(tmp, out_dir)
        else:
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above)
            os.replace(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out_dir, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verify == "yes" or (verify == "auto" and n_params <= VERIFY_AUTO_MAX_PARAMS):
        card["verification"] = verify_conversion(src_dir, out_dir, pickle=info.weights_format == "pickle")
        try:
            with open(out_dir / "conversion_card.json", "w", encoding="utf-8") as fh:
                json.dump(card, fh, indent=2)
        except OSError as exc:
            raise _write_error(out_dir, exc) from None
    return card


# --------------------------------------------------------------------------- output folder
# What a checkpoint written by this verb consists of: the only files --overwrite may remove.
_CHECKPOINT_PATTERNS = ("config.json", "conversion_card.json", "model.safetensors", "model-*-of-*.safetensors",
                        "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin",
                        "pytorch_model.bin.index.json", "configuration_attnres.py", "modeling_attnres.py",
                        "depth.py") + _COPY_PATTERNS


def _is_checkpoint_file(p: Path) -> bool:
    return p.is_file() and not p.is_symlink() and any(p.match(pat) for pat in _CHECKPOINT_PATTERNS)


def _check_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """True when OUT is an existing checkpoint to replace; UserError for anything else in the way."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"OUT {str(out_dir)!r} is a file", where="convert OUT", fix="choose a directory")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return False
    if not overwrite:
        raise UserError(f"Output directory {str(out_dir)!r} exists and is not empty", where="convert OUT",
                        fix="choose a new directory or pass --overwrite")
    if not (out_dir / "config.json").is_file():
        raise UserError(f"--overwrite refuses to replace {str(out_dir)!r}: it is not a checkpoint directory "
                        "(no config.json)", where="convert OUT", fix="choose a new directory")
    return True


def _replace_checkpoint_files(new: Path, out_dir: Path) -> None:
    """Swap the checkpoint files of ``out_dir`` for those in ``new``; every other file there is kept."""
    for p in sorted(out_dir.iterdir()):
        if _is_checkpoint_file(p):
            p.unlink()
    for p in sorted(new.iterdir()):
        os.replace(p, out_dir / p.name)
    new.rmdir()


def _write_error(out_dir: Path, exc: OSError) -> UserError:
    from .pipeline.results import os_error_reason

    return UserError(f"could not write the converted checkpoint to {str(out_dir)!r}: {os_error_reason(exc)}",
                     where="convert OUT", fix="choose a writable directory with enough free space; nothing "
                                              "partial was left there")


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and any(p.match(pat) for pat in _COPY_PATTERNS) and not (dst / p.name).exists():
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def verify_conversion(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seq_len: int = 16,
                      batch: int = 2, seed: int = 0, pickle: bool = False) -> dict:
    """Run source and converted models in fp32 on random tokens; max abs logit difference."""
    import torch
    from transformers import AutoModelForCausalLM

    from .loading import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=torch.float32, local_files_only=True,
                                                      use_safetensors=not pickle).eval()
        converted, _ = load_model(str(out_dir), dtype="float32")
    vocab = converted.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a = source(ids, use_cache=False).logits.float()
        b = converted(ids, use_cache=False).logits.float()
    diff = (a - b).abs().max().item()
    return {"max_abs_logit_diff": diff, "max_abs_logit": a.abs().max().item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "tokens": batch * seq_len, "dtype": "float32"}


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source checkpoint: local directory, zoo:NAME or hub id (Llama / Qwen2 / "
                                    "Mistral naming, or a standard-residual AttnRes/FLA checkpoint)")
    parser.add_argument("out", help="output directory (new or empty)")
    parser.add_argument("--block-size", "-S", type=int, required=True,
                        help="attnres_block_size of the result: 1 = Full AttnRes, even S = Block AttnRes "
                             "(S sub-layers = S/2 transformer layers per block)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: keep the source's)")
    parser.add_argument("--verify", default="auto", choices=["auto", "yes", "no"],
                        help="compare source and converted logits in fp32 (auto: models up to 1e9 parameters)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a pytorch_model.bin source (pickle; only for trusted checkpoints)")
    parser.add_argument("--ignore-sliding-window", action="store_true",
                        help="convert a sliding-window model anyway (identical only up to the window length)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory OUT")


def main(args: argparse.Namespace) -> int:
    card = convert_checkpoint(args.src, args.out, block_size=args.block_size, dtype=args.dtype,
                              allow_pickle=args.allow_pickle, ignore_sliding_window=args.ignore_sliding_window,
                              overwrite=args.overwrite, verify=args.verify)
    mode = "Full AttnRes" if card["attnres_block_size"] == 1 else f"Block AttnRes (S={card['attnres_block_size']})"
    print(f"converted {card['source']} ({card['source_model_type']}) -> {Path(args.out)} as {mode}, "
          f"{card['parameters']:,} parameters, {card['dtype']}")
    ver = card.get("verification")
    if ver:
        print(f"verified (fp32, {ver['tokens']} random tokens): max |logit diff| = {ver['max_abs_logit_diff']:.3g} "
              f"(max |logit| {ver['max_abs_logit']:.3g}), top-1 agreement {ver['top1_agreement']:.3f}")
        if ver["max_abs_logit_diff"] > 1e-2 * max(1.0, ver["max_abs_logit"]) or ver["top1_agreement"] < 0.99:
            print("warning: the difference is larger than the RMSNorm epsilon explains for a trained model; "
                  "(an untrained model with tiny activations can show ~1e-2) check the source checkpoint")
    else:
        print("not verified (pass --verify yes to compare logits)")
    if not card["tokenizer"]:
        print("warning: the source has no tokenizer files; the converted checkpoint has no tokenizer")
    return 0


__all__ = ["convert_checkpoint", "convert_config", "rename_tensor", "verify_conversion", "add_arguments", "main"]
