"""Issue 21 item 8: a quiet console by default, everything with --verbose.

Each check runs the command in a subprocess and captures its stderr, as a user's terminal would
see it: with the default console, stderr holds nothing (no third-party warning, info message or
progress bar); with --verbose the same noise is there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

# The tiny default study takes ~3 min on 2 idle cores (GPTQ dominates); leave room for a busy machine.
pytestmark = pytest.mark.timeout(1500)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Every kind of noise the issue names, produced the way the libraries produce it.
NOISE = textwrap.dedent("""
    import logging, sys, warnings
    from attnres_quant import console
    console.configure(verbose="--verbose" in sys.argv)
    import torchao                                           # "Failed to load .../_C_mxfp8...so" (CPU)
    logging.getLogger("torch.utils._pytree").warning("X is an Enum subclass ... register_constant() is deprecated")
    logging.getLogger("torchao").warning("Failed to load _C_mxfp8")
    from loguru import logger
    logger.warning("No accelerator available! Compressing model on CPU instead")   # llm-compressor
    warnings.warn("MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization")
    logging.getLogger("bitsandbytes.cextension").warning("kernel hub: no kernel for this device")
    from transformers.utils import logging as hf_logging     # transformers' own handler
    hf_logging.get_logger("transformers.tokenization_utils_base").warning(
        "Token indices sequence length is longer than the specified maximum sequence length")
    from tqdm import tqdm
    list(tqdm(range(3), desc="Running loglikelihood requests"))   # a bar not created by attnres_quant
    logging.getLogger("attnres_quant.x").warning("our own warning stays")
    logging.getLogger("lm_eval").error("errors of libraries stay")
""")


def _run(code_or_args, *extra, timeout=600) -> subprocess.CompletedProcess:
    args = [sys.executable, "-c", code_or_args, *extra] if isinstance(code_or_args, str) \
        else [sys.executable, "-m", "attnres_quant", *code_or_args]
    return subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def test_library_noise_is_hidden_and_verbose_shows_it():
    quiet = _run(NOISE)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    lines = [line for line in quiet.stderr.splitlines() if line.strip()]
    assert lines == ["our own warning stays", "errors of libraries stay"], lines

    loud = _run(NOISE, "--verbose")
    assert loud.returncode == 0, loud.stderr[-3000:]
    for noise in ("No accelerator available", "MatMul8bitLt", "register_constant", "Running loglikelihood requests",
                  "kernel hub", "Token indices sequence length"):
        assert noise in loud.stderr, f"--verbose should show {noise!r}"


def _tiny_default_study(tmp_path: Path) -> Path:
    """The default study (configs/int4_hybrid.yaml: every variant -- W8A8, RTN int4 with and without
    the depth path, GPTQ through llm-compressor -- code execution, latency) on its AttnRes model with
    tiny sample counts, so it runs in a test. (The standard-residual model goes through the same
    libraries.)"""
    cfg = yaml.safe_load((ROOT / "configs" / "int4_hybrid.yaml").read_text())
    cfg["models"] = cfg["models"][:1]
    cfg["tasks"] = [{"name": "proxy_mc", "limit": 2}, {"name": "humaneval", "limit": 1, "max_gen_toks": 4}]
    cfg["quality"] = {"max_tokens": 96, "seq_len": 48}
    cfg["bench"] = {"prompt_len": 8, "batch_size": 1, "decode_tokens": 2, "warmup": 0, "repeats": 1}
    cfg["calibration"] = {"samples": 2, "seq_len": 32}
    path = tmp_path / "int4_hybrid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr lines that are not our own warnings (``.../attnres_quant/x.py:N: SomeWarning: ...`` and the
    source line Python prints under it, e.g. convert's "no tokenizer files to copy")."""
    lines, skip_source = [], False
    for line in proc.stderr.splitlines():
        if skip_source and line.startswith("  "):
            skip_source = False
            continue
        skip_source = bool(re.search(r"/attnres_quant/[\w/]+\.py:\d+: \w+Warning: ", line))
        if line.strip() and not skip_source:
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def default_study(tmp_path_factory):
    """(config, output folder, the `run` process) of the tiny default study."""
    tmp = tmp_path_factory.mktemp("quiet")
    config = _tiny_default_study(tmp)
    out = tmp / "runs"
    return config, out, _run(["run", str(config), "--out", str(out)])


def test_run_on_the_default_study_prints_no_third_party_line(default_study):
    config, out, proc = default_study
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _stderr_lines(proc) == [], "`run` printed on stderr:\n" + "\n".join(_stderr_lines(proc)[:20])
    assert (out / "int4_hybrid.html").is_file()
    # stdout holds our lines only: timestamped progress lines and the final summary table (a
    # library's logger writing to stdout, like llm-compressor's loguru sink, would show here).
    foreign = [line for line in proc.stdout.splitlines()
               if line.strip() and not re.match(r"\[\d\d:\d\d:\d\d\] |\|", line)]
    assert foreign == [], foreign
    # One progress line per step on stdout: cells done / total (30: 5 variants x 6 cells), ETA, the step.
    assert re.search(r"\[\d+/30 cells, ETA \d+m\d\ds\] tiny-block / gptq_int4_hybrid: quantizing \(gptq\)",
                     proc.stdout), proc.stdout[-2000:]


def _tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("verb", ["plan", "report", "export", "bench", "convert"])
def test_every_other_verb_prints_no_third_party_line(verb, default_study, tmp_path):
    config, out, _ = default_study
    args = {
        "plan": ["plan", str(config)],
        "report": ["report", str(out / "int4_hybrid")],
        "export": ["export", str(config), str(tmp_path / "exported"), "--variant", "int4_hybrid"],
        "bench": ["bench", "overhead", "--hidden-size", "64", "--layers", "2", "--seq-len", "8",
                  "--batch-size", "1", "--dtype", "float32", "--decode-tokens", "2", "--warmup", "0",
                  "--repeats", "1", "--json"],
        "convert": ["convert", str(_tiny_llama(tmp_path / "llama")), str(tmp_path / "converted"),
                    "--block-size", "2"],
    }[verb]
    proc = _run(args)
    assert proc.returncode == 0, f"{verb}: {proc.stderr[-3000:]}"
    assert _stderr_lines(proc) == [], f"`{verb}` printed on stderr:\n" + "\n".join(_stderr_lines(proc)[:20])


class _Terminal:
    """stderr as a terminal (so the progress bar is drawn), captured."""

    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def isatty(self):
        return True

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass


def test_study_progress_counts_cells_names_the_step_and_shows_library_steps(monkeypatch, capsys):
    from attnres_quant import console

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setitem(console._state, "verbose", False)
    console._hide_third_party_bars()
    progress = console.StudyProgress(total=6)
    progress.step("tiny-block", "bf16", "task proxy_mc")
    progress.advance()
    progress.advance()
    progress.step("tiny-block", "gptq_int4_hybrid", "quantizing (gptq)")
    # A library's bar (created outside attnres_quant) is hidden, its step shown on ours.
    exec("from tqdm import tqdm\nfor _ in tqdm(range(2), desc='(3/9): Calibrating'): pass",
         {"__name__": "llmcompressor.pipelines.sequential.pipeline"})
    progress.drop(3)  # the variant failed: its remaining cells leave the total
    progress.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("[0/6 cells] tiny-block / bf16: task proxy_mc")
    assert "[2/6 cells, ETA " in out[1] and out[1].endswith("tiny-block / gptq_int4_hybrid: quantizing (gptq)")
    drawn = terminal.buffer.getvalue()
    assert "tiny-block / gptq_int4_hybrid: quantizing (gptq)" in drawn and "2/6 cells" in drawn
    assert "llmcompressor: (3/9): Calibrating" in drawn
    assert "2/3 cells" in drawn, "the total drops with the failed variant's cells"
    assert "it/s" not in drawn.replace("cells", ""), "the library's own bar is not drawn"
