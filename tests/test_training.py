"""Training verb pieces that run fast: config validation, LR schedule, tokenizer, corpus split."""

import pytest

from attnres_quant.data import corpus, tokenizer
from attnres_quant.errors import UserError
from attnres_quant.training import train


def test_configs_differ_only_in_block_size():
    a = train.load_config("configs/train/tiny_block.yaml")
    b = train.load_config("configs/train/tiny_standard.yaml")
    assert a["model"].pop("attnres_block_size") == 4
    assert b["model"].pop("attnres_block_size") is None
    for key in ("model", "data", "train", "eval"):
        assert a[key] == b[key], key


def test_unknown_config_key_is_a_user_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(UserError, match="stepz"):
        train.load_config(str(p))


def test_lr_schedule():
    t = {"lr": 1.0, "warmup_steps": 10, "steps": 110, "min_lr_ratio": 0.1}
    assert train.lr_at(0, t) == pytest.approx(0.1)
    assert train.lr_at(9, t) == pytest.approx(1.0)
    assert train.lr_at(10, t) == pytest.approx(1.0)
    assert train.lr_at(110, t) == pytest.approx(0.1)
    assert all(train.lr_at(s, t) >= train.lr_at(s + 1, t) for s in range(10, 110))


def test_tokenizer_roundtrip_and_hf_layout(tmp_path):
    from transformers import AutoTokenizer

    texts = ["def add(x):\n    return x + 12345\n", "Question: What is 7 + 5?\nAnswer: 12\n"] * 50
    tok = tokenizer.to_hf(tokenizer.train_tokenizer(texts, vocab_size=300))
    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    s = "print('héllo', 2026)\n"
    ids = hf(s, add_special_tokens=False)["input_ids"]
    assert hf.decode(ids) == s
    assert sum(tokenizer.token_byte_lengths(hf)[i] for i in ids) == len(s.encode())
    # digits are single tokens
    assert [hf.convert_ids_to_tokens(i) for i in hf("2026", add_special_tokens=False)["input_ids"]] == list("2026")


def test_stdlib_split_is_by_file_and_stable():
    train_files = corpus.stdlib_files("train")
    held = corpus.stdlib_files("heldout")
    assert held and train_files
    assert not {r for r, _ in train_files} & {r for r, _ in held}
    assert [r for r, _ in held] == sorted(r for r, _ in held)
    assert all(corpus.stdlib_split_of(r) == "heldout" for r, _ in held)


def test_proxy_mix_per_family_counts():
    from attnres_quant.data import proxy_tasks

    assert corpus.items_per_family(3) == {f: 3 for f in proxy_tasks.FAMILIES}
    assert corpus.items_per_family({"proxy_math": 5}) == {"proxy_mc": 0, "proxy_code": 0, "proxy_math": 5}
    with pytest.raises(ValueError, match="proxy_maths"):
        corpus.items_per_family({"proxy_maths": 5})
    texts = corpus.proxy_train_texts({"proxy_mc": 2, "proxy_code": 1, "proxy_math": 4})
    assert len(texts) == 7
    assert sum(t.startswith("Problem:") for t in texts) == 4
    assert sum(t.startswith("Question:") for t in texts) == 2
    # one count for every family is the same corpus as the equal mapping (cache keys stay valid)
    assert corpus.proxy_train_texts(3) == corpus.proxy_train_texts({f: 3 for f in proxy_tasks.FAMILIES})


def test_continued_training_reuses_the_checkpoint_tokenizer(tmp_path, monkeypatch):
    """--init-from keeps the checkpoint's vocabulary even when the data mix changes."""
    from transformers import AutoTokenizer

    tok = tokenizer.to_hf(tokenizer.train_tokenizer(["def f(x):\n    return x\n"] * 20, vocab_size=280))
    ckpt = tmp_path / "ckpt"
    tok.save_pretrained(ckpt)
    # a tiny corpus keeps this fast: no stdlib files, a handful of proxy items
    monkeypatch.setattr(corpus, "stdlib_texts", lambda split, max_files=None: [("a.py", "x = 1\n")])
    cfg = train.load_config("configs/train/tiny_block.yaml")
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    cfg["data"]["proxy_items_per_family"] = {"proxy_math": 3}
    _, hf, streams, cache = train.prepare_data(cfg, log=lambda s: None, tokenizer_dir=str(ckpt))
    assert hf.get_vocab() == AutoTokenizer.from_pretrained(ckpt).get_vocab()
    assert int(streams["proxy"].max()) < len(hf)
    with pytest.raises(UserError, match="tokenizer.json"):
        train.prepare_data(cfg, log=lambda s: None, tokenizer_dir=str(tmp_path / "nowhere"))
