"""Study config: the YAML a user hands to ``python -m attnres_quant run``.

Validated with pydantic (``extra="forbid"`` everywhere) so an unknown key or a
bad value names the file, the key and the reason.  Variants are validated by
the quantization engine's own ``Variant`` schema (``attnres_quant.quant``)
so the policy format has one definition.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    path: str = Field(description="zoo:NAME, a local checkpoint directory, or a hub id")
    name: str | None = Field(default=None, description="label in the report (default: from path)")
    allow_pickle: bool = False
    trust_remote_code: bool = False
    tokenizer: str | None = Field(default=None, description="tokenizer directory when the checkpoint's own cannot "
                                  "be used (Kimi's tiktoken tokenizer is remote code)")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.path.split(":", 1)[-1].rstrip("/").split("/")[-1]


class TaskSpec(Strict):
    name: str
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    max_gen_toks: int | None = Field(default=None, ge=1, description="generation cap for this task only")


class EvalSettings(Strict):
    batch_size: int = Field(default=16, ge=1)
    limit: int | None = Field(default=None, ge=1, description="max samples per task (None = all)")
    num_fewshot: int | None = Field(default=None, ge=0,
                                    description="None = each task's own default (lm-eval's, e.g. math 4, gsm8k 5)")
    max_gen_toks: int | None = Field(default=None, ge=1,
                                     description="cap on generated tokens for every generation task "
                                                 "(None = each task's own limit, lm-eval's: humaneval 1024, "
                                                 "math the model's default, 256 with HFLM)")
    allow_code_execution: bool = False
    code_timeout_s: float = Field(default=3.0, gt=0, description="time limit of one executed program "
                                  "(lm-eval 0.4.13 humaneval: 3 s)")


class QualitySettings(Strict):
    enabled: bool = True
    text: Literal["humaneval"] = "humaneval"
    max_tokens: int = Field(default=4096, ge=16, description="tokens of fixed text for bpb/KL/JS")
    seq_len: int = Field(default=512, ge=16)


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


class BaselineSpec(Strict):
    name: str = "bf16"


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


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    """Apply one ``--set a.b.0.c=value`` override to the raw YAML mapping."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"--set {key}: `{part}` is not an index of the list at "
                                f"`{'.'.join(parts[:i])}` (length {len(node)})", source,
                                "use a 0-based index that exists, e.g. models.0.path=...")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        else:
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item!r} has no `=`", "command line", "write --set key=value, e.g. "
                            "--set model.path=/ckpt or --set eval.limit=20")
        key, text = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(text) if text else ""))
    return parsed


def _format_validation_error(exc: ValidationError, source: str) -> UserError:
    problems = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"`{loc}`: {msg}")
    more = f" (and {len(exc.errors()) - 5} more)" if len(exc.errors()) > 5 else ""
    return UserError("the study config is invalid: " + "; ".join(problems) + more, source,
                     "correct or remove the named keys; README.md 'Configs' lists every key and its values")


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[StudyConfig, dict]:
    """Read, override and validate a study config. Returns (config, raw mapping after overrides)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist", str(path.parent.resolve()),
                        "pass the path of a YAML study config, e.g. configs/int4_hybrid.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise UserError(f"config is not valid YAML ({getattr(exc, 'problem', exc)})", where,
                        "fix the YAML syntax (indentation, colons, quotes)") from None
    if not isinstance(raw, dict):
        raise UserError("config must be a YAML mapping of keys to values", str(path),
                        "start from configs/int4_hybrid.yaml")
    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value, f"{path} (--set {key})")
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise _format_validation_error(exc, str(path)) from None
    if config.name is None:
        config.name = path.stem
    return config, raw
