"""Study config: the YAML a user hands to ``python -m attnres_quant run``.

Validated with pydantic (``extra="forbid"`` everywhere) so an unknown key or a
bad value names the file, the key and the reason.  Variants are validated by
the quantization engine's own ``Variant`` schema (``attnres_quant.quant``)
so the policy format has one definition.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from .. import safe_yaml
from ..data.sources import DataSource
from ..errors import UserError
from ..vllm_backend import VllmSettings


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- names
# Study, model and variant names become file and folder names (reports/<study>/, plots named after
# models, results keys "model/variant/cell"), so they must be safe slugs: nothing a name can say
# reaches outside the output folder.
SLUG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,79}")
SLUG_HELP = "1-80 characters: letters, digits and _ . + -, starting with a letter or digit"


def is_slug(name: Any) -> bool:
    return isinstance(name, str) and SLUG_RE.fullmatch(name) is not None


def check_slug(name: Any, what: str) -> str:
    if not is_slug(name):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise ValueError(f"{what} {shown} is not a safe name ({SLUG_HELP}); names become file names")
    return name


def safe_slug(text: str, fallback: str = "model") -> str:
    """Map any text (a checkpoint path's last part, a config file's stem) onto a safe slug."""
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).lstrip("._+-")[:80]
    return slug or fallback


def model_label(path: str, name: str | None = None) -> str:
    """Label of a model in results and reports: its `name`, else the last part of its path, made safe."""
    if name:
        return name
    return safe_slug(str(path).split(":", 1)[-1].rstrip("/").split("/")[-1])


class ModelSpec(Strict):
    path: str = Field(description="zoo:NAME, a local checkpoint directory, or a hub id")
    name: str | None = Field(default=None, description="label in the report (default: from path)")
    allow_pickle: bool = False
    trust_remote_code: bool = False
    tokenizer: str | None = Field(default=None, description="tokenizer directory when the checkpoint's own cannot "
                                  "be used (Kimi's tiktoken tokenizer is remote code)")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value):
        return value if value is None else check_slug(value, "model name")

    @property
    def label(self) -> str:
        return model_label(self.path, self.name)


def check_limit(value: Any) -> Any:
    """lm-eval's ``limit``: a whole number of documents (>= 1), or a fraction 0 < limit < 1 of each task."""
    if value is None:
        return None
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        if isinstance(value, int) or value.is_integer():
            if value >= 1:
                return int(value)
        elif 0 < value < 1:
            return float(value)
    raise ValueError(f"{value!r} is neither a whole number of samples >= 1 nor a fraction of each task between 0 "
                     "and 1 (lm-eval's convention: 20 = 20 samples, 0.1 = 10% of the samples)")


def check_batch_size(value: Any) -> Any:
    """lm-eval's ``batch_size``: a whole number >= 1, ``auto`` or ``auto:N`` (re-detect N times)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit() and int(text) >= 1:
            return int(text)
        head, _, times = text.partition(":")
        if head == "auto" and (not times or (times.isdigit() and int(times) >= 1)):
            return text
    raise ValueError(f"{value!r} is not a batch size: use a whole number >= 1, `auto` (lm-eval finds the largest "
                     "that fits) or `auto:N` (re-detect N times during the run)")


Limit = Annotated[int | float | None, BeforeValidator(check_limit)]
BatchSize = Annotated[int | str, BeforeValidator(check_batch_size)]


class TaskSpec(Strict):
    name: str
    limit: Limit = Field(default=None, description="samples of this task: N >= 1, or a fraction 0 < limit < 1")
    num_fewshot: int | None = Field(default=None, ge=0)
    max_gen_toks: int | None = Field(default=None, ge=1, description="generation cap for this task only")


class EvalSettings(Strict):
    batch_size: BatchSize = Field(default=16, description="lm-eval batch size: N, auto or auto:N")
    limit: Limit = Field(default=None, description="samples per task: N >= 1, or a fraction 0 < limit < 1 of "
                         "each task (None = all)")
    num_fewshot: int | None = Field(default=None, ge=0,
                                    description="None = each task's own default (lm-eval's, e.g. math 4, gsm8k 5)")
    max_gen_toks: int | None = Field(default=None, ge=1,
                                     description="cap on generated tokens for every generation task "
                                                 "(None = each task's own limit, lm-eval's: humaneval 1024, "
                                                 "math the model's default, 256 with HFLM)")
    allow_code_execution: bool = False
    code_timeout_s: float = Field(default=3.0, gt=0, description="time limit of one executed program "
                                  "(lm-eval 0.4.13 humaneval: 3 s)")
    backend: Literal["hf", "vllm"] = Field(default="hf", description="hf: the in-process model through lm-eval's "
                                           "HFLM; vllm: the exported checkpoint through lm-eval's vllm model and "
                                           "vLLM's latency benchmark (CUDA only; a variant's own `backend:` wins)")
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    apply_chat_template: bool | str = Field(default=False, description="format prompts with the tokenizer's chat "
                                            "template (a string names one of several templates), as lm-eval")
    fewshot_as_multiturn: bool | None = Field(default=None, description="few-shot examples as chat turns (needs "
                                              "apply_chat_template; None = lm-eval's default)")
    system_instruction: str | None = Field(default=None, description="system prompt prepended by lm-eval")
    include_path: list[str] = Field(default_factory=list, description="folders of your own lm-eval task YAMLs, "
                                    "added to the tool's (relative paths: from the config file's folder)")
    use_cache: bool = Field(default=False, description="lm-eval's request cache (sqlite) per model/variant under "
                            "the study folder: a re-run answers from it instead of the model")

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_more_paths(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _multiturn_needs_chat(self):
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn: true needs apply_chat_template (few-shot turns are chat "
                             "messages); set eval.apply_chat_template: true as well")
        return self


class QualitySettings(Strict):
    enabled: bool = True
    text: Literal["humaneval"] = "humaneval"
    source: DataSource | None = Field(default=None, description="the quality text (default: `text`, HumanEval); "
                                      "docs/evaluation.md 'Data sources'")
    max_tokens: int = Field(default=4096, ge=16, description="tokens of fixed text for bpb/KL/JS")
    seq_len: int = Field(default=512, ge=16)
    kl_top_k: int | Literal["all"] | None = Field(
        default=None, description="save the baseline's top-k log-probs (and depth weights) once and score every "
        "variant against the file, so the baseline is not resident while variants run; 'all' saves every "
        "log-prob (exact KL, 8 bytes x vocabulary per token on disk); None = the baseline stays resident (exact)")

    @field_validator("kl_top_k")
    @classmethod
    def _top_k_positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("kl_top_k must be a positive number of log-probs, 'all', or null")
        return v


class BenchSettings(Strict):
    enabled: bool = True
    prompt_len: int = Field(default=128, ge=1)
    batch_size: int = Field(default=1, ge=1)
    decode_tokens: int = Field(default=16, ge=1)
    warmup: int = Field(default=1, ge=0)
    repeats: int = Field(default=3, ge=1)
    threads: int | None = Field(default=None, ge=1)


class CalibrationSettings(Strict):
    samples: int = Field(default=16, ge=1)
    seq_len: int = Field(default=256, ge=8)
    source: DataSource | None = Field(default=None, description="calibration text (default: the zoo models' "
                                      "training mix); docs/evaluation.md 'Data sources'")


class BaselineSpec(Strict):
    name: str = "bf16"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value):
        return check_slug(value, "baseline name")


class StudyConfig(Strict):
    name: str | None = Field(default=None, description="report name (default: the config file's stem)")
    description: str = ""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    model: ModelSpec | None = None
    models: list[ModelSpec] = Field(default_factory=list)
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    variants: list[dict[str, Any]] = Field(default_factory=list)
    tasks: list[TaskSpec] = Field(default_factory=list)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    datasets: dict[str, str] = Field(default_factory=dict)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    bench: BenchSettings = Field(default_factory=BenchSettings)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)

    @field_validator("name")
    @classmethod
    def _safe_study_name(cls, value):
        return value if value is None else check_slug(value, "study name")

    @field_validator("variants")
    @classmethod
    def _safe_variant_names(cls, value):
        # The variant schema itself belongs to the quantization engine; only the name is checked here.
        for i, variant in enumerate(value):
            if "name" in variant:
                check_slug(variant["name"], f"variant {i} name")
        return value

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_strings(cls, value):
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _one_model_list(self):
        if self.model is not None:
            self.models = [self.model, *self.models]
            self.model = None
        if not self.models:
            raise ValueError("no model given: set `model: {path: ...}` or `models: [{path: ...}]`")
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model labels must be unique, got {labels}; give each a `name`")
        return self


def _kind(node: Any) -> str:
    if isinstance(node, bool):
        return "a boolean"
    if isinstance(node, (int, float)):
        return "a number"
    if isinstance(node, str):
        return "a string"
    return "null" if node is None else type(node).__name__


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    """Apply one ``--set a.b.0.c=value`` override to the raw YAML mapping."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise UserError(f"--set {key}=...: the key has an empty part", source,
                        "write a dotted key such as eval.limit or models.0.path")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[:i]) or "(top level)"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"--set {key}: `{part}` is not an index of the list at "
                                f"`{here}` (length {len(node)})", source,
                                "use a 0-based index that exists, e.g. --set models.0.path=/ckpt")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise UserError(f"--set {key}: `{here}` is {_kind(node)}, not a mapping, so it has no key `{part}`",
                            source, f"set `{here}` itself (--set {here}=...) or check the key's spelling")


def _model_override_key(raw: dict, key: str, source: str) -> str:
    """`model.X` on a config that lists `models:` means the one model there; several are ambiguous."""
    if not (key == "model" or key.startswith("model.")) or raw.get("model") is not None:
        return key
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        return key
    if len(models) == 1:
        return "models.0" + key[len("model"):]
    rest = key[len("model"):] or ".path"
    raise UserError(f"--set {key}: this study has {len(models)} models (`models:`), so `model` is ambiguous",
                    source, f"name the model by index: --set models.N{rest}=... with N from 0 to {len(models) - 1}")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item!r} has no `=`", "command line", "write --set key=value, e.g. "
                            "--set model.path=/ckpt or --set eval.limit=20")
        key, text = item.split("=", 1)
        key = key.strip()
        value = safe_yaml.loads(text, f"--set {key}") if text else ""
        parsed.append((key, value))
    return parsed


def _apply_include_paths(raw: dict, include_path: list[str] | None, config_dir: Path) -> None:
    """eval.include_path: config-relative paths made absolute, then ``--include-path`` folders appended."""
    ev = raw.get("eval")
    given = ev.get("include_path") if isinstance(ev, dict) else None
    if not given and not include_path:
        return
    if ev is None:
        ev = raw["eval"] = {}
    given = [given] if isinstance(given, str) else (given or [])
    if not isinstance(ev, dict) or not isinstance(given, list):
        return  # validation names the bad value
    paths = [str((config_dir / os.path.expanduser(p)).resolve()) if isinstance(p, str) else p for p in given]
    for p in include_path or []:
        p = str(Path(os.path.expanduser(p)).resolve())
        if p not in paths:
            paths.append(p)
    ev["include_path"] = paths


def _apply_task_flags(raw: dict, tasks: list[str] | None, limit: int | float | None,
                      overridden: set[str]) -> None:
    """--tasks replaces the task list (keeping each named task's own settings); a command-line limit
    (--limit or --set eval.limit) is global: it replaces every per-task `limit:`."""
    if tasks is not None:
        current = raw.get("tasks") if isinstance(raw.get("tasks"), list) else []
        by_name = {}
        for t in current:
            name = t if isinstance(t, str) else t.get("name") if isinstance(t, dict) else None
            if isinstance(name, str):
                by_name.setdefault(name, t)
        raw["tasks"] = [copy.deepcopy(by_name.get(name, name)) for name in tasks]
    if limit is not None:
        if not isinstance(raw.get("eval"), dict):
            raw["eval"] = {} if raw.get("eval") is None else raw["eval"]
        if isinstance(raw["eval"], dict):
            raw["eval"]["limit"] = limit
        overridden.add("eval.limit")
    if "eval.limit" in overridden and isinstance(raw.get("tasks"), list):
        for t in raw["tasks"]:
            if isinstance(t, dict):
                t.pop("limit", None)


def _format_validation_error(exc: ValidationError, source: str) -> UserError:
    problems = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        loc = loc if len(loc) <= 80 else loc[:77] + "..."
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg if len(msg) <= 300 else msg[:297] + "..."
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"`{loc}`: {msg}")
    more = f" (and {len(exc.errors()) - 5} more)" if len(exc.errors()) > 5 else ""
    return UserError("the study config is invalid: " + "; ".join(problems) + more, source,
                     "correct or remove the named keys; README.md 'Configs' lists every key and its values")


def load_config(path: str | Path, overrides: list[str] | None = None, *, tasks: list[str] | None = None,
                limit: int | float | None = None, include_path: list[str] | None = None) -> tuple[StudyConfig, dict]:
    """Read, override and validate a study config. Returns (config, raw mapping after overrides).

    ``tasks`` (``--tasks``) replaces the task list; ``limit`` (``--limit``) and a command-line
    ``eval.limit`` override every per-task limit. ``include_path`` (``--include-path``) adds task
    folders to ``eval.include_path``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist", str(path.parent.resolve()),
                        "pass the path of a YAML study config, e.g. configs/int4_hybrid.yaml")
    raw = safe_yaml.read_file(path, "study config")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError("config must be a YAML mapping of keys to values", str(path),
                        "start from configs/int4_hybrid.yaml")
    raw = copy.deepcopy(raw)
    overridden: set[str] = set()
    for key, value in parse_overrides(overrides or []):
        where = f"{path} (--set {key})"
        key = _model_override_key(raw, key, where)
        _set_dotted(raw, key, value, where)
        overridden.add(key)
    _apply_task_flags(raw, tasks, limit, overridden)
    _apply_include_paths(raw, include_path, path.parent)
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise _format_validation_error(exc, str(path)) from None
    if config.name is None:
        config.name = safe_slug(path.stem, fallback="study")
    return config, raw
