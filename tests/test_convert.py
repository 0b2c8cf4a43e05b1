"""Retrofit conversion (``convert`` verb): Llama-style PreNorm checkpoint -> Block/Full AttnRes, identical logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

from attnres_quant.cli import main as cli_main
from attnres_quant.convert import convert_checkpoint, convert_config
from attnres_quant.errors import UserError
from attnres_quant.loading import describe_model, load_model

pytestmark = pytest.mark.filterwarnings("ignore::attnres_quant.loading.LoadingWarning")

VOCAB = 97
IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(7))
FLA_FIELDS = ("hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads", "intermediate_size", "hidden_ratio",
              "vocab_size", "rope_theta", "norm_eps", "attnres_block_size", "tie_word_embeddings",
              "max_position_embeddings")


def tiny_source(tmp_path, kind="llama", seed=0, layers=4, tokenizer=True, **overrides):
    """A tiny HF causal LM saved with transformers. initializer_range 0.2: activations of a trained model's scale,
    so the RMSNorm epsilon (the identity property's only error term) is negligible (see tests/test_model.py)."""
    import transformers

    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
             "mistral": ("MistralConfig", "MistralForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    cfg_cls, model_cls = names[kind]
    kw = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=VOCAB, initializer_range=0.2, rope_theta=5000.0)
    if kind == "mistral":
        kw["sliding_window"] = None
    if kind == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    path = tmp_path / f"src-{kind}"
    model.save_pretrained(str(path))
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(path))
    return model, path


def logits_diff(source, out_dir, ids=IDS):
    converted, tok = load_model(str(out_dir), dtype="float32")
    with torch.no_grad():
        return (source(ids).logits - converted(ids).logits).abs().max().item(), converted, tok


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_tiny_llama_converts_with_identical_logits(tmp_path, block_size):
    source, src = tiny_source(tmp_path)
    out = tmp_path / f"attnres-{block_size}"
    card = convert_checkpoint(str(src), out, block_size=block_size, verify="no")
    diff, converted, tok = logits_diff(source, out)
    assert diff < 1e-4, diff
    desc = describe_model(converted)
    assert desc["family"] == ("attnres-full" if block_size == 1 else "attnres-block")
    assert desc["block_size"] == block_size and desc["model_type"] == "transformer"
    # FLA-named config, no Llama names.
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "transformer" and cfg["attnres_block_size"] == block_size
    assert all(k in cfg for k in FLA_FIELDS)
    assert cfg["num_kv_heads"] == 2 and cfg["rope_theta"] == 5000.0 and cfg["norm_eps"] == 1e-6
    assert not {"num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_parameters"} & set(cfg)
    # FLA-named tensors; zero pseudo-queries and unit key norms.
    tensors = load_file(str(out / "model.safetensors"))
    assert all(k.startswith(("model.embeddings", "model.layers.", "model.norm", "model.res_", "lm_head"))
               for k in tensors)
    assert "model.embeddings.weight" in tensors and "model.layers.3.attn.q_proj.weight" in tensors
    depth = {k: v for k, v in tensors.items() if "res_proj" in k or "res_norm" in k}
    assert len(depth) == 2 * (2 * 4 + 1)
    assert all(torch.count_nonzero(v) == 0 for k, v in depth.items() if "res_proj" in k)
    assert all(torch.all(v == 1) for k, v in depth.items() if "res_norm" in k)
    # Tokenizer copied; card written.
    assert tok is not None and (out / "tokenizer.json").is_file()
    assert card["source_model_type"] == "llama" and "tokenizer.json" in card["tokenizer_files"]
    assert json.loads((out / "conversion_card.json").read_text())["attnres_block_size"] == block_size


def test_generation_with_kv_cache_matches_source(tmp_path):
    source, src = tiny_source(tmp_path)
    out = tmp_path / "attnres"
    convert_checkpoint(str(src), out, block_size=2, verify="no")
    converted, _ = load_model(str(out), dtype="float32")
    prompt = IDS[:1, :6]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(source.generate(prompt, **kw), converted.generate(prompt, **kw))


@pytest.mark.parametrize("kind,overrides", [("qwen2", {}), ("qwen2", {"tie_word_embeddings": True}),
                                            ("mistral", {})])
def test_qwen2_and_mistral_convert(tmp_path, kind, overrides):
    source, src = tiny_source(tmp_path, kind, **overrides)
    out = tmp_path / "out"
    card = convert_checkpoint(str(src), out, block_size=2, verify="yes")
    assert card["verification"]["max_abs_logit_diff"] < 1e-4
    diff, converted, _ = logits_diff(source, out)
    assert diff < 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["qkv_bias"] is (kind == "qwen2")
    if overrides.get("tie_word_embeddings"):
        assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))


def test_sharded_source_gives_sharded_output(tmp_path):
    source, _ = tiny_source(tmp_path, tokenizer=False)
    src = tmp_path / "sharded"
    source.save_pretrained(str(src), max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="no tokenizer"):
        convert_checkpoint(str(src), out, block_size=4, verify="no")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.res_proj.weight" in index["weight_map"]
    diff, _, tok = logits_diff(source, out)
    assert diff < 1e-4 and tok is None


def test_standard_attnres_checkpoint_converts(tmp_path):
    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    torch.manual_seed(0)
    std = AttnResForCausalLM(AttnResConfig(hidden_size=64, num_hidden_layers=4, num_heads=4, num_kv_heads=2,
                                           vocab_size=VOCAB, intermediate_size=96, initializer_range=0.2)).eval()
    std.save_pretrained(str(tmp_path / "std"))
    convert_checkpoint(str(tmp_path / "std"), tmp_path / "blk", block_size=2, verify="no")
    diff, _, _ = logits_diff(std, tmp_path / "blk")
    assert diff < 1e-4


def test_cli_convert(tmp_path, capsys):
    _, src = tiny_source(tmp_path)
    out = tmp_path / "cli-out"
    assert cli_main(["convert", str(src), str(out), "--block-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "Block AttnRes (S=2)" in text and "max |logit diff|" in text
    card = json.loads((out / "conversion_card.json").read_text())
    assert card["verification"]["max_abs_logit_diff"] < 1e-4
    assert card["verification"]["top1_agreement"] == 1.0
    # A second run into the same directory is refused (exit 2, clear message), --overwrite replaces.
    assert cli_main(["convert", str(src), str(out), "--block-size", "2", "--verify", "no"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["convert", str(src), str(out), "-S", "1", "--verify", "no", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["attnres_block_size"] == 1


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kind,overrides,match", [
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}}, "RoPE scaling 'llama3'"),
    ("llama", {"attention_bias": True}, "o_proj"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"head_dim": 32}, "head_dim"),
    ("mistral", {"sliding_window": 4096}, "--ignore-sliding-window"),
    ("qwen3", {}, "QK-norm"),
])
def test_unconvertible_sources_are_refused_before_writing(tmp_path, kind, overrides, match):
    _, src = tiny_source(tmp_path, kind, tokenizer=False, **overrides)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        convert_checkpoint(str(src), out, block_size=2, verify="no")
    assert not out.exists()


def test_sliding_window_opt_in(tmp_path):
    source, src = tiny_source(tmp_path, "mistral", tokenizer=False, sliding_window=4096)
    card = convert_checkpoint(str(src), tmp_path / "out", block_size=2, verify="yes", ignore_sliding_window=True)
    assert card["ignore_sliding_window"] and card["verification"]["max_abs_logit_diff"] < 1e-4  # 13 < window


def test_bad_block_size_and_already_attnres(tmp_path):
    with pytest.raises(UserError, match="block-size"):
        convert_config({"model_type": "llama"}, 3)
    with pytest.raises(UserError, match="already an AttnRes"):
        convert_config({"model_type": "transformer", "attnres_block_size": 2}, 2)


def test_pickle_source_needs_allow_pickle(tmp_path, monkeypatch):
    source, src = tiny_source(tmp_path, tokenizer=False)
    pk = tmp_path / "pickle"
    pk.mkdir()
    (pk / "config.json").write_text((src / "config.json").read_text())
    torch.save(source.state_dict(), pk / "pytorch_model.bin")
    with monkeypatch.context() as m:
        m.setattr(torch, "load", lambda *a, **k: pytest.fail("pickle was read"))
        with pytest.raises(UserError, match="--allow-pickle"):
            convert_checkpoint(str(pk), tmp_path / "out", block_size=2, verify="no")
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning):
        card = convert_checkpoint(str(pk), tmp_path / "out", block_size=2, verify="yes", allow_pickle=True)
    assert card["verification"]["max_abs_logit_diff"] < 1e-4
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_hub_source_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline"):
        convert_checkpoint("attnres-quant-tests/not-a-cached-model", tmp_path / "out", block_size=2)
    assert not (tmp_path / "out").exists()


def test_convert_config_reads_transformers_v4_style_configs():
    v4 = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 1, "intermediate_size": 96, "vocab_size": 97, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": True,
          "bos_token_id": 1, "eos_token_id": [2, 3], "max_position_embeddings": 4096}
    cfg = convert_config(v4, 4)
    assert cfg["rope_theta"] == 500000.0 and cfg["norm_eps"] == 1e-5 and cfg["num_kv_heads"] == 1
    assert cfg["eos_token_id"] == [2, 3] and cfg["tie_word_embeddings"] is True and cfg["hidden_act"] == "swish"
    assert cfg["max_position_embeddings"] == 4096 and cfg["attnres_block_size"] == 4
    assert convert_config({**v4, "pad_token_id": 97}, 2)["pad_token_id"] is None  # outside the vocabulary
    with pytest.raises(UserError, match="RoPE scaling 'linear'"):
        convert_config({**v4, "rope_scaling": {"type": "linear", "factor": 2.0}}, 2)
    with pytest.raises(UserError, match="hidden_act"):
        convert_config({**v4, "hidden_act": "gelu"}, 2)


def _byte_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(str(path))
    return len(vocab)


@pytest.mark.slow
def test_tiny_llama_and_its_retrofit_run_through_the_study_pipeline(tmp_path):
    """Issue 8: a third-party Llama runs through `run` with its components resolved, and its Block AttnRes
    retrofit gives the same baseline numbers (identity property)."""
    pytest.importorskip("attnres_quant.pipeline.runner")
    import transformers

    src = tmp_path / "llama"
    vocab = _byte_tokenizer(src)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=vocab, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )).save_pretrained(str(src))
    convert_checkpoint(str(src), tmp_path / "llama-block2", block_size=2, verify="no")
    cfg = tmp_path / "tiny_llama.yaml"
    cfg.write_text(f"""
name: tiny_llama
device: cpu
dtype: float32
models:
  - {{path: {src}, name: llama}}
  - {{path: {tmp_path / 'llama-block2'}, name: llama-block2}}
variants:
  - name: int4_hybrid
    method: rtn
    default: {{weight: int4, group_size: 32}}
    rules:
      - {{select: depth.*, weight: bf16}}
tasks: [proxy_mc]
eval: {{limit: 2, batch_size: 4}}
quality: {{max_tokens: 64, seq_len: 32}}
bench: {{enabled: false}}
""")
    out = tmp_path / "reports"
    assert cli_main(["run", str(cfg), "--out", str(out)]) == 0
    cells = json.loads((out / "tiny_llama" / "results.json").read_text())["cells"]
    assert cells["llama/bf16/model"]["value"]["family"] == "llama"
    assert cells["llama-block2/bf16/model"]["value"]["family"] == "attnres-block"
    for model in ("llama", "llama-block2"):
        plan = cells[f"{model}/int4_hybrid/plan"]
        assert plan["status"] == "ok" and plan["value"]["weights_by_precision"].get("int4", 0) > 0
    base, retro = cells["llama/bf16/quality"]["value"], cells["llama-block2/bf16/quality"]["value"]
    assert base["bpb"] == pytest.approx(retro["bpb"], rel=1e-4)
