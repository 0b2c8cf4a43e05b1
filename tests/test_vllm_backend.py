"""vLLM backend: the exported checkpoint, lm-eval's `vllm` model args and the real-kernel latency labels flow
through `run`. vLLM is CUDA-only: here lm-eval's vllm model is replaced by a fake (HFLM on the checkpoint it is
handed) and `vllm bench latency` by a fake JSON writer; the real run is the `gpu`-marked test."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from attnres_quant import vllm_backend
from attnres_quant.cli import main as cli_main


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A Llama-family checkpoint (an architecture vLLM implements) with a tokenizer."""
    import transformers as tf

    from attnres_quant.evaluation.testing import tiny_tokenizer

    out = tmp_path_factory.mktemp("llama") / "tiny-llama"
    tok = tiny_tokenizer(vocab_size=320)
    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


class FakeVLLM:
    """Stands in for lm-eval's `vllm` model: records its arguments, then scores with HFLM on the checkpoint."""

    calls: list[dict] = []

    def __new__(cls, pretrained, **kwargs):
        from lm_eval.models.huggingface import HFLM

        from attnres_quant.loading import load_model

        cls.calls.append({"pretrained": pretrained, **kwargs})
        model, tok = load_model(pretrained, dtype=kwargs["dtype"])
        return HFLM(pretrained=model, tokenizer=tok, batch_size=kwargs["batch_size"], backend="causal")


@pytest.fixture
def fake_vllm(monkeypatch):
    benches: list[list[str]] = []

    def fake_bench(cmd):
        benches.append(cmd)
        out_len = int(cmd[cmd.index("--output-len") + 1])
        return {"avg_latency": 0.010 + 0.002 * (out_len - 1), "latencies": [0.01],
                "percentiles": {"25": 0.009, "50": 0.010, "75": 0.012}}

    FakeVLLM.calls = []
    monkeypatch.setattr(vllm_backend, "lm_eval_model_class", lambda: FakeVLLM)
    monkeypatch.setattr(vllm_backend, "run_bench", fake_bench)
    monkeypatch.setattr(vllm_backend, "REQUIRED_DEVICE", "cpu")
    return benches


def study(tmp_path, model_path, **over) -> Path:
    fp8 = {"method": "rtn", "default": {"weight": "fp8"}}   # exported bit-exactly (test_export)
    cfg = {"name": "served", "seed": 0, "device": "cpu", "dtype": "bfloat16", "model": {"path": str(model_path)},
           "variants": [{"name": "fp8_hf", **fp8, "backend": "hf"}, {"name": "fp8_vllm", **fp8}],
           "tasks": ["proxy_mc"], "eval": {"batch_size": 8, "limit": 4, "backend": "vllm",
                                           "vllm": {"tensor_parallel_size": 2, "max_model_len": 256}},
           "quality": {"max_tokens": 64, "seq_len": 32},
           "bench": {"prompt_len": 8, "decode_tokens": 4, "warmup": 0, "repeats": 1, "threads": 1}}
    cfg.update(over)
    path = tmp_path / "served.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_vllm_backend_serves_the_exported_checkpoint_with_labels(tmp_path, tiny_llama, fake_vllm, one_thread):
    out = tmp_path / "out"
    assert cli_main(["run", str(study(tmp_path, tiny_llama)), "--out", str(out)]) == 0
    cells = json.loads((out / "served" / "results.json").read_text())["cells"]
    exported = (out / "served" / "exported" / "tiny-llama" / "fp8_vllm").resolve()
    # lm-eval's vllm model got the exported compressed-tensors checkpoint (variant) / the checkpoint (baseline)
    assert [Path(c["pretrained"]).resolve() for c in FakeVLLM.calls] == [tiny_llama.resolve(), exported]
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert FakeVLLM.calls[1] | {"pretrained": None} == {
        "pretrained": None, "dtype": "bfloat16", "seed": 0, "batch_size": 8, "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.8, "trust_remote_code": False, "enforce_eager": False, "max_model_len": 256}
    # task cells say which backend and checkpoint scored them; the fp8 checkpoint scores as the simulation does
    served = cells["tiny-llama/fp8_vllm/task:proxy_mc"]["value"]["proxy_mc"]
    assert served["backend"] == "vllm" and Path(served["served_path"]).resolve() == exported
    in_process = cells["tiny-llama/fp8_hf/task:proxy_mc"]["value"]["proxy_mc"]
    assert "backend" not in in_process and served["per_sample"] == in_process["per_sample"]
    # latency: vLLM's bench on the same checkpoint, 1 token (prefill) and 1 + decode_tokens, labelled real
    runs = [c for c in fake_vllm if Path(c[c.index("--model") + 1]).resolve() == exported]
    assert [c[c.index("--output-len") + 1] for c in runs] == ["1", "5"]
    assert all(c[c.index("--tensor-parallel-size") + 1] == "2" and c[c.index("--input-len") + 1] == "8"
               for c in runs)
    lat = cells["tiny-llama/fp8_vllm/latency"]["value"]
    assert lat["kernel"] == "vllm" and lat["simulated"] is False and lat["real"] is True
    assert lat["prefill_ms"] == pytest.approx(10.0) and lat["decode_ms_per_token"] == pytest.approx(2.0)
    assert lat["prefill_ms_iqr"] == pytest.approx(3.0) and lat["tokens_per_s"] == pytest.approx(500.0)
    assert cells["tiny-llama/bf16/latency"]["value"]["kernel"] == "vllm"
    assert cells["tiny-llama/fp8_hf/latency"]["value"]["kernel"] != "vllm"
    # quality stays in-process (vLLM gives top-k log-probabilities, not the distributions KL needs)
    assert cells["tiny-llama/fp8_vllm/quality"]["value"]["kl_mean"] is not None


@pytest.mark.parametrize("mutate, expect", [
    (lambda c: c["variants"][1].update(method="gptq", default={"weight": "int4", "group_size": 32}),
     "only methods rtn, none export as compressed-tensors"),
    (lambda c: c.update(model={"path": "zoo:tiny-block"}), "vLLM does not implement model_type 'attnres'"),
])
def test_vllm_backend_preflight_refusals(tmp_path, tiny_llama, fake_vllm, capsys, mutate, expect):
    path = study(tmp_path, tiny_llama)
    cfg = yaml.safe_load(path.read_text())
    mutate(cfg)
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert expect in capsys.readouterr().err
    assert not (tmp_path / "out" / "served").exists()


def test_vllm_is_cuda_only_and_needs_the_package(tmp_path, tiny_llama, capsys):
    assert cli_main(["run", str(study(tmp_path, tiny_llama)), "--out", str(tmp_path / "out")]) == 2
    assert "the vLLM backend, which is CUDA-only" in capsys.readouterr().err
    with pytest.raises(Exception, match="pip install vllm"):
        vllm_backend.lm_eval_model_class()   # vllm is not installed here


@pytest.mark.gpu
def test_vllm_backend_real_run_on_gpu(tmp_path, tiny_llama):
    """On a GPU machine with vLLM: the same study with real vLLM (needs `pip install vllm`)."""
    pytest.importorskip("vllm")
    out = tmp_path / "out"
    assert cli_main(["run", str(study(tmp_path, tiny_llama, device="cuda")), "--out", str(out),
                     "--set", "eval.vllm.tensor_parallel_size=1"]) == 0
    cells = json.loads((out / "served" / "results.json").read_text())["cells"]
    assert cells["tiny-llama/fp8_vllm/latency"]["value"]["real"] is True
