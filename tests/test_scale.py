"""Scale tooling (issue 19): bench kquant / bench memory CLIs, scripts/gpu_check.sh, and the CUDA paths
(marked ``gpu``: skipped by conftest where torch sees no CUDA device; run by scripts/gpu_check.sh)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnres_quant.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kquant_prints_json_with_identical_bytes(capsys):
    assert cli_main(["bench", "kquant", "--weights", "4096", "--repeats", "1", "--threads", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bench"] == "kquant" and r["weights"] == 4096 and r["machine"]["date_utc"]
    assert [row["qtype"] for row in r["results"]] == ["Q4_K", "Q5_K", "Q6_K"]
    for row in r["results"]:
        assert row["identical_bytes"] is True
        assert row["engine"] == "numba" and row["packer_s_per_mweights"] > 0 and row["numpy_s_per_mweights"] > 0


@pytest.mark.parametrize("argv,expect", [
    (["bench", "kquant", "--types", "Q3_K"], "Q3_K"),
    (["bench", "kquant", "--device", "cuda:7"], "not available"),
    (["bench", "memory", "--sizes", "8B"], "8B"),
    (["bench", "memory", "--methods", "awq"], "awq"),
])
def test_bench_scale_verbs_reject_bad_arguments_in_one_paragraph(argv, expect, capsys):
    if "cuda:7" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert cli_main(argv) != 0
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


def test_memory_extrapolation_is_a_linear_fit():
    from attnres_quant.bench.memory import extrapolate

    rows = [{"method": "rtn", "params": p, "peak_rss": 100 + 2 * p + 7, "rss_imports": 100, "load_s": 0.0,
             "quantize_s": p * 1e-6} for p in (1e6, 1e7, 1e8)]
    e = extrapolate(rows)["rtn"]
    assert e["bytes_per_param"] == pytest.approx(2.0) and e["fixed_bytes"] == pytest.approx(7.0, abs=1e-3)
    assert e["8B"]["model_peak_gib"] == pytest.approx((2 * 8e9 + 7) / 2**30)
    assert e["48B"]["seconds"] == pytest.approx(48e3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where CUDA is absent")
def test_gpu_check_without_cuda_fails_clearly(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 3
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def test_gpu_check_usage_errors(tmp_path):
    script = str(ROOT / "scripts" / "gpu_check.sh")
    assert subprocess.run(["bash", script], capture_output=True, text=True).returncode == 2
    proc = subprocess.run(["bash", script, str(tmp_path), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


# ------------------------------------------------------------------------------------ CUDA paths
@pytest.mark.gpu
def test_model_on_cuda_matches_cpu_logits():
    from attnres_quant.quant.testing import tiny_attnres

    model = tiny_attnres(layers=4, hidden=128, dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.to("cuda")(ids.cuda()).logits.cpu()
    assert torch.allclose(cpu, gpu, atol=2e-4, rtol=1e-3), (cpu - gpu).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("method,default", [("rtn", {"weight": "int4", "group_size": 32}),
                                            ("gguf", {"weight": "q4_k"})])
def test_quantized_variant_on_cuda_matches_the_cpu_variant(method, default):
    from attnres_quant.quant import parse_variant, quantize
    from attnres_quant.quant.testing import tiny_attnres

    base = tiny_attnres(layers=2, hidden=256, intermediate=512, dtype=torch.float32).eval()
    variant = parse_variant({"name": method, "method": method, "default": default})
    on_cpu = quantize(base, variant).model
    on_gpu = quantize(base.to("cuda"), variant).model
    assert next(on_gpu.parameters()).device.type == "cuda"
    for (name, a), (_, b) in zip(on_cpu.named_parameters(), on_gpu.named_parameters()):
        if method == "gguf":  # the K-quant packer is bit-exact on every device
            assert torch.equal(a, b.cpu()), name
        else:  # RTN on CUDA may round a rare tie differently (division kernels); one step at most
            assert (a != b.cpu()).float().mean() < 1e-3, name
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert torch.allclose(on_cpu(ids).logits, on_gpu(ids.cuda()).logits.cpu(), atol=2e-4, rtol=1e-3)


def test_layerwise_gptq_gives_the_same_weights_as_one_run(one_thread):
    """GPTQ one decoder layer at a time (last first: each layer still sees full-precision inputs) keeps one
    layer's Hessians in memory and writes exactly the weights of a single run over all layers."""
    from attnres_quant.quant import parse_variant, quantize
    from attnres_quant.quant.apply import gptq_layer_groups
    from attnres_quant.quant.testing import tiny_attnres

    base = tiny_attnres(layers=3, hidden=64, dtype=torch.float32).eval()
    calib = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for layerwise in (True, False):
        v = parse_variant({"name": "g", "method": "gptq", "default": {"weight": "int4", "group_size": 32},
                           "options": {"layerwise": layerwise}})
        out[layerwise] = quantize(base, v, calibration=calib).model
    changed = 0
    for (name, a), (_, b) in zip(out[True].named_parameters(), out[False].named_parameters()):
        assert torch.equal(a, b), name
        changed += int(not torch.equal(a, dict(base.named_parameters())[name]))
    assert changed >= 3 * 7  # every projection of every layer was quantized
    steps = gptq_layer_groups({("int4", 32, True): ["model.layers.0.attn.q_proj", "model.layers.1.mlp.up_proj",
                                                    "lm_head"]})
    assert steps == [{("int4", 32, True): ["lm_head"]}, {("int4", 32, True): ["model.layers.1.mlp.up_proj"]},
                     {("int4", 32, True): ["model.layers.0.attn.q_proj"]}]
    assert gptq_layer_groups({("int4", None, True): ["proj_in", "model.layers.0.x"]}) == [
        {("int4", None, True): ["proj_in", "model.layers.0.x"]}]


def test_memory_worker_reports_its_own_peak_not_the_parents():
    """`bench memory` runs each measurement in a child process; Linux carries the parent's ru_maxrss into a
    forked-then-exec'd child, so the child's peak must come from its own VmHWM."""
    import subprocess
    import sys

    ballast = bytearray(1200 * 2**20)  # the parent's RSS: +1200 MiB, touched
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    code = "from attnres_quant.bench.memory import _peak_rss_bytes; print(_peak_rss_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) < 700 * 2**20  # the child imports torch: ~230 MiB
    del ballast


@pytest.mark.parametrize("bits,group,symmetric", [("int4", 32, True), ("int4", None, False), ("int8", 16, True)])
def test_rtn_in_place_by_row_blocks_is_bit_identical(bits, group, symmetric):
    """RTN writes a weight a block of rows at a time (bounded temporaries); groups never cross a row,
    so every block size gives the whole-tensor result bit for bit (2-D and expert-stacked 3-D)."""
    from attnres_quant.quant.rtn import fake_quantize_weight, fake_quantize_weight_

    torch.manual_seed(0)
    for shape in [(301, 64), (3, 50, 32)]:
        w = (torch.randn(shape) * torch.rand(shape[-1])).to(torch.bfloat16)
        whole = fake_quantize_weight(w, bits, group, symmetric)
        for chunk in (64, 1000, 4096, w.numel()):
            got = w.clone()
            fake_quantize_weight_(got, bits, group, symmetric, chunk_elements=chunk)
            assert torch.equal(got, whole), (shape, chunk)
