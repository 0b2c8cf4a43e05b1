"""Evaluation: lm-eval integration, offline HumanEval, local datasets, quality metrics, statistics.

Public API (docs/evaluation.md):

* :func:`preflight` (tasks, settings) -- checks before any model is loaded;
* :func:`evaluate` (model, tokenizer, tasks, settings, samples_dir=None) -> ``{task: TaskResult}``;
* :func:`read_samples` (path) -> lm-eval's per-sample records of a task cell;
* :func:`quality` (baseline_model, variant_model, tokenizer, text_ids, base_topk=None) -> dict;
* :func:`save_baseline_topk` (baseline_model, tokenizer, text_ids, path, k=64) -> saved baseline;
* :mod:`attnres_quant.evaluation.kl`: the KL / delta-p / perplexity-ratio statistics chunk by chunk
  (``KLAccumulator``, ``kl_statistics``, ``BaselineTopK``);
* :func:`perplexity`, :func:`fixed_text`;
* :func:`paired_delta`, :func:`flips`, :func:`mcnemar`, :func:`mean_stderr`, :func:`compare`.
"""

from attnres_quant.evaluation.harness import (EvalSettings, TaskResult, coerce_settings, evaluate, preflight,
                                              read_samples)
from attnres_quant.evaluation.metrics import fixed_text, perplexity, quality, save_baseline_topk, task_flips
from attnres_quant.evaluation.stats import compare, flips, mcnemar, mean_stderr, paired_delta
from attnres_quant.evaluation.tasks import GROUPS, TASKS, expand

__all__ = ["EvalSettings", "TaskResult", "coerce_settings", "evaluate", "preflight", "read_samples", "quality", "save_baseline_topk",
           "perplexity", "fixed_text", "task_flips", "paired_delta", "flips", "mcnemar", "mean_stderr",
           "compare", "TASKS", "GROUPS", "expand"]
