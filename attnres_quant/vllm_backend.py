"""vLLM backend: the study's tasks through lm-eval's ``vllm`` model type, and real-kernel latency through
vLLM's own benchmark (``vllm bench latency``), on the checkpoint vLLM would serve.

What vLLM serves: a variant written by our ``export`` verb (a compressed-tensors checkpoint, which vLLM
detects from ``quantization_config``; see :mod:`attnres_quant.export`), or the unquantized baseline
checkpoint itself, of an architecture vLLM implements (:data:`VLLM_MODEL_TYPES`: the Llama family and
Kimi-Linear / K3). Our own ``attnres`` architecture is not among them (docs/scale.md says why and what a
plugin would take).

vLLM is CUDA-only and is not a dependency of this package: install it on the GPU machine
(``pip install vllm``). Here the code paths are tested with a fake vLLM (tests/test_vllm_backend.py);
the real run needs a GPU and has not been made by this version.

Study config: ``eval: {backend: vllm, vllm: {...}}`` for every variant, or ``backend: vllm`` on one
variant. Task cells then record ``backend: vllm`` and the served path; latency cells are labelled
``kernel: vllm``, ``simulated: false``, ``measured_by: vllm bench latency`` -- real kernels, not our
simulation. Quality cells (bpb / KL / depth JS) stay in-process: vLLM returns top-k log-probabilities,
not the full distributions the KL needs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import UserError

BACKENDS = ("hf", "vllm")
# model_type values of config.json that vLLM implements (Llama family, Kimi-Linear, Kimi K3).
VLLM_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "kimi_linear", "kimi_k3")
EXPORTABLE_METHODS = ("rtn", "none")   # what `export` writes as compressed-tensors (attnres_quant.export)
REQUIRED_DEVICE = "cuda"   # vLLM is CUDA-only (tests with a fake vLLM lower this to run on CPU)


class VllmSettings(BaseModel):
    """``eval.vllm``: how vLLM runs the served checkpoint (lm-eval's vllm model args, vLLM's bench)."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.8, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=16, description="None: the checkpoint's own")
    enforce_eager: bool = Field(default=False, description="no CUDA graphs (slower; for debugging)")
    bench_iters: int = Field(default=10, ge=1, description="vllm bench latency --num-iters")
    bench_warmup: int = Field(default=3, ge=0, description="vllm bench latency --num-iters-warmup")


# --------------------------------------------------------------------------- what vLLM can serve
def check_servable(model_dir: str | Path, where: str) -> dict:
    """config.json of a checkpoint vLLM can serve (a known architecture; compressed-tensors or dense)."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"the checkpoint for vLLM has no readable config.json ({path}: {exc})", where,
                        "point the model at a transformers-format checkpoint directory") from None
    model_type = cfg.get("model_type")
    if model_type not in VLLM_MODEL_TYPES:
        raise UserError(f"vLLM does not implement model_type {model_type!r} (this backend serves "
                        f"{', '.join(VLLM_MODEL_TYPES)})", where,
                        "use `backend: hf` for this model (our own attnres architecture runs in-process only; "
                        "docs/scale.md)")
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    if method not in (None, "compressed-tensors"):
        raise UserError(f"the checkpoint's quantization_config says {method!r}; this backend serves "
                        "compressed-tensors checkpoints written by `export` (or dense ones)", where,
                        "export the variant with `python -m attnres_quant export`")
    return cfg


def check_variant(variant, device: str, where: str) -> None:
    """Before any weights load: a vLLM variant must be exportable and the device a GPU."""
    if device != REQUIRED_DEVICE:
        raise UserError(f"variant {variant.name!r} asks for the vLLM backend, which is CUDA-only; the device is "
                        f"{device!r}", where, "run on a GPU machine (--device cuda), or set `backend: hf`")
    if variant.method not in EXPORTABLE_METHODS:
        raise UserError(f"variant {variant.name!r} (method {variant.method}) asks for the vLLM backend, but "
                        f"only methods {', '.join(EXPORTABLE_METHODS)} export as compressed-tensors", where,
                        "use an rtn variant for vLLM, or `backend: hf` for this one")


# --------------------------------------------------------------------------- tasks: lm-eval's vllm model
def lm_eval_model_class():
    """lm-eval's registered ``vllm`` model class (imports vllm; a clear error where it is missing)."""
    from lm_eval.api.registry import get_model

    try:
        return get_model("vllm")
    except ImportError as exc:
        raise UserError(f"the vLLM backend needs the vllm package, which is not importable ({exc})",
                        "eval.backend / variant backend", "pip install vllm on a CUDA machine (vLLM is CUDA-only), "
                        "or set `backend: hf`") from None


def lm_eval_model_args(model_dir: str | Path, settings: VllmSettings, *, dtype: str, seed: int, batch_size: int,
                       trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments of lm-eval's ``vllm`` model (``--model vllm --model_args ...``)."""
    args: dict[str, Any] = {"pretrained": str(model_dir), "dtype": dtype, "seed": seed, "batch_size": batch_size,
                            "tensor_parallel_size": settings.tensor_parallel_size,
                            "gpu_memory_utilization": settings.gpu_memory_utilization,
                            "trust_remote_code": trust_remote_code, "enforce_eager": settings.enforce_eager}
    if settings.max_model_len:
        args["max_model_len"] = settings.max_model_len
    return args


def make_lm(model_dir: str | Path, settings: VllmSettings, **kw):
    return lm_eval_model_class()(**lm_eval_model_args(model_dir, settings, **kw))


# --------------------------------------------------------------------------- latency: vllm bench latency
def bench_command(model_dir: str | Path, settings: VllmSettings, *, dtype: str, prompt_len: int, output_len: int,
                  batch_size: int, out_json: str | Path, trust_remote_code: bool = False) -> list[str]:
    exe = shutil.which("vllm")
    head = [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    cmd = head + ["bench", "latency", "--model", str(model_dir), "--dtype", dtype,
                  "--input-len", str(prompt_len), "--output-len", str(output_len), "--batch-size", str(batch_size),
                  "--num-iters-warmup", str(settings.bench_warmup), "--num-iters", str(settings.bench_iters),
                  "--tensor-parallel-size", str(settings.tensor_parallel_size),
                  "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
                  "--output-json", str(out_json)]
    if settings.max_model_len:
        cmd += ["--max-model-len", str(settings.max_model_len)]
    if settings.enforce_eager:
        cmd.append("--enforce-eager")
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd


def run_bench(cmd: list[str]) -> dict:
    """One ``vllm bench latency`` run; its JSON (avg_latency in seconds, latencies, percentiles)."""
    out_json = Path(cmd[cmd.index("--output-json") + 1])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out_json.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise RuntimeError(f"vllm bench latency failed (exit {proc.returncode}): {' | '.join(tail)[:800]}")
    return json.loads(out_json.read_text())


def measure_latency(model_dir: str | Path, settings: VllmSettings, *, dtype: str, prompt_len: int,
                    decode_tokens: int, batch_size: int, trust_remote_code: bool = False,
                    weight_bytes: int | None = None) -> dict:
    """Prefill and decode latency with vLLM's kernels: one run generating 1 token (prefill) and one generating
    ``1 + decode_tokens`` (the difference is the decode steps). Same fields as the in-process latency cell."""
    runs = {}
    with tempfile.TemporaryDirectory(prefix="vllm_bench_") as tmp:
        for name, out_len in (("prefill", 1), ("full", 1 + decode_tokens)):
            cmd = bench_command(model_dir, settings, dtype=dtype, prompt_len=prompt_len, output_len=out_len,
                                batch_size=batch_size, out_json=Path(tmp) / f"{name}.json",
                                trust_remote_code=trust_remote_code)
            runs[name] = run_bench(cmd)
    prefill_s = float(runs["prefill"]["avg_latency"])
    decode_s = max(0.0, float(runs["full"]["avg_latency"]) - prefill_s) / decode_tokens
    pct = runs["prefill"].get("percentiles") or {}
    iqr = (float(pct["75"]) - float(pct["25"])) * 1e3 if "75" in pct and "25" in pct else None
    return {"prefill_ms": prefill_s * 1e3, "prefill_ms_iqr": iqr, "decode_ms_per_token": decode_s * 1e3,
            "tokens_per_s": batch_size / decode_s if decode_s > 0 else None,
            "prefill_tokens_per_s": batch_size * prompt_len / prefill_s if prefill_s > 0 else None,
            "peak_mem_bytes": None, "weight_bytes": weight_bytes,
            "prompt_len": prompt_len, "batch_size": batch_size, "decode_tokens": decode_tokens,
            "warmup": settings.bench_warmup, "repeats": settings.bench_iters, "device": "cuda", "dtype": dtype,
            "clock": "vllm bench latency (wall)", "simulated": False, "kernel": "vllm", "real": True,
            "measured_by": "vllm bench latency", "served_path": str(model_dir),
            "raw": {k: {"avg_latency": v.get("avg_latency"), "percentiles": v.get("percentiles")}
                    for k, v in runs.items()}}


# --------------------------------------------------------------------------- the study's served checkpoint
class Served:
    """A checkpoint vLLM serves for one (model, variant): tasks through lm-eval's vllm model, latency through
    vLLM's bench."""

    def __init__(self, model_dir: str | Path, settings: VllmSettings, *, dtype: str, seed: int, batch_size: int,
                 trust_remote_code: bool = False, weight_bytes: int | None = None):
        self.model_dir, self.settings = Path(model_dir), settings
        self.dtype, self.seed, self.batch_size = dtype, seed, batch_size
        self.trust_remote_code, self.weight_bytes = trust_remote_code, weight_bytes
        self._lm = None

    def lm(self):
        """lm-eval's vllm model on the checkpoint, built once (each task's generation limit reaches it
        per request through lm-eval's gen_kwargs)."""
        if self._lm is None:
            self._lm = make_lm(self.model_dir, self.settings, dtype=self.dtype, seed=self.seed,
                               batch_size=self.batch_size, trust_remote_code=self.trust_remote_code)
        return self._lm

    def label(self) -> dict:
        return {"backend": "vllm", "served_path": str(self.model_dir)}

    def latency(self, bench) -> dict:
        return measure_latency(self.model_dir, self.settings, dtype=self.dtype, prompt_len=bench.prompt_len,
                               decode_tokens=bench.decode_tokens, batch_size=bench.batch_size,
                               trust_remote_code=self.trust_remote_code, weight_bytes=self.weight_bytes)


def export_dir(results_dir: str | Path, label: str, vname: str) -> Path:
    """Where a study writes the checkpoint vLLM serves: ``<study>/exported/<model>/<variant>/``."""
    return Path(results_dir) / "exported" / label / vname


def serve_variant(baseline, variant, tokenizer, config, results_dir, label, calibration=None) -> Served:
    """Export the variant as compressed-tensors under the study folder (reused when already there) and
    return it as a :class:`Served`."""
    from .export import export_variant

    out = export_dir(results_dir, label, variant.name)
    if not (out / "attnres_quant_export.json").is_file():
        if out.exists():
            shutil.rmtree(out)  # an export interrupted half-way
        export_variant(baseline, variant, out, tokenizer=tokenizer, calibration=calibration,
                       source=f"variant {variant.name!r}", model_label=label)
    check_servable(out, f"exported variant {variant.name!r} ({out})")
    summary = json.loads((out / "attnres_quant_export.json").read_text())
    return Served(out, config.eval.vllm, dtype=config.dtype, seed=config.seed, batch_size=config.eval.batch_size,
                  weight_bytes=summary.get("weight_bytes"))


def serve_baseline(spec, config) -> Served:
    """The baseline checkpoint itself (dense), when vLLM implements its architecture."""
    from .loading import _resolve

    _kind, directory, where, _hub = _resolve(str(spec.path))
    check_servable(directory, where)
    return Served(directory, config.eval.vllm, dtype=config.dtype, seed=config.seed,
                  batch_size=config.eval.batch_size, trust_remote_code=spec.trust_remote_code)


def backend_of(config, variant=None) -> str:
    """The backend of one variant (its own ``backend:``, else ``eval.backend``); ``variant`` None: the baseline."""
    own = getattr(variant, "backend", None) if variant is not None else None
    return own or config.eval.backend
