"""Local copies of the real benchmarks (MMLU, GPQA, Math), read without the network.

A benchmark's data comes from, in order:

1. ``settings.datasets[<benchmark>]``: a local path the user points at;
2. otherwise the Hugging Face hub *cache* (``snapshot_download(..., local_files_only=True)``),
   i.e. a copy that was downloaded earlier on this machine;
3. otherwise, only when the hub is not switched off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``
   unset), a download of the hub repository snapshot.

Whatever the source, the folder is read by :func:`load_split` in one of these layouts
(``<cfg>`` is the benchmark's config, e.g. an MMLU subject or a Math subject; ``<split>`` is
``test``, ``dev``, ``validation``, ``train``):

* **hub repository snapshot** (what ``huggingface-cli download <repo> --repo-type dataset
  --local-dir PATH`` gives): ``PATH/<cfg>/<split>-00000-of-00001.parquet`` (any
  ``<split>-*.parquet`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.arrow``), also under ``PATH/data/``;
  GPQA's csv files ``PATH/gpqa_diamond.csv``;
* **plain files**: ``PATH/<cfg>/<split>.{parquet,jsonl,json,csv}`` or ``PATH/<cfg>_<split>.<ext>``;
* **``save_to_disk``**: ``PATH/<cfg>/`` is a ``DatasetDict`` (or ``Dataset``) saved with
  ``save_to_disk``, or ``PATH/`` itself is a ``DatasetDict`` whose rows carry the config in a
  column (MMLU's ``all`` config: ``subject``; Math: ``type``) and are filtered by it;
* **original MATH release** (the ``MATH.tar`` of Hendrycks et al.): ``PATH/<split>/<cfg>/*.json``
  (one problem per file).

The schemas are the hub's: MMLU (``cais/mmlu``) ``question, subject, choices[4], answer`` (int);
GPQA (``Idavidrein/gpqa``) ``Question, Correct Answer, Incorrect Answer 1..3``; Math
(``EleutherAI/hendrycks_math``) ``problem, level, type, solution``.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnres_quant.errors import UserError

FILE_EXTS = ("parquet", "jsonl", "json", "csv", "arrow")


@dataclass(frozen=True)
class Benchmark:
    name: str            # config key: settings.datasets[name]
    hub_repo: str        # hub dataset repository the layout mirrors
    configs: tuple[str, ...]
    splits: tuple[str, ...]   # splits the tasks read (eval split first)
    config_column: str | None  # column naming the config in an all-in-one save_to_disk copy
    column_values: dict[str, str] | None = None  # config -> value of config_column
    required_columns: tuple[str, ...] = ()


MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios",
    "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)

MATH_SUBJECTS = {  # hendrycks_math config -> value of the `type` column
    "algebra": "Algebra",
    "counting_and_probability": "Counting & Probability",
    "geometry": "Geometry",
    "intermediate_algebra": "Intermediate Algebra",
    "number_theory": "Number Theory",
    "prealgebra": "Prealgebra",
    "precalculus": "Precalculus",
}

BENCHMARKS: dict[str, Benchmark] = {
    "mmlu": Benchmark("mmlu", "cais/mmlu", MMLU_SUBJECTS, ("test", "dev"), "subject",
                      required_columns=("question", "choices", "answer")),
    "gpqa": Benchmark("gpqa", "Idavidrein/gpqa", ("gpqa_diamond",), ("train",), None,
                      required_columns=("Question", "Correct Answer", "Incorrect Answer 1",
                                        "Incorrect Answer 2", "Incorrect Answer 3")),
    "math": Benchmark("math", "EleutherAI/hendrycks_math", tuple(MATH_SUBJECTS), ("test",), "type",
                      column_values=MATH_SUBJECTS, required_columns=("problem", "solution")),
}


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def how_to_provide(bench: Benchmark) -> str:
    return (f"download it once on a machine with network, e.g. `huggingface-cli download {bench.hub_repo} "
            f"--repo-type dataset --local-dir /data/{bench.name}` (or `datasets.load_dataset(...)"
            f".save_to_disk(...)`), copy the folder here and set `datasets: {{{bench.name}: /data/{bench.name}}}` "
            f"at the top level of the study config, beside `eval:` (layouts: docs/evaluation.md)")


def resolve_root(bench_name: str, datasets: dict[str, str] | None, *, download: bool = False) -> tuple[Path, list[str]]:
    """Folder holding ``bench_name``'s data, and the places looked at (for messages).

    Raises :class:`UserError` when none is available.
    """
    bench = BENCHMARKS[bench_name]
    looked: list[str] = []
    given = (datasets or {}).get(bench_name)
    if given:
        root = Path(os.path.expanduser(str(given)))
        looked.append(f"datasets.{bench_name} = {given}")
        if not root.exists():
            raise UserError(f"task '{bench_name}': its local dataset path does not exist",
                            where=f"datasets.{bench_name} = {given}", fix=how_to_provide(bench))
        return root, looked
    looked.append(f"no `datasets.{bench_name}` entry in the config")
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(bench.hub_repo, repo_type="dataset", local_files_only=True))
        return root, looked
    except Exception:  # noqa: BLE001 - not in the cache
        looked.append(f"the Hugging Face hub cache has no copy of {bench.hub_repo}")
    if download and not _offline():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(bench.hub_repo, repo_type="dataset")), looked
        except Exception as e:  # noqa: BLE001
            looked.append(f"downloading {bench.hub_repo} failed ({type(e).__name__})")
    elif _offline():
        looked.append("the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    raise UserError(f"task '{bench_name}' has no data on this machine", where="; ".join(looked),
                    fix=how_to_provide(bench))


# ---------------------------------------------------------------------------
# locating files


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()
                           or (p / "dataset_info.json").exists() and any(p.glob("*.arrow")))


def _split_files(folder: Path, split: str) -> list[Path]:
    for ext in FILE_EXTS:
        hits = sorted(Path(x) for x in glob.glob(str(folder / f"{split}-*.{ext}")))
        hits += [folder / f"{split}.{ext}"] if (folder / f"{split}.{ext}").exists() else []
        if hits:
            return hits
    return []


@dataclass
class Located:
    kind: str          # "files" | "saved" | "saved_all" | "math_json"
    paths: list[Path]
    filter_value: str | None = None


def locate(root: Path, bench: Benchmark, config: str, split: str) -> Located | None:
    """Where ``config``/``split`` lies under ``root`` (None when not found); reads nothing."""
    snaps = root / "snapshots"  # a hub cache folder (datasets--org--name): its newest snapshot
    if snaps.is_dir() and not (root / config).exists():
        newest = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if newest:
            root = newest[-1]
    if root.is_file():  # a single file given for a single-config benchmark
        return Located("files", [root]) if len(bench.configs) == 1 else None
    for base in (root, root / "data"):
        sub = base / config
        if _is_saved_dataset(sub):
            return Located("saved", [sub])
        if sub.is_dir():
            files = _split_files(sub, split)
            if files:
                return Located("files", files)
        for ext in FILE_EXTS:  # cfg_split.ext, cfg-split.ext, cfg.ext (GPQA's csv files)
            for name in (f"{config}_{split}.{ext}", f"{config}-{split}.{ext}", f"{config}.{ext}"):
                if (base / name).is_file():
                    return Located("files", [base / name])
    if bench.name == "math":
        for folder in (root / split / config, root / "MATH" / split / config):
            if folder.is_dir() and any(folder.glob("*.json")):
                return Located("math_json", sorted(folder.glob("*.json")))
    if _is_saved_dataset(root) and bench.config_column:
        value = (bench.column_values or {}).get(config, config)
        return Located("saved_all", [root], filter_value=value)
    for base in (root / "all", root / "data" / "all"):  # MMLU's `all` config as files
        if bench.config_column and base.is_dir():
            files = _split_files(base, split)
            if files:
                return Located("files", files, filter_value=(bench.column_values or {}).get(config, config))
    return None


def _read_files(paths: list[Path]) -> list[dict]:
    import pandas as pd

    frames = []
    for p in paths:
        ext = p.suffix.lstrip(".")
        if ext == "parquet":
            frames.append(pd.read_parquet(p))
        elif ext == "csv":
            frames.append(pd.read_csv(p, keep_default_na=False))
        elif ext == "jsonl":
            frames.append(pd.read_json(p, lines=True))
        elif ext == "json":
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
            frames.append(pd.DataFrame(data if isinstance(data, list) else [data]))
        elif ext == "arrow":
            from datasets import Dataset

            frames.append(Dataset.from_file(str(p)).to_pandas())
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    rows = df.to_dict(orient="records")
    return [{k: (v.tolist() if hasattr(v, "tolist") and not isinstance(v, (str, bytes)) else v)
             for k, v in r.items()} for r in rows]


def _read_saved(path: Path, split: str) -> list[dict] | None:
    from datasets import Dataset, DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            return None
        ds = ds[split]
    assert isinstance(ds, Dataset)
    return ds.to_list()


def load_split(root: Path, bench_name: str, config: str, split: str) -> list[dict]:
    """Rows of ``config``/``split`` of a benchmark from a local folder (hub schema)."""
    bench = BENCHMARKS[bench_name]
    loc = locate(root, bench, config, split)
    if loc is None:
        raise UserError(f"task '{bench_name}': no '{config}' {split} split in the local copy",
                        where=str(root), fix=how_to_provide(bench))
    if loc.kind == "files":
        rows = _read_files(loc.paths)
    elif loc.kind == "math_json":
        rows = []
        for p in loc.paths:
            with open(p, encoding="utf-8") as f:
                rows.append(json.load(f))
    else:
        rows = _read_saved(loc.paths[0], split)
        if rows is None:
            raise UserError(f"task '{bench_name}': the saved dataset has no '{split}' split",
                            where=str(loc.paths[0]), fix=how_to_provide(bench))
    if loc.filter_value is not None:
        rows = [r for r in rows if r.get(bench.config_column) == loc.filter_value]
    missing = [c for c in bench.required_columns if rows and c not in rows[0]]
    if missing:
        raise UserError(f"task '{bench_name}': the local copy of '{config}' lacks columns {missing} "
                        f"of the {bench.hub_repo} schema", where=str(root), fix=how_to_provide(bench))
    return rows


def check_available(bench_name: str, datasets: dict[str, str] | None, configs: list[str] | None = None) -> Path:
    """Preflight: the benchmark's folder exists and holds each config's eval split (reads no rows)."""
    bench = BENCHMARKS[bench_name]
    root, looked = resolve_root(bench_name, datasets, download=False) if _offline() else \
        _resolve_or_defer(bench_name, datasets)
    if root is None:  # online and not cached: the loader downloads at task build time
        return None  # type: ignore[return-value]
    eval_split = bench.splits[0]
    absent = []
    present_values: dict[str, set] = {}
    for c in configs or bench.configs:
        loc = locate(root, bench, c, eval_split)
        if loc is None:
            absent.append(c)
        elif loc.filter_value is not None:  # one copy holds every config: look at its column
            key = str(loc.paths)
            if key not in present_values:
                present_values[key] = _column_values(loc, bench.config_column, eval_split)
            if loc.filter_value not in present_values[key]:
                absent.append(c)
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise UserError(
            f"task '{bench_name}': the local copy lacks the {eval_split} split of {shown}",
            where=f"{root} ({'; '.join(looked)})", fix=how_to_provide(bench))
    return root


def _column_values(loc: Located, column: str | None, split: str) -> set:
    if column is None:
        return set()
    if loc.kind == "saved_all":
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(loc.paths[0]))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                return set()
            ds = ds[split]
        return set(ds.unique(column)) if column in ds.column_names else set()
    return {r.get(column) for r in _read_files(loc.paths)}


def _resolve_or_defer(bench_name: str, datasets: dict[str, str] | None) -> tuple[Path | None, list[str]]:
    try:
        return resolve_root(bench_name, datasets, download=False)
    except UserError:
        if (datasets or {}).get(bench_name):
            raise
        return None, []


def rows_to_dataset_dict(splits: dict[str, list[dict]]) -> Any:
    from datasets import Dataset, DatasetDict

    return DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()})


# ---------------------------------------------------------------------------
# preflight validation of a local copy's content (schema, splits), before any model loads


FEWSHOT_SPLIT = {"mmlu": "dev", "math": "train"}  # where few-shot examples come from (gpqa: none)


class _Problems:
    """Problems found in a local copy, one kind at a time: (what, where, fix) -> affected configs."""

    def __init__(self, bench: Benchmark):
        self.bench = bench
        self.found: dict[tuple[str, str, str], list[str]] = {}

    def add(self, what: str, where: str, fix: str, config: str) -> None:
        self.found.setdefault((what, where, fix), []).append(config)

    def raise_first(self) -> None:
        if not self.found:
            return
        (what, where, fix), configs = next(iter(self.found.items()))
        shown = ", ".join(configs[:5]) + (f" and {len(configs) - 5} more" if len(configs) > 5 else "")
        others = len(self.found) - 1
        more = f" ({others} other problem(s) of the copy follow once this is fixed)" if others else ""
        scope = f" ({shown})" if len(self.bench.configs) > 1 else ""
        raise UserError(f"task '{self.bench.name}': {what}{scope}{more}", where=where, fix=fix)


def _describe(loc: Located) -> str:
    return ", ".join(str(p) for p in loc.paths[:3]) + (f" (+{len(loc.paths) - 3} files)" if len(loc.paths) > 3 else "")


def _norm(col: str) -> str:
    return "".join(ch for ch in str(col).lower() if ch.isalnum())


def _check_rows(bench: Benchmark, config: str, split: str, rows: list[dict], where: str, probs: _Problems) -> None:
    if not rows:
        probs.add(f"the {split} split has no rows", where,
                  "copy the complete dataset (an interrupted download leaves empty files)", config)
        return
    cols = set(rows[0])
    missing = [c for c in bench.required_columns if c not in cols]
    if missing:
        present = {_norm(c): c for c in cols}
        renames = [f"'{present[_norm(m)]}' -> '{m}'" for m in missing if _norm(m) in present]
        if renames:
            probs.add(f"the {split} split names its columns differently from the {bench.hub_repo} schema "
                      f"(needs {list(bench.required_columns)}, has {sorted(cols)})", where,
                      f"rename the columns: {', '.join(renames)}", config)
        else:
            probs.add(f"the {split} split lacks columns {missing} of the {bench.hub_repo} schema "
                      f"(has {sorted(cols)})", where,
                      f"use a copy in the hub's schema ({', '.join(bench.required_columns)}); "
                      f"docs/evaluation.md lists the layouts", config)
        return
    if bench.name == "mmlu":
        answers = [r.get("answer") for r in rows]
        if any(isinstance(a, str) and a.strip().upper() in ("A", "B", "C", "D") for a in answers):
            probs.add(f"the {split} split's `answer` column holds letters (A-D) instead of indices 0-3", where,
                      "convert the answers to integers (A -> 0, B -> 1, C -> 2, D -> 3), as in cais/mmlu", config)
            return
        bad = [a for a in answers if not _is_index(a, 4)]
        if bad:
            probs.add(f"the {split} split's `answer` column has values that are not indices 0-3 "
                      f"(e.g. {bad[0]!r})", where, "give each answer as the integer index of the right choice",
                      config)
            return
        if any(not isinstance(r.get("choices"), (list, tuple)) or len(r["choices"]) != 4 for r in rows):
            probs.add(f"the {split} split's `choices` column is not a list of 4 options in every row", where,
                      "give `choices` as a list of the four option texts (cais/mmlu schema)", config)
    if bench.name == "math":
        nobox = sum(1 for r in rows if "\\boxed" not in str(r.get("solution", "")) and
                    "\\fbox" not in str(r.get("solution", "")))
        if nobox:
            probs.add(f"{nobox} row(s) of the {split} split have a `solution` without a \\boxed{{}} final answer "
                      f"(lm-eval takes the reference answer from the last \\boxed{{}})", where,
                      "use the EleutherAI/hendrycks_math solutions unchanged", config)
    if bench.name == "gpqa":
        empty = sum(1 for r in rows if not str(r.get("Correct Answer") or "").strip())
        if empty:
            probs.add(f"{empty} row(s) have an empty `Correct Answer`", where,
                      "use the Idavidrein/gpqa csv unchanged", config)


def _is_index(a, n: int) -> bool:
    try:
        return float(a) == int(float(a)) and 0 <= int(float(a)) < n and not isinstance(a, bool)
    except (TypeError, ValueError):
        return False


def validate(bench_name: str, datasets: dict[str, str] | None, configs: list[str] | None = None, *,
             fewshot: bool = False) -> Path | None:
    """Preflight: the local copy exists, holds each config's eval split (and few-shot split when
    ``fewshot``), every file reads, and the rows follow the hub schema. Raises one
    :class:`UserError` per kind of problem (what, where, how to fix), naming the affected configs."""
    bench = BENCHMARKS[bench_name]
    root = check_available(bench_name, datasets, configs)
    if root is None:  # online and not cached: the loader downloads at task build time
        return None
    memo = (bench_name, str(root), tuple(configs or ()), fewshot)
    if memo in _VALIDATED:  # the pipeline evaluates each variant with the same copy: read it once
        return root
    probs = _Problems(bench)
    cache: dict[tuple[str, str], list[dict]] = {}
    splits = [bench.splits[0]] + ([FEWSHOT_SPLIT[bench_name]] if fewshot and bench_name in FEWSHOT_SPLIT else [])
    for config in configs or bench.configs:
        for split in splits:
            loc = locate(root, bench, config, split)
            if loc is None:
                probs.add(f"few-shot examples are asked for, but the copy has no {split} split", str(root),
                          f"add the {split} split to the local copy, or set `num_fewshot: 0`", config)
                continue
            key = (str(loc.paths), split)
            where = _describe(loc)
            if key not in cache:
                empty = [p for p in loc.paths if p.is_file() and p.stat().st_size == 0]
                if empty:
                    probs.add(f"the {split} split's file is empty (0 bytes)", str(empty[0]),
                              "copy the file again (an interrupted download or copy leaves empty files)", config)
                    continue
                try:
                    cache[key] = _read_located(loc, split)
                except Exception as e:  # noqa: BLE001 - pandas / pyarrow / datasets read errors
                    probs.add(f"the {split} split cannot be read ({type(e).__name__}: {str(e)[:200]})", where,
                              "copy the file again or convert it to parquet / jsonl", config)
                    continue
                if cache[key] is None:
                    probs.add(f"the saved dataset has no '{split}' split", where,
                              f"save the {split} split too, or set `num_fewshot: 0`" if split != bench.splits[0]
                              else how_to_provide(bench), config)
                    continue
            rows = cache[key]
            if loc.filter_value is not None:
                rows = [r for r in rows if r.get(bench.config_column) == loc.filter_value]
            _check_rows(bench, config, split, rows, where, probs)
    probs.raise_first()
    _VALIDATED.add(memo)
    return root


_VALIDATED: set[tuple] = set()


def _read_located(loc: Located, split: str) -> list[dict] | None:
    if loc.kind == "files":
        return _read_files(loc.paths)
    if loc.kind == "math_json":
        out = []
        for p in loc.paths:
            with open(p, encoding="utf-8") as f:
                out.append(json.load(f))
        return out
    return _read_saved(loc.paths[0], split)


# ---------------------------------------------------------------------------
# local copies of lm-eval's own tasks (passed through by name)

_BUILDERS = {"parquet": "parquet", "jsonl": "json", "json": "json", "csv": "csv", "arrow": "arrow"}


def task_files(root: Path, task: str, cfg: dict, *, fewshot: bool | None = None) -> tuple[str, dict[str, list[str]]]:
    """(datasets builder, {split: files}) of a local copy of lm-eval task ``task`` whose YAML config is
    ``cfg``. Looks in ``root``, ``root/<dataset_name>``, ``root/data``, ``root/data/<dataset_name>`` for
    ``<split>-*.<ext>`` or ``<split>.<ext>`` (a single file is the eval split). Splits the config
    names but the copy lacks are dropped from ``cfg`` unless needed: the eval split always, the
    few-shot split when the task is few-shot."""
    where = f"datasets.{task} = {root}"
    if not root.exists():
        raise UserError(f"task '{task}': its local dataset path does not exist", where=where,
                        fix="point `datasets.<task>` (top-level key of the study config) at a folder holding "
                            "the task's splits as <split>.{parquet,jsonl,json,csv}")
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    n_shot = cfg.get("num_fewshot") or 0
    fs_split = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
    needs_fewshot = (n_shot > 0 if fewshot is None else fewshot) and not (cfg.get("fewshot_config") or {}).get("samples")
    files: dict[str, list[str]] = {}
    if root.is_file():
        files[eval_split] = [str(root)]
    else:
        name = cfg.get("dataset_name")
        folders = [root] + ([root / name] if name else []) + [root / "data"] + ([root / "data" / name] if name else [])
        for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
            split = cfg.get(key)
            if not split or split in files:
                continue
            for folder in folders:
                hits = _split_files(folder, split) if folder.is_dir() else []
                if hits:
                    files[split] = [str(h) for h in hits]
                    break
    fix = (f"put the task's splits in {root} as <split>.{{parquet,jsonl,json,csv}} or <split>-*.parquet "
           f"(optionally under {cfg.get('dataset_name') or '<dataset_name>'}/ or data/), with the columns of "
           f"its hub dataset {cfg.get('dataset_path')}")
    if eval_split not in files:
        raise UserError(f"task '{task}': the local copy has no {eval_split} split", where=where, fix=fix)
    if needs_fewshot and fs_split and fs_split not in files:
        raise UserError(f"task '{task}' is {n_shot}-shot by default, but the local copy has no {fs_split} split "
                        "to take the examples from", where=where, fix=fix + ", or set its `num_fewshot: 0`")
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(key) and cfg[key] not in files:
            cfg[key] = None
    exts = {Path(f).name.rsplit(".", 1)[-1] for fl in files.values() for f in fl}
    if len(exts) != 1:
        raise UserError(f"task '{task}': the local copy mixes file formats {sorted(exts)}", where=where,
                        fix="keep one format (parquet, jsonl, json or csv) for all splits")
    empty = [f for fl in files.values() for f in fl if Path(f).stat().st_size == 0]
    if empty:
        raise UserError(f"task '{task}': a file of the local copy is empty (0 bytes)", where=empty[0],
                        fix="copy the file again (an interrupted download or copy leaves empty files)")
    return _BUILDERS[exts.pop()], files
