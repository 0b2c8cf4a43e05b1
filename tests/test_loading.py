"""Model loading: FLA checkpoints, Llama-family comparators, zoo/local/hub paths and the safety refusals."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnres_quant import loading
from attnres_quant.errors import UserError
from attnres_quant.loading import LoadingWarning, describe_model, load_model, preflight_model, zoo_path

pytestmark = pytest.mark.filterwarnings("ignore::attnres_quant.loading.LoadingWarning")

VOCAB = 97
D, LAYERS, HEADS, KV_HEADS = 64, 3, 4, 2
HEAD_DIM = D // HEADS
FLA_INTERMEDIATE = 256  # FLA's GatedMLP rule for hidden 64, hidden_ratio 4: 2/3 * 256 = 170 -> multiple of 256


# --------------------------------------------------------------------------- fixtures
def fla_config(block_size=2, tie=False, qkv_bias=False, **overrides):
    """config.json as FLA's TransformerConfig writes it (all of FLA's field names, none of ours)."""
    cfg = {
        "architectures": ["TransformerForCausalLM"], "model_type": "transformer",
        "hidden_size": D, "num_hidden_layers": LAYERS, "num_heads": HEADS, "num_kv_heads": KV_HEADS,
        "qkv_bias": qkv_bias, "qk_norm": False, "window_size": None, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "hidden_ratio": 4, "intermediate_size": None, "hidden_act": "swish",
        "initializer_range": 0.02, "elementwise_affine": True, "norm_eps": 1e-6, "use_cache": True,
        "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": tie,
        "fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False,
        "use_l2warp": False, "vocab_size": VOCAB, "attnres_block_size": block_size,
        "dtype": "float32", "transformers_version": "4.57.0",
    }
    cfg.update(overrides)
    return cfg


def fla_tensors(block_size=2, tie=False, qkv_bias=False, seed=0):
    """Parameter names and shapes from SPEC section 1 (FLA's TransformerForCausalLM), built by hand."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    inter, kv = FLA_INTERMEDIATE, KV_HEADS * HEAD_DIM
    t = {"model.embeddings.weight": rnd(VOCAB, D), "model.norm.weight": 1 + rnd(D, scale=0.1)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t.update({
            p + "attn_norm.weight": 1 + rnd(D, scale=0.1), p + "mlp_norm.weight": 1 + rnd(D, scale=0.1),
            p + "attn.q_proj.weight": rnd(D, D), p + "attn.k_proj.weight": rnd(kv, D),
            p + "attn.v_proj.weight": rnd(kv, D), p + "attn.o_proj.weight": rnd(D, D),
            p + "mlp.gate_proj.weight": rnd(inter, D), p + "mlp.up_proj.weight": rnd(inter, D),
            p + "mlp.down_proj.weight": rnd(D, inter),
        })
        if qkv_bias:
            t.update({p + "attn.q_proj.bias": rnd(D), p + "attn.k_proj.bias": rnd(kv), p + "attn.v_proj.bias": rnd(kv)})
        if block_size is not None:
            t.update({p + "attn_res_proj.weight": rnd(1, D), p + "attn_res_norm.weight": 1 + rnd(D, scale=0.1),
                      p + "mlp_res_proj.weight": rnd(1, D), p + "mlp_res_norm.weight": 1 + rnd(D, scale=0.1)})
    if block_size is not None:
        t.update({"model.res_proj.weight": rnd(1, D), "model.res_norm.weight": 1 + rnd(D, scale=0.1)})
    if not tie:
        t["lm_head.weight"] = rnd(VOCAB, D)
    return t


def write_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(directory))


def write_fla_checkpoint(directory, block_size=2, tie=False, qkv_bias=False, tokenizer=False, drop=(), **cfg):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fla_config(block_size, tie, qkv_bias, **cfg), indent=2))
    tensors = {k: v for k, v in fla_tensors(block_size, tie, qkv_bias).items() if k not in drop}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        write_tokenizer(directory)
    return tensors


IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fail the test if anything tries to read model weights."""
    from transformers import AutoModelForCausalLM

    def boom(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(torch, "load", boom)


# --------------------------------------------------------------------------- FLA checkpoints
@pytest.mark.parametrize("block_size,tie,qkv_bias", [(2, False, False), (1, True, False), (4, False, True),
                                                     (None, False, False)])
def test_fla_checkpoint_loads_without_missing_or_unexpected_keys(tmp_path, block_size, tie, qkv_bias):
    from transformers import AutoModelForCausalLM

    from attnres_quant.model import AttnResForCausalLM

    ckpt = tmp_path / "fla"
    tensors = write_fla_checkpoint(ckpt, block_size, tie, qkv_bias)
    model, info = AutoModelForCausalLM.from_pretrained(str(ckpt), output_loading_info=True, dtype=torch.float32)
    assert isinstance(model, AttnResForCausalLM)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert model.config.model_type == "transformer"
    assert model.config.mlp_intermediate_size == FLA_INTERMEDIATE  # FLA's hidden_ratio rule
    state = model.state_dict()
    for name, value in tensors.items():
        assert torch.equal(state[name], value), name  # every tensor landed where FLA put it
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()
    # Runs on CPU, depth path exposed for policies.
    with torch.no_grad():
        logits = model.eval()(IDS).logits
    assert torch.isfinite(logits).all()
    n_mixers = 0 if block_size is None else 2 * LAYERS + 1
    assert len(model.model.depth_mixers()) == n_mixers


@pytest.mark.parametrize("block_size,tie", [(2, False), (1, True)])
def test_fla_checkpoint_round_trips_through_save_and_load(tmp_path, block_size, tie):
    src = tmp_path / "fla"
    tensors = write_fla_checkpoint(src, block_size, tie, tokenizer=True)
    model, tok = load_model(str(src), dtype="float32")
    assert tok is not None and tok("w5 w6")["input_ids"][-2:] == [5, 6]
    with torch.no_grad():
        before = model(IDS).logits
    out = tmp_path / "saved"
    model.save_pretrained(str(out))
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(tensors)  # written back under FLA's names, nothing added or lost
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "transformer" and cfg["attnres_block_size"] == block_size
    for key in ("hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads", "norm_eps", "rope_theta",
                "tie_word_embeddings", "vocab_size", "hidden_ratio"):
        assert key in cfg, key
    again, _ = load_model(str(out), dtype="float32")
    with torch.no_grad():
        after = again(IDS).logits
    assert torch.equal(before, after)


def test_fla_options_the_reference_does_not_implement_are_refused(tmp_path, no_weight_loading):
    ckpt = tmp_path / "qk"
    write_fla_checkpoint(ckpt, qk_norm=True)
    with pytest.raises(UserError, match="qk_norm"):
        load_model(str(ckpt))
    ckpt1 = tmp_path / "norope"
    write_fla_checkpoint(ckpt1, rope_theta=None)
    with pytest.raises(UserError, match="rope_theta"):
        load_model(str(ckpt1))
    ckpt2 = tmp_path / "odd"
    write_fla_checkpoint(ckpt2, attnres_block_size=3)
    with pytest.raises(UserError, match="attnres_block_size"):
        preflight_model(str(ckpt2))


def test_missing_weights_are_an_error(tmp_path):
    ckpt = tmp_path / "partial"
    write_fla_checkpoint(ckpt, drop=("model.layers.1.attn_res_proj.weight",))
    with pytest.raises(UserError, match="missing weights.*attn_res_proj"):
        load_model(str(ckpt))


def test_wrong_shapes_and_corrupt_files_are_clear_errors(tmp_path):
    ckpt = tmp_path / "shape"
    write_fla_checkpoint(ckpt)
    tensors = fla_tensors()
    tensors["model.layers.0.attn.q_proj.weight"] = torch.zeros(32, D)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(UserError, match="wrong shape model.layers.0.attn.q_proj.weight"):
        load_model(str(ckpt))
    (ckpt / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="could not be loaded"):
        load_model(str(ckpt))


# --------------------------------------------------------------------------- HF comparators
def _tiny_hf(kind, seed=0):
    import transformers

    cfg_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                          "mistral": ("MistralConfig", "MistralForCausalLM"),
                          "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]
    torch.manual_seed(seed)
    extra = {"head_dim": HEAD_DIM} if kind == "qwen3" else {}
    cfg = getattr(transformers, cfg_cls)(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                                         num_key_value_heads=KV_HEADS, intermediate_size=96, vocab_size=VOCAB,
                                         initializer_range=0.2, **extra)
    return getattr(transformers, model_cls)(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_llama_family_loads_as_standard_residual_comparator(tmp_path, kind):
    ref = _tiny_hf(kind)
    ref.save_pretrained(str(tmp_path / kind))
    write_tokenizer(tmp_path / kind)
    model, tok = load_model(str(tmp_path / kind))  # default dtype bfloat16
    desc = describe_model(model)
    assert desc["family"] == kind and desc["residual"] == "standard" and desc["block_size"] is None
    assert desc["dtype"] == "bfloat16" and desc["num_layers"] == 2
    assert desc["parameters"] == sum(p.numel() for p in ref.parameters())
    assert tok is not None
    model32, _ = load_model(str(tmp_path / kind), dtype="float32")
    with torch.no_grad():
        assert torch.equal(model32(IDS).logits, ref(IDS).logits)


def test_describe_model_families(tmp_path):
    for block, family in ((None, "standard"), (1, "attnres-full"), (2, "attnres-block")):
        ckpt = tmp_path / f"b{block}"
        write_fla_checkpoint(ckpt, block)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LoadingWarning)
            model, tok = load_model(str(ckpt))
        assert tok is None
        desc = describe_model(model)
        assert desc["family"] == family and desc["block_size"] == block
        assert desc["dtype"] == "bfloat16" and desc["device"] == "cpu"
        assert desc["parameters"] == sum(p.numel() for p in model.parameters())


def test_no_tokenizer_is_a_warning_not_an_error(tmp_path):
    write_fla_checkpoint(tmp_path / "c")
    with pytest.warns(LoadingWarning, match="no tokenizer"):
        model, tok = load_model(str(tmp_path / "c"))
    assert tok is None and model is not None


# --------------------------------------------------------------------------- refusals
def test_pickle_checkpoint_refused_without_opt_in(tmp_path, monkeypatch):
    ckpt = tmp_path / "pickle"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(fla_config(2)))
    torch.save(fla_tensors(2), ckpt / "pytorch_model.bin")
    with monkeypatch.context() as m:
        from transformers import AutoModelForCausalLM

        m.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
        m.setattr(torch, "load", lambda *a, **k: pytest.fail("pickle was read"))
        for fn in (load_model, preflight_model):
            with pytest.raises(UserError, match="allow_pickle") as err:
                fn(str(ckpt))
            assert "pickle" in str(err.value)
    # Opt-in: loads, with a warning, and gives the same model as safetensors would.
    with pytest.warns(LoadingWarning, match="pickle"):
        model, _ = load_model(str(ckpt), dtype="float32", allow_pickle=True)
    assert torch.equal(model.state_dict()["model.layers.0.attn.q_proj.weight"],
                       fla_tensors(2)["model.layers.0.attn.q_proj.weight"])


def test_remote_code_refused_without_opt_in(tmp_path, no_weight_loading):
    ckpt = tmp_path / "remote"
    write_fla_checkpoint(ckpt, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                         "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (ckpt / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    for fn in (load_model, preflight_model):
        with pytest.raises(UserError, match="trust_remote_code") as err:
            fn(str(ckpt))
        assert "auto_map" in str(err.value)
    # With the opt-in the preflight passes and records the warning.
    src = preflight_model(str(ckpt), trust_remote_code=True)
    assert any("trust_remote_code" in w for w in src.warnings)


def test_tokenizer_remote_code_refused(tmp_path, no_weight_loading):
    ckpt = tmp_path / "tokremote"
    write_fla_checkpoint(ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.T", None]}}))
    with pytest.raises(UserError, match="trust_remote_code"):
        load_model(str(ckpt))


def test_hub_id_while_offline_is_a_clear_error(monkeypatch, no_weight_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for fn in (load_model, preflight_model):
        with pytest.raises(UserError) as err:
            fn("attnres-quant-tests/not-a-cached-model")
        msg = str(err.value)
        assert "offline" in msg and "HF_HUB_OFFLINE" in msg and "--local-dir" in msg


def _fake_hub_cache(root, repo_id, with_weights=True):
    """A Hugging Face cache entry laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / ("models--" + repo_id.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snap = entry / "snapshots" / commit
    write_fla_checkpoint(snap, tokenizer=True)
    if not with_weights:
        (snap / "model.safetensors").unlink()


def test_hub_id_offline_served_from_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "acme/tiny-fla")
    src = preflight_model("acme/tiny-fla")
    assert src.kind == "hub" and src.family == "attnres-block" and src.weight_files == ["model.safetensors"]
    model, tok = load_model("acme/tiny-fla", dtype="float32")
    assert tok is not None and describe_model(model)["source"] == "acme/tiny-fla"
    _fake_hub_cache(tmp_path, "acme/config-only", with_weights=False)
    with pytest.raises(UserError, match="not its weights"):
        preflight_model("acme/config-only")


def test_bad_paths_dtypes_and_devices(tmp_path, no_weight_loading):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="does not exist"):
        load_model("./relative/missing/dir")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        load_model(str(tmp_path / "file.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(fla_config()))
    with pytest.raises(UserError, match="no weight files"):
        load_model(str(tmp_path / "noweights"))
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(UserError, match="Unknown model_type"):
        preflight_model(str(tmp_path / "unknown"))
    write_fla_checkpoint(tmp_path / "ok")
    with pytest.raises(UserError, match="dtype"):
        preflight_model(str(tmp_path / "ok"), dtype="int3")
    assert preflight_model(str(tmp_path / "ok"), device="auto").device in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            preflight_model(str(tmp_path / "ok"), device="cuda")


# --------------------------------------------------------------------------- zoo
def test_zoo_names_resolve_and_unknown_names_list_the_available_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "ZOO_DIR", tmp_path)
    write_fla_checkpoint(tmp_path / "tiny-x", tokenizer=True)
    assert zoo_path("tiny-x") == tmp_path / "tiny-x"
    assert zoo_path("zoo:tiny-x") == tmp_path / "tiny-x"
    model, tok = load_model("zoo:tiny-x")
    assert describe_model(model)["source"] == "zoo:tiny-x" and tok is not None
    with pytest.raises(UserError, match="zoo:tiny-x") as err:
        load_model("zoo:tiny-y")
    assert "tiny-y" in str(err.value)


def test_bundled_zoo_checkpoints_preflight():
    names = loading.zoo_names()
    if not names:
        pytest.skip("no bundled checkpoints yet (attnres_quant/zoo is filled by the training runs)")
    for name in names:
        src = preflight_model(f"zoo:{name}")
        assert src.weights_format == "safetensors" and src.kind == "zoo"


# --------------------------------------------------------------------------- structure (plan resolution)
@pytest.mark.parametrize("kind", ["fla", "llama"])
def test_structure_model_reads_no_weights(tmp_path, kind):
    from attnres_quant.loading import structure_model

    ckpt = tmp_path / kind
    if kind == "fla":
        write_fla_checkpoint(ckpt, block_size=2)
    else:
        _tiny_hf("llama").save_pretrained(str(ckpt))
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")  # would fail if opened
    skeleton = structure_model(str(ckpt))
    params = dict(skeleton.named_parameters())
    assert all(p.device.type == "meta" for p in params.values())
    assert params["lm_head.weight"].shape == (VOCAB, D) and params["lm_head.weight"].dtype == torch.bfloat16
    if kind == "fla":
        assert len(skeleton.model.depth_mixers()) == 2 * LAYERS + 1
        assert describe_model(skeleton)["family"] == "attnres-block"
    remote = tmp_path / "remote"
    write_fla_checkpoint(remote, auto_map={"AutoConfig": "x.Y"})
    with pytest.raises(UserError, match="trust_remote_code"):
        structure_model(str(remote))
