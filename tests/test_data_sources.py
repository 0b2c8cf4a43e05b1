"""Calibration and quality text from the user's data (attnres_quant.data.sources) and its use in `run`."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from attnres_quant.data.sources import (DataSource, calibration_windows, check_no_overlap, open_source,
                                        quality_windows)
from attnres_quant.errors import UserError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def sentence(i: int, n: int = 12) -> str:
    """Distinct, deterministic pseudo-sentences (document i)."""
    return " ".join(WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] + str((i + j) % 10) for j in range(n))


@pytest.fixture(scope="module")
def tok():
    from attnres_quant.evaluation.testing import tiny_tokenizer

    return tiny_tokenizer(extra_text=" ".join(WORDS))


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_parquet(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def wikitext(root: Path) -> Path:
    """wikitext-2-raw-v1 as the hub stores it: one line per row, every row ending in a newline."""
    for split, start in (("train", 0), ("validation", 1000), ("test", 2000)):
        rows = []
        for i in range(start, start + 30):
            rows += ["", f" = Heading {i} = \n", "", f" {sentence(i)} .\n"]
        write_parquet(root / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet", {"text": rows})
    write_parquet(root / "wikitext-103-raw-v1" / "test-00000-of-00001.parquet", {"text": [" other\n"]})
    return root


def ultrachat(root: Path) -> Path:
    for split, start in (("train_sft", 0), ("test_sft", 500)):
        msgs = [[{"content": sentence(i), "role": "user"}, {"content": sentence(i + 1), "role": "assistant"}]
                for i in range(start, start + 20)]
        write_parquet(root / "data" / f"{split}-00000-of-00001-5e3a9d1b.parquet",
                      {"prompt": [m[0]["content"] for m in msgs], "prompt_id": [str(i) for i in range(20)],
                       "messages": msgs})
    return root


def c4(root: Path) -> Path:
    for name, start in (("c4-train.00000-of-00002", 0), ("c4-train.00001-of-00002", 100),
                        ("c4-validation.00000-of-00001", 3000)):
        path = root / "en" / f"{name}.json.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            for i in range(start, start + 20):
                fh.write(json.dumps({"text": sentence(i), "timestamp": "2019", "url": f"u{i}"}) + "\n")
    return root


# --------------------------------------------------------------------------- each kind of source
def test_text_file_and_folder(tmp_path, tok):
    text = "\n".join(sentence(i) for i in range(40))
    (tmp_path / "calib.txt").write_text(text)
    w = calibration_windows(DataSource(path=str(tmp_path / "calib.txt")), tok, samples=3, seq_len=20, seed=0)
    assert w.as_rows(20).tolist() == torch.tensor(enc(tok, text)[:60]).view(3, 20).tolist()
    assert w.record["text_sha256"] == hashlib.sha256(text.encode()).hexdigest() and w.record["documents"] == 1
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(5):
        (folder / f"d{i}.txt").write_text(sentence(100 + i) + "\n")
    q = quality_windows(DataSource(path=str(folder)), tok, max_tokens=10_000, seq_len=16, seed=0)
    joined = "".join(sentence(100 + i) + "\n" for i in range(5))  # files in name order, ending in newlines
    assert q.ids == enc(tok, joined) and q.record["separator"] == "" and q.record["n_files"] == 5


def test_jsonl_column_seeded_sampling(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    docs = [sentence(i) for i in range(50)]
    path.write_text("".join(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(docs)))
    src = DataSource(path=str(path), column="content")
    a = calibration_windows(src, tok, samples=4, seq_len=16, seed=1)
    assert a.as_rows(16).tolist() == calibration_windows(src, tok, 4, 16, seed=1).as_rows(16).tolist()
    assert a.as_rows(16).tolist() != calibration_windows(src, tok, 4, 16, seed=2).as_rows(16).tolist()
    # in order (no shuffle): documents joined by a blank line, the first 64 tokens
    ordered = calibration_windows(src.model_copy(update={"shuffle": False}), tok, 4, 16, seed=1)
    used = docs[: ordered.record["documents"]]
    assert ordered.ids == enc(tok, "\n\n".join(used))[:64]
    assert ordered.record["text_sha256"] == hashlib.sha256("\n\n".join(used).encode()).hexdigest()
    assert ordered.record["tokens"] == 64 and ordered.record["column"] == "content"


def test_parquet_text_column(tmp_path, tok):
    docs = [sentence(i) for i in range(30)]
    path = write_parquet(tmp_path / "q.parquet", {"text": docs, "n": list(range(30))})
    q = quality_windows(DataSource(path=str(path)), tok, max_tokens=100, seq_len=25, seed=0)
    assert q.ids == enc(tok, "\n\n".join(docs[: q.record["documents"]]))[:100]
    assert q.record["format"] == "parquet" and q.record["shuffle"] is False


def test_wikitext_hub_layout(tmp_path, tok):
    root = wikitext(tmp_path / "wikitext")
    src = DataSource(path=str(root), config="wikitext-2-raw-v1")
    q = quality_windows(src, tok, max_tokens=120, seq_len=40, seed=0)  # quality: the test split, in order
    test_rows = pq.read_table(root / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet").column("text").to_pylist()
    assert q.ids == enc(tok, "".join(test_rows))[:120]  # lines re-joined exactly as wiki.test.raw
    assert q.record["split"] == "test" and q.record["separator"] == ""
    c = calibration_windows(src, tok, samples=2, seq_len=30, seed=0)  # calibration: the train split
    assert c.record["split"] == "train" and "train-00000" in c.record["files"][0]
    with pytest.raises(UserError, match="several configurations"):
        quality_windows(DataSource(path=str(root)), tok, 100, 20, 0)


def test_c4_json_gz_shards(tmp_path, tok):
    root = c4(tmp_path / "c4")
    src = DataSource(path=str(root), config="en", split="validation")
    q = quality_windows(src, tok, max_tokens=50, seq_len=25, seed=0)
    assert q.record["n_files"] == 1 and q.ids == enc(tok, "\n\n".join(sentence(i) for i in range(3000, 3020)))[:50]
    c = calibration_windows(DataSource(path=str(root)), tok, samples=2, seq_len=25, seed=0)
    assert c.record["n_files"] == 2 and c.record["split"] == "train"


def test_ultrachat_rendered_with_chat_template_or_fallback(tmp_path, tok):
    root = ultrachat(tmp_path / "ultrachat")
    src = DataSource(path=str(root), split="train_sft", shuffle=False)
    conversations = [[sentence(i), sentence(i + 1)] for i in range(20)]
    plain = calibration_windows(src, tok, samples=2, seq_len=20, seed=0)
    assert plain.record["chat_template"] == "fallback" and plain.record["column"] == "messages"
    fallback = "".join(f"<|user|>\n{u}\n<|assistant|>\n{a}\n" for u, a in conversations)
    assert plain.ids == enc(tok, fallback)[:40] and plain.record["separator"] == ""
    import copy

    templated = copy.deepcopy(tok)
    templated.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    t = calibration_windows(src, templated, 2, 20, seed=0)
    assert t.record["chat_template"] == "model"
    assert t.ids == enc(tok, "".join(f"[user] {u}\n[assistant] {a}\n" for u, a in conversations))[:40]
    with pytest.raises(UserError, match=r"no 'test' split .*splits found: \['test_sft', 'train_sft'\]"):
        quality_windows(DataSource(path=str(root)), tok, 100, 20, 0)


def test_arrow_save_to_disk_layout(tmp_path, tok):
    import datasets

    docs = {"train": [sentence(i) for i in range(20)], "test": [sentence(i) for i in range(900, 920)]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in docs.items()}).save_to_disk(
        str(tmp_path / "saved"))
    q = quality_windows(DataSource(path=str(tmp_path / "saved")), tok, max_tokens=60, seq_len=20, seed=0)
    assert q.record["format"] == "arrow" and q.record["split"] == "test"
    assert q.ids == enc(tok, "\n\n".join(docs["test"]))[:60]


# --------------------------------------------------------------------------- errors
def test_clear_errors(tmp_path, tok):
    with pytest.raises(UserError, match="does not exist") as e:
        open_source(DataSource(path=str(tmp_path / "nope.jsonl")), "calibration")
    assert "calibration.source.path" in str(e.value) and "Fix:" in str(e.value)
    path = write_parquet(tmp_path / "p.parquet", {"body": ["x"], "url": ["u"]})
    with pytest.raises(UserError, match=r"no column 'text' \(columns: \['body', 'url'\]\)"):
        open_source(DataSource(path=str(path), column="text"), "quality")
    with pytest.raises(UserError, match=r"no `text` or `messages` column \(columns: \['body', 'url'\]\)"):
        open_source(DataSource(path=str(path)), "quality")
    empty = write_parquet(tmp_path / "e.parquet", {"text": ["", "", None]})
    with pytest.raises(UserError, match="holds no text"):
        open_source(DataSource(path=str(empty)), "calibration").check_has_text()
    with pytest.raises(UserError, match="holds no text"):
        calibration_windows(DataSource(path=str(empty)), tok, 1, 8, 0)
    (tmp_path / "short.txt").write_text("alpha beta")
    with pytest.raises(UserError, match="fewer than samples x seq_len"):
        calibration_windows(DataSource(path=str(tmp_path / "short.txt")), tok, 4, 64, 0)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="not UTF-8"):
        open_source(DataSource(path=str(tmp_path / "bin.txt")), "quality").check_has_text()


def test_overlap_between_calibration_and_quality_is_refused(tmp_path, tok):
    text = "\n".join(sentence(i) for i in range(60))
    (tmp_path / "a.txt").write_text(text)
    src = DataSource(path=str(tmp_path / "a.txt"))
    calib = calibration_windows(src, tok, 2, 64, 0).as_rows(64)
    quality = quality_windows(src, tok, 256, 64, 0).ids
    with pytest.raises(UserError, match="overlaps the quality"):
        check_no_overlap(calib, quality, tok)
    other = "\n".join(sentence(i) for i in range(500, 560))
    check_no_overlap(calib, enc(tok, other), tok)  # distinct text passes
    from attnres_quant.data.sources import check_distinct_files

    with pytest.raises(UserError, match="read the same file"):
        check_distinct_files(open_source(src, "calibration"), open_source(src, "quality"))


# --------------------------------------------------------------------------- the pipeline uses them
def test_run_calibrates_and_measures_quality_on_the_configured_text(tmp_path, monkeypatch, capsys):
    from attnres_quant import quant
    from attnres_quant.cli import main as cli_main
    from attnres_quant.evaluation.testing import tiny_tokenizer
    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    ckpt = tmp_path / "tiny"
    tok = tiny_tokenizer(extra_text=" ".join(WORDS))
    torch.manual_seed(0)
    cfg = AttnResConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=len(tok), intermediate_size=64,
                        attnres_block_size=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    AttnResForCausalLM(cfg).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    root = wikitext(tmp_path / "wikitext")
    seen = []
    real = quant.quantize

    def spy(model, variant, *a, calibration=None, **k):
        seen.append(calibration)
        return real(model, variant, *a, calibration=calibration, **k)

    monkeypatch.setattr(quant, "quantize", spy)
    config = {"name": "data", "device": "cpu", "dtype": "float32", "model": {"path": str(ckpt)},
              "variants": [{"name": "gptq4", "method": "gptq", "default": {"weight": "int4", "group_size": 32}}],
              "quality": {"max_tokens": 96, "seq_len": 32, "kl_top_k": 16,
                          "source": {"path": str(root), "config": "wikitext-2-raw-v1"}},
              "calibration": {"samples": 3, "seq_len": 24,
                              "source": {"path": str(root), "config": "wikitext-2-raw-v1", "split": "train"}},
              "tasks": [{"name": "proxy_mc", "limit": 2}], "bench": {"enabled": False}}
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "data" / "results.json").read_text())
    data = results["meta"]["data"]["tiny"]
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(ckpt)
    src = DataSource(path=str(root), config="wikitext-2-raw-v1", split="train")
    expected = calibration_windows(src, loaded, 3, 24, seed=0).as_rows(24)
    assert len(seen) == 1 and torch.equal(seen[0], expected)  # GPTQ saw exactly these windows
    assert data["calibration"]["tokens_sha256"] == calibration_windows(src, loaded, 3, 24, 0).record["tokens_sha256"]
    q_expected = quality_windows(DataSource(path=str(root), config="wikitext-2-raw-v1"), loaded, 96, 32, 0)
    assert data["quality"]["tokens_sha256"] == q_expected.record["tokens_sha256"] and data["quality"]["split"] == "test"
    cell = results["cells"]["tiny/gptq4/quality"]["value"]
    assert cell["tokens"] == 96 and cell["kl_source"] == "top-16 of the saved baseline"
    assert {"kl_stderr", "kl_p999", "same_top_p", "dp_rms", "top_dp_mean", "ppl_ratio_stderr"} <= set(cell)
    assert (tmp_path / "out" / "data" / "baseline_topk" / "tiny" / "meta.json").exists()
    # the same text for calibration and quality is refused before any variant runs
    config["calibration"]["source"]["split"] = "test"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert cli_main(["run", str(path), "--out", str(tmp_path / "out2")]) == 2
    assert "read the same file" in capsys.readouterr().err
