"""Latency/memory harness and the overhead / kernels benchmarks (tiny shapes, CPU)."""

import json

import pytest
import torch
from torch import nn

from attnres_quant.bench import machine_info, measure_interleaved, measure_latency, weight_bytes
from attnres_quant.bench.latency import summarize
from attnres_quant.bench.overhead import build_overhead_models, logit_agreement
from attnres_quant.model import AttnResConfig, AttnResForCausalLM

VOCAB = 97


def tiny(block_size=4, tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = AttnResConfig(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, vocab_size=VOCAB,
                        intermediate_size=96, attnres_block_size=block_size, tie_word_embeddings=tie)
    return AttnResForCausalLM(cfg).eval()


def test_measure_latency_is_well_formed_on_cpu():
    r = measure_latency(tiny(), prompt_len=8, batch_size=2, decode_tokens=3, warmup=1, repeats=3,
                        simulated=False, kernel="torch-fp32", threads=1)
    for key in ("prefill_ms", "prefill_ms_iqr", "decode_ms_per_token", "decode_ms_per_token_iqr",
                "tokens_per_s", "prefill_tokens_per_s", "weight_bytes", "peak_mem_bytes"):
        assert isinstance(r[key], (int, float)) and r[key] >= 0, key
    assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0
    assert len(r["prefill_ms_samples"]) == 3 and len(r["decode_ms_per_token_samples"]) == 3
    assert r["tokens_per_s"] == pytest.approx(1e3 * 2 / r["decode_ms_per_token"])
    assert r["threads"] == 1 and r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["peak_mem_kind"] == "rss_delta" and r["clock"] == "wall"
    assert r["simulated"] is False and r["kernel"] == "torch-fp32"
    assert (r["prompt_len"], r["batch_size"], r["decode_tokens"], r["repeats"]) == (8, 2, 3, 3)
    json.dumps(r)  # serialisable as stored in results.json


def test_simulated_variants_are_flagged_in_every_result():
    models = {"base": tiny(), "fake_int4": tiny(seed=1)}
    res = measure_interleaved(models, prompt_len=4, decode_tokens=2, warmup=0, repeats=2,
                              simulated={"base": False, "fake_int4": True},
                              kernel={"base": "torch", "fake_int4": "simulated int4 (dense fp32)"},
                              measure_memory=False)
    assert res["base"]["simulated"] is False
    assert res["fake_int4"]["simulated"] is True and res["fake_int4"]["kernel"].startswith("simulated")
    single = measure_latency(tiny(), prompt_len=4, decode_tokens=1, warmup=0, repeats=1, simulated=True,
                             measure_memory=False)
    assert single["simulated"] is True


def test_summarize_median_and_iqr():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["median"] == 3.0 and s["p25"] == 2.0 and s["p75"] == 4.0 and s["iqr"] == 2.0


def test_weight_bytes_is_the_sum_over_stored_tensors():
    model = tiny()
    expected = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    assert weight_bytes(model) == expected
    assert weight_bytes(model.to(torch.bfloat16)) == expected // 2


def test_weight_bytes_counts_tied_weights_once():
    model = tiny(tie=True)
    assert model.lm_head.weight is model.model.embeddings.weight
    assert weight_bytes(model) == sum(p.nbytes for p in model.parameters())  # parameters() dedupes


def test_weight_bytes_of_packed_nf4_is_half_a_byte_per_weight_plus_scales():
    bnb = pytest.importorskip("bitsandbytes")
    src = nn.Linear(256, 512, bias=False)
    layer = bnb.nn.Linear4bit(256, 512, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(src.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    w = layer.weight
    assert w.dtype == torch.uint8 and w.nbytes == 512 * 256 // 2  # two 4-bit codes per byte
    qs = w.quant_state
    stored = [w.data, qs.absmax, qs.code]
    if qs.nested:
        stored += [qs.offset, qs.state2.absmax, qs.state2.code]
    expected = sum(t.nbytes for t in stored)
    assert weight_bytes(layer) == expected
    assert 512 * 256 // 2 < weight_bytes(layer) < 512 * 256 * 0.6  # ~4.1-4.5 bits per weight


def test_weight_bytes_of_bnb_int8_includes_row_scales():
    bnb = pytest.importorskip("bitsandbytes")
    src = nn.Linear(256, 512, bias=False)
    layer = bnb.nn.Linear8bitLt(256, 512, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(src.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    assert weight_bytes(layer) == 512 * 256 + 512 * 4  # int8 weights + fp32 per-row scale (CB aliases data)


def test_weight_bytes_of_torchao_int8_counts_qdata_and_scales():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = nn.Sequential(nn.Linear(256, 512, bias=False))
    quantize_(model, Int8WeightOnlyConfig())
    w = model[0].weight
    names, _ = w.__tensor_flatten__()
    expected = sum(getattr(w, n).nbytes for n in names)
    assert weight_bytes(model) == expected
    assert 512 * 256 <= expected < 512 * 256 * 1.1


def test_overhead_models_share_weights_and_agree_on_logits():
    models = build_overhead_models(hidden_size=64, layers=4, block_size=4, vocab_size=VOCAB, num_heads=4)
    assert set(models) == {"standard", "block", "block_naive", "full"}
    std_q = models["standard"].model.layers[1].mlp.up_proj.weight
    for name in ("block", "block_naive", "full"):
        assert models[name].model.layers[1].mlp.up_proj.weight.data_ptr() == std_q.data_ptr()
        for p_name, p in models[name].named_parameters():
            if p_name.endswith("res_proj.weight"):
                assert torch.count_nonzero(p) == 0
    assert models["block"].config.attnres_two_phase and not models["block_naive"].config.attnres_two_phase
    assert models["full"].config.attnres_block_size == 1
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    diffs = logit_agreement(models, ids)
    assert max(diffs.values()) < 1e-4, diffs


def test_overhead_cli_prints_json_with_required_keys(capsys):
    from attnres_quant.cli import main

    rc = main(["bench", "overhead", "--hidden-size", "64", "--layers", "2", "--block-size", "2",
               "--seq-len", "8", "--batch-size", "1", "--device", "cpu", "--dtype", "float32",
               "--vocab-size", str(VOCAB), "--num-heads", "4", "--decode-tokens", "2", "--warmup", "0",
               "--repeats", "2", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("config", "machine", "standard", "block", "block_naive", "full", "ratios"):
        assert key in out
    for name in ("standard", "block", "block_naive", "full"):
        assert out[name]["prefill_ms"] > 0 and out[name]["decode_ms_per_token"] > 0
        assert out[name]["max_abs_logit_diff_vs_standard"] < 1e-4
    for key in ("block_prefill", "block_decode", "block_naive_prefill", "full_prefill"):
        assert out["ratios"][key] > 0
    assert out["ratios"]["block_prefill"] == pytest.approx(out["block"]["prefill_ms"] / out["standard"]["prefill_ms"])
    assert out["config"]["hidden_size"] == 64 and out["config"]["block_size"] == 2
    assert out["machine"]["torch"] == torch.__version__


def test_kernels_bench_runs_real_variants_on_a_tiny_model():
    pytest.importorskip("torchao")
    pytest.importorskip("bitsandbytes")
    from attnres_quant.bench.kernels import run_kernels

    r = run_kernels(hidden_size=128, layers=2, seq_len=8, vocab_size=VOCAB, num_heads=4, decode_tokens=2,
                    warmup=0, repeats=1, variants=["bf16", "torchao_int8_dyn", "bnb_nf4", "torchao_int4_wo"])
    v = r["variants"]
    assert v["bf16"]["decode_speedup_vs_bf16"] == pytest.approx(1.0)
    for name in ("torchao_int8_dyn", "bnb_nf4"):
        assert v[name]["supported"] and v[name]["simulated"] is False
        assert v[name]["weight_bytes"] < v["bf16"]["weight_bytes"]
        assert v[name]["rel_logit_error_vs_bf16"] < 0.5
        assert v[name]["decode_bandwidth_utilisation"] > 0
    assert "supported" in v["torchao_int4_wo"]  # either timed or reported unsupported with a reason
    assert r["copy_bandwidth_gbs"] > 0


def test_machine_info_records_what_a_figure_needs():
    info = machine_info("cpu")
    for key in ("cpu_model", "physical_cores", "torch_threads", "torch", "device_name", "date_utc"):
        assert info[key] not in (None, "")


def test_weight_bytes_of_fbgemm_dynamic_int8_reads_the_packed_weight():
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = quantize_dynamic(nn.Sequential(nn.Linear(256, 512)), {"0": per_channel_dynamic_qconfig},
                             dtype=torch.qint8)
    # int8 values + per-channel fp64 scales and int64 zero points + fp32 bias
    assert weight_bytes(model) == 512 * 256 + 512 * 8 + 512 * 8 + 512 * 4


def test_overhead_cli_defaults_to_bf16_and_fp32_at_batch_1_and_8(capsys):
    from attnres_quant.cli import main

    rc = main(["bench", "overhead", "--hidden-size", "64", "--layers", "2", "--block-size", "2",
               "--seq-len", "8", "--device", "cpu", "--vocab-size", str(VOCAB), "--num-heads", "4",
               "--decode-tokens", "2", "--warmup", "0", "--repeats", "1", "--variants", "block", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["dtype"], r["batch_size"]) for r in out["summary"]] == [
        ("bfloat16", 1), ("bfloat16", 8), ("float32", 1), ("float32", 8)]
    for run, row in zip(out["runs"], out["summary"]):
        assert run["config"]["dtype"] == row["dtype"] and run["config"]["batch_size"] == row["batch_size"]
        assert set(row["ratios"]) == {"block_prefill", "block_decode"}
        assert "block" in run and "block_naive" not in run
        assert row["ratios"]["block_prefill"] == pytest.approx(run["block"]["prefill_ms"] / run["standard"]["prefill_ms"])
    assert out["machine"]["torch"] == torch.__version__
    # the table form prints every run and the summary
    assert main(["bench", "overhead", "--hidden-size", "64", "--layers", "2", "--block-size", "2",
                 "--seq-len", "8", "--batch-size", "1,2", "--dtype", "float32", "--vocab-size", str(VOCAB),
                 "--num-heads", "4", "--decode-tokens", "1", "--warmup", "0", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert text.count("AttnRes overhead:") == 2 and "summary" in text


def test_kimi_bench_cli_prints_json_with_required_keys(capsys, tmp_path):
    """`bench kimi --size tiny`: our Block-AttnRes Kimi model, the same model with the standard residual and
    transformers' native kimi_linear, timed on one thread; the JSON has the figures docs/benchmarks.md quotes."""
    from attnres_quant.cli import main

    out_file = tmp_path / "kimi.json"
    rc = main(["bench", "kimi", "--size", "tiny", "--seq-len", "8", "--decode-tokens", "2", "--warmup", "0",
               "--repeats", "1", "--json", "--output", str(out_file)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads(out_file.read_text()) == out
    for key in ("config", "machine", "attnres", "standard", "kimi_linear", "ratios"):
        assert key in out
    for name in ("attnres", "standard", "kimi_linear"):
        r = out[name]
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0
        assert r["prefill_tokens_per_s"] == pytest.approx(8 * 1e3 / r["prefill_ms"])
        assert r["decode_tokens_per_s"] == pytest.approx(1e3 / r["decode_ms_per_token"])
    assert out["ratios"]["attnres_vs_kimi_linear_decode"] == pytest.approx(
        out["attnres"]["decode_ms_per_token"] / out["kimi_linear"]["decode_ms_per_token"])
    assert {"attnres_vs_standard_prefill", "attnres_vs_kimi_linear_prefill"} <= set(out["ratios"])
    c = out["config"]
    assert c["threads"] == 1 and c["clock"] == "process_cpu_time" and c["seq_len"] == 8
    # attnres and standard share every sub-layer weight; the native model has no depth parameters
    assert c["params"]["attnres"] > c["params"]["standard"] > 0 and c["params"]["kimi_linear"] > 0
    assert "load_avg_1m" in out["machine"]
