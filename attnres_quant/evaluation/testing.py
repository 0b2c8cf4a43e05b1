"""Helpers for offline tests of the evaluation stack (tiny tokenizer, scripted LM, fixture data).

Fixture writers create small datasets in the hub layouts and schemas that
:mod:`attnres_quant.evaluation.datasets` reads, so tests run the real loaders and YAMLs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from attnres_quant.evaluation.datasets import MATH_SUBJECTS, MMLU_SUBJECTS


def tiny_tokenizer(vocab_size: int = 320, extra_text: str = ""):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in a moment on a little text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["def f(x):\n    return x + 1\n", "Question: What is 2 + 3?\nA. 5\nB. 6\nAnswer: 5\n",
              "Problem: 4 * 5\nAnswer: 20\n", extra_text or "the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_tiny_attnres(out: Path, intermediate_size: int = 128) -> Path:
    """A random 2-layer AttnRes checkpoint (hidden 64, block size 2) with learned-looking, non-uniform
    depth attention (pseudo-queries drawn at std 0.5) and the tiny tokenizer, saved at ``out``."""
    import torch

    from attnres_quant.model import AttnResConfig, AttnResForCausalLM

    tok = tiny_tokenizer(vocab_size=320)
    torch.manual_seed(0)
    cfg = AttnResConfig(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, vocab_size=len(tok),
                        intermediate_size=intermediate_size, attnres_block_size=2, initializer_range=0.2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AttnResForCausalLM(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "res_proj" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def scripted_lm(choose: Callable[[dict], int] | None = None, generate: Callable[[dict, str], str] | None = None):
    """An lm-eval ``LM`` whose answers are scripted from the document.

    ``choose(doc) -> index`` of the option it prefers (multiple choice);
    ``generate(doc, context) -> text`` for generation tasks.
    """
    from lm_eval.api.model import LM

    class ScriptedLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                pick = choose(req.doc) if choose else 0
                out.append((0.0 if req.idx == pick else -5.0, req.idx == pick))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [-1.0 for _ in requests]

        def generate_until(self, requests, disable_tqdm: bool = False):
            return [generate(req.doc, req.args[0]) if generate else "" for req in requests]

    return ScriptedLM()


# ---------------------------------------------------------------------------
# fixture datasets (hub schemas)


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)


def write_mmlu(root: Path, n_test: int = 4, n_dev: int = 5, subjects=MMLU_SUBJECTS) -> list[dict]:
    """``cais/mmlu`` snapshot layout: ``root/<subject>/{test,dev}-00000-of-00001.parquet``.

    Returns the test rows (subject order, then row order): question ``"<subject> q<i>"``,
    choices ``["w0", "w1", "w2", "w3"]`` with answer ``i % 4``.
    """
    all_test = []
    for subject in subjects:
        for split, n in (("test", n_test), ("dev", n_dev)):
            rows = [{"question": f"{subject} q{i}", "subject": subject,
                     "choices": [f"{split}{i} option {k}" for k in range(4)], "answer": i % 4} for i in range(n)]
            _write_parquet(Path(root) / subject / f"{split}-00000-of-00001.parquet", rows)
            if split == "test":
                all_test += rows
    return all_test


def write_gpqa(root: Path, n: int = 10) -> list[dict]:
    """``Idavidrein/gpqa`` layout: ``root/gpqa_diamond.csv`` with the hub's column names."""
    import pandas as pd

    rows = [{"Pre-Revision Question": "", "Question": f"Which particle number {i}?",
             "Correct Answer": f"right {i}", "Incorrect Answer 1": f"wrong a{i}",
             "Incorrect Answer 2": f"wrong b{i}", "Incorrect Answer 3": f"wrong c{i}",
             "Explanation": "because", "Subdomain": "Physics", "High-level domain": "Physics"} for i in range(n)]
    Path(root).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(Path(root) / "gpqa_diamond.csv", index=False)
    return rows


def write_math(root: Path, n: int = 3, layout: str = "hub") -> list[dict]:
    """Hendrycks MATH, ``problem, level, type, solution``; ``layout="hub"``:
    ``root/<subject>/test-00000-of-00001.parquet``; ``layout="original"``: ``root/test/<subject>/<i>.json``.

    Answers are ``\\boxed{<i + 10 * subject index>}``; returns the rows in subject order.
    """
    out = []
    for si, (subject, typ) in enumerate(MATH_SUBJECTS.items()):
        rows = [{"problem": f"Compute {i} + {10 * si}.", "level": "Level 1", "type": typ,
                 "solution": f"We add: ${i} + {10 * si} = \\boxed{{{i + 10 * si}}}$."} for i in range(n)]
        if layout == "hub":
            _write_parquet(Path(root) / subject / "test-00000-of-00001.parquet", rows)
            _write_parquet(Path(root) / subject / "train-00000-of-00001.parquet", rows[:1])
        else:
            folder = Path(root) / "test" / subject
            folder.mkdir(parents=True, exist_ok=True)
            for i, r in enumerate(rows):
                (folder / f"{i}.json").write_text(json.dumps(r))
        out += rows
    return out
