"""Copy a finished training run into the bundled zoo (``attnres_quant/zoo/<name>/``).

``python -m attnres_quant.training.export RUN_DIR ZOO_DIR``

Copies the HF checkpoint files (bf16 safetensors, config, tokenizer), the training
card and the loss curve, and adds to the card the token ids of the reference slice
(``reference_slice.input_ids``), re-checking that the saved checkpoint reproduces the
recorded loss on it, so tests on any machine can verify the bundled weights without
rebuilding the corpus.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "loss_curve.png", "loss_log.jsonl",
         "eval_samples.json")
MAX_WEIGHT_BYTES = 25 * 1024 * 1024


def reference_loss(model, input_ids) -> float:
    import torch

    x = torch.tensor(input_ids, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=x[:, :-1], use_cache=False)
        return float(torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                                       x[:, 1:].reshape(-1)))


def export_to_zoo(run_dir: str | pathlib.Path, zoo_dir: str | pathlib.Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import attnres_quant.model  # noqa: F401  (registers model_type "attnres")

    from ..data import corpus as corpus_mod
    from ..model.remote_code import write_remote_code
    from .train import heldout_slice

    run_dir, zoo_dir = pathlib.Path(run_dir), pathlib.Path(zoo_dir)
    card = json.loads((run_dir / "training_card.json").read_text())
    weights = run_dir / "model.safetensors"
    if weights.stat().st_size > MAX_WEIGHT_BYTES:
        raise SystemExit(f"{weights} is {weights.stat().st_size} bytes, over the 25 MB zoo limit")

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32).eval()
    ref = card["reference_slice"]
    c = corpus_mod.Corpus(corpus_mod.stdlib_texts("train", max_files=0), corpus_mod.stdlib_texts("heldout"), [])
    x = heldout_slice(tokenizer, c, ref["seq_len"], ref["windows"])
    loss = reference_loss(model, x.tolist())
    if abs(loss - ref["loss"]) > 1e-4:
        raise SystemExit(f"reference slice loss {loss} does not reproduce the recorded {ref['loss']}")
    ref["input_ids"] = x.tolist()
    ref["reproduced_loss"] = loss

    zoo_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, zoo_dir / name)
    write_remote_code(zoo_dir)  # self-describing: loads with trust_remote_code=True without attnres_quant
    card["weight_bytes"] = weights.stat().st_size
    (zoo_dir / "training_card.json").write_text(json.dumps(card, indent=1))
    return card


if __name__ == "__main__":  # pragma: no cover
    export_to_zoo(sys.argv[1], sys.argv[2])
    print(f"exported {sys.argv[1]} -> {sys.argv[2]}")
