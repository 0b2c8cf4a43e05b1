"""User text for calibration and quality: one schema (:class:`DataSource`), read locally, cut into fixed windows.

A study config's ``calibration.source`` and ``quality.source`` take the same keys (docs/evaluation.md,
"Data sources"); without one, the built-in defaults of the zoo models are used unchanged (calibration:
stdlib train files + proxy training items, ``quant.calibration_batches``; quality: HumanEval's
prompts and solutions, ``evaluation.metrics.fixed_text``).

Accepted ``path``: a text file (one document), a folder of text files (one document per file), a
JSONL / JSON / Parquet / Arrow / CSV file with a text column, or a folder holding such files -- for
example a Hugging Face dataset repository as ``huggingface-cli download --repo-type dataset`` or
``save_to_disk`` leaves it (wikitext's ``wikitext-2-raw-v1/test-00000-of-00001.parquet``, c4's
``en/c4-train.00000-of-01024.json.gz``, ultrachat_200k's ``data/train_sft-00000-of-00003-*.parquet``).
In a folder, ``config`` picks a configuration subfolder and ``split`` the files of one split (a file's
split is its name before the shard number, the part after the last ``-`` of it, or its folder:
``test-00000-of-00001`` -> ``test``, ``c4-train.00000-of-01024`` -> ``train``, ``train/data-00000.arrow``
-> ``train``). Default split: ``train`` for calibration, ``test`` for quality.

Documents are the column's rows (``column``, default ``text``, else ``messages``). A row holding a
list of ``{role, content}`` messages is rendered with the model's chat template; a tokenizer without
one (the zoo models') gets :func:`fallback_chat` and the record says ``chat_template: fallback``.

Sampling: calibration (``shuffle`` defaults to true) reads files in a seeded order and each file's
documents in a seeded order; quality (``shuffle`` false) reads files sorted by name and documents in
order, as llama.cpp reads wikitext. Documents are read lazily until the joined text (``separator``:
"" when the documents end with a newline, as wikitext's lines do, else a blank line) gives enough
tokens; the token stream is cut into ``samples`` windows of ``seq_len`` tokens (calibration) or its
first ``max_tokens`` tokens (quality). :func:`record` describes what was used (files, documents,
sha256 of the joined text read and of the token ids), and results.json keeps it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError

DATA_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "jsonl", ".json": "json", ".csv": "csv",
                 ".jsonl.gz": "jsonl", ".json.gz": "json", ".ndjson": "jsonl"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".raw", ".tokens"}
KNOWN_SPLIT = re.compile(r"(^|_)(train|test|validation|valid|dev|eval)(_|$)")
_SHARD = re.compile(r"[-.]\d{3,}(-of-\d{3,})?.*$")
DEFAULT_SPLIT = {"calibration": "train", "quality": "test"}
METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json", "dataset_infos.json"}  # not data
FIX_PATH = "point `{key}.source.path` at an existing file or folder (docs/evaluation.md, 'Data sources')"


class DataSource(BaseModel):
    """Where calibration or quality text comes from (the same keys for both)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a text/JSONL/JSON/Parquet/Arrow/CSV file, a folder of text files, or a local "
                                  "copy of a Hugging Face dataset in its hub (or save_to_disk) layout")
    format: Literal["auto", "text", "jsonl", "json", "parquet", "arrow", "csv"] = "auto"
    config: str | None = Field(default=None, description="configuration subfolder, e.g. wikitext-2-raw-v1 or en")
    split: str | None = Field(default=None, description="default: train (calibration), test (quality)")
    column: str | None = Field(default=None, description="text column (default `text`, else chat `messages`)")
    shuffle: bool | None = Field(default=None, description="seeded document order (default: calibration yes, "
                                                           "quality no)")
    separator: str | None = Field(default=None, description="joins documents (default: '' when they end with a "
                                                            "newline, else a blank line)")


# --------------------------------------------------------------------------- files
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in sorted(DATA_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def split_names(path: Path) -> set[str]:
    """The split(s) a data file belongs to by its name or folder (module docstring)."""
    stem = path.name[: len(path.name) - len(_suffix(path))] if _suffix(path) else path.name
    stem = _SHARD.sub("", stem)
    return {stem, stem.rsplit("-", 1)[-1], path.parent.name}


def _files_of(source: DataSource, role: str, key: str) -> tuple[list[Path], str]:
    """(files, format) of a source; UserError for a missing path, no files, or an ambiguous folder."""
    root = Path(source.path).expanduser()
    if not root.exists():
        raise UserError(f"the {role} data source {str(root)!r} does not exist", f"config key `{key}.source.path`",
                        FIX_PATH.format(key=key))
    if root.is_file():
        fmt = source.format if source.format != "auto" else DATA_SUFFIXES.get(_suffix(root), "text")
        return [root], fmt
    data = sorted(p for p in root.rglob("*") if p.is_file() and _suffix(p) in DATA_SUFFIXES
                  and p.name not in METADATA_FILES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if source.format not in ("auto", "text"):
        data = [p for p in data if DATA_SUFFIXES[_suffix(p)] == source.format]
    if not data or source.format == "text":
        texts = sorted(p for p in root.rglob("*") if p.is_file() and (source.format == "text" or p.suffix.lower()
                       in TEXT_SUFFIXES) and not any(s.startswith(".") for s in p.relative_to(root).parts))
        if not texts:
            raise UserError(f"the {role} data folder {str(root)!r} holds no text or data files (looked for "
                            f"{', '.join(sorted(TEXT_SUFFIXES | set(DATA_SUFFIXES)))})", f"config key `{key}.source`",
                            "point it at a folder of text files or a dataset copy, or set `format:`")
        return texts, "text"
    data = _pick_config(data, root, source, role, key)
    data = _pick_split(data, source, role, key)
    formats = {DATA_SUFFIXES[_suffix(p)] for p in data}
    if len(formats) > 1:
        raise UserError(f"the {role} data folder {str(root)!r} mixes file formats {sorted(formats)}",
                        f"config key `{key}.source`", "set `format:` to the one to read")
    return data, formats.pop()


def _config_dir(path: Path, root: Path) -> str:
    parts = [p for p in path.relative_to(root).parts[:-1] if p != "data"]
    return parts[0] if parts else ""


def _pick_config(files: list[Path], root: Path, source: DataSource, role: str, key: str) -> list[Path]:
    configs = sorted({_config_dir(p, root) for p in files})
    if source.config is not None:
        chosen = [p for p in files if source.config in p.relative_to(root).parts[:-1]]
        if not chosen:
            raise UserError(f"the {role} dataset copy {str(root)!r} has no configuration {source.config!r} "
                            f"(subfolders with data: {[c for c in configs if c] or 'none'})",
                            f"config key `{key}.source.config`", "name one of the listed subfolders")
        return chosen
    if len([c for c in configs if c]) > 1 and not all(KNOWN_SPLIT.search(c) for c in configs if c):
        raise UserError(f"the {role} dataset copy {str(root)!r} holds several configurations {configs}",
                        f"config key `{key}.source`", f"set `{key}.source.config` to one of them")
    return files


def _pick_split(files: list[Path], source: DataSource, role: str, key: str) -> list[Path]:
    wanted = source.split or DEFAULT_SPLIT[role]
    chosen = [p for p in files if wanted in split_names(p)]
    if chosen:
        return chosen
    found = sorted({s for p in files for s in split_names(p) if KNOWN_SPLIT.search(s)})
    if source.split is None and not found:
        return files  # the copy names no splits: every file is the data
    raise UserError(f"no {wanted!r} split in the {role} data {str(Path(source.path))!r} (splits found: "
                    f"{found or 'none'})", f"config key `{key}.source.split`",
                    f"set `{key}.source.split` to one of the splits found")


# --------------------------------------------------------------------------- rows
def _json_rows(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        head = fh.read(1)
        while head and head.isspace():
            head = fh.read(1)
        if head == "[":
            rows = json.loads(head + fh.read())
            yield from (r for r in rows if isinstance(r, dict))
            return
        first = head + fh.readline()
        if first.strip():
            yield json.loads(first)
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _table(path: Path, fmt: str):
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if fmt == "csv":
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path)
    try:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).read_all()  # save_to_disk writes the stream format
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_file(src).read_all()


def columns_of(path: Path, fmt: str) -> list[str]:
    if fmt in ("jsonl", "json"):
        for row in _json_rows(path):
            return list(row)
        return []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return list(_table(path, fmt).column_names)


def _column_values(path: Path, fmt: str, column: str) -> list:
    if fmt in ("jsonl", "json"):
        return [row.get(column) for row in _json_rows(path)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=[column]).column(column).to_pylist()
    return _table(path, fmt).column(column).to_pylist()


def _read_problem(path: Path, exc: Exception, role: str, key: str) -> UserError:
    return UserError(f"could not read the {role} data file {str(path)!r}: {type(exc).__name__}: {str(exc)[:300]}",
                     f"config key `{key}.source`", "check that the file is complete and of the format its name "
                     "says (or set `format:`)")


# --------------------------------------------------------------------------- the source, opened
@dataclass
class OpenedSource:
    """A data source resolved to files, format and text column (no text read yet beyond a check)."""

    source: DataSource
    role: str
    key: str
    files: list[Path]
    format: str
    column: str | None
    info: dict = field(default_factory=dict)

    def documents(self, seed: int) -> Iterator[Any]:
        """Documents (strings or message lists) in the sampling order (module docstring)."""
        shuffle = self.source.shuffle if self.source.shuffle is not None else self.role == "calibration"
        files = list(self.files)
        rng = random.Random(seed)
        if shuffle:
            rng.shuffle(files)
        for path in files:
            docs = self._read(path)
            if shuffle:
                rng.shuffle(docs)
            yield from docs

    def check_has_text(self) -> None:
        """UserError when every document is empty (reads until the first non-empty one)."""
        for path in self.files:
            for doc in self._read(path):
                if (isinstance(doc, str) and doc.strip()) or is_chat(doc):
                    return
                if doc is not None and not isinstance(doc, str):
                    render(doc, None, {}, self)  # a clear error for a column of another type
        raise UserError(f"the {self.role} data {self.source.path!r} holds no text (every document of "
                        f"{len(self.files)} file(s) is empty)", f"config key `{self.key}.source`",
                        "point it at files with text, or name the right `column:`")

    def _read(self, path: Path) -> list:
        try:
            if self.format == "text":
                return [path.read_text(encoding="utf-8")]
            return _column_values(path, self.format, self.column)
        except UnicodeDecodeError as exc:
            raise UserError(f"the {self.role} text file {str(path)!r} is not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start})", f"config key `{self.key}.source`",
                            "convert it to UTF-8, or point the source at text files only") from None
        except (OSError, ValueError, KeyError) as exc:
            raise _read_problem(path, exc, self.role, self.key) from None
        except Exception as exc:  # pyarrow's errors
            if type(exc).__module__.startswith("pyarrow"):
                raise _read_problem(path, exc, self.role, self.key) from None
            raise


def open_source(source: DataSource, role: str, key: str | None = None) -> OpenedSource:
    """Resolve files, format and column, and check the column exists in every file (cheap; preflight)."""
    key = key or role
    files, fmt = _files_of(source, role, key)
    if fmt == "text":
        return OpenedSource(source, role, key, files, fmt, None)
    column = source.column
    for path in files:
        try:
            present = columns_of(path, fmt)
        except Exception as exc:  # noqa: BLE001 -- any reader failure is a bad file
            if isinstance(exc, UserError):
                raise
            raise _read_problem(path, exc, role, key) from None
        if column is None:
            column = next((c for c in ("text", "messages", "content") if c in present), None)
            if column is None:
                raise UserError(f"the {role} data file {str(path)!r} has no `text` or `messages` column (columns: "
                                f"{present})", f"config key `{key}.source.column`",
                                "set `column:` to the column holding the text")
        if column not in present:
            raise UserError(f"the {role} data file {str(path)!r} has no column {column!r} (columns: {present})",
                            f"config key `{key}.source.column`", "set `column:` to one of the listed columns")
    return OpenedSource(source, role, key, files, fmt, column)


# --------------------------------------------------------------------------- chat rendering
def fallback_chat(messages: list[dict]) -> str:
    """Chat text for a tokenizer without a chat template (the zoo models): ``<|role|>\\ncontent\\n`` per turn."""
    return "".join(f"<|{m.get('role', 'user')}|>\n{m.get('content', '')}\n" for m in messages)


def is_chat(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value) and bool(value)


def render(value: Any, tokenizer, state: dict, opened: OpenedSource) -> str:
    """A document as text: a string as it is, a message list through the chat template (or the fallback)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if is_chat(value):
        template = getattr(tokenizer, "chat_template", None)
        state["chat_template"] = "model" if template else "fallback"
        if template:
            return tokenizer.apply_chat_template(value, tokenize=False)
        return fallback_chat(value)
    raise UserError(f"column {opened.column!r} of the {opened.role} data holds {type(value).__name__} values, "
                    "not text or chat messages (a list of {role, content})", f"config key `{opened.key}.source`",
                    "set `column:` to a text column or a `messages` column")


# --------------------------------------------------------------------------- windows
@dataclass
class TextWindows:
    """Token ids cut from a source, and the record results.json keeps of them."""

    ids: list[int]
    record: dict

    def as_rows(self, seq_len: int):
        import torch

        n = len(self.ids) // seq_len
        return torch.tensor(self.ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def take_tokens(opened: OpenedSource, tokenizer, n_tokens: int, seed: int) -> TextWindows:
    """The first ``n_tokens`` tokens of the source's documents in sampling order (fewer if the text ends)."""
    docs = opened.documents(seed)
    state: dict = {}
    used: list[str] = []
    separator = opened.source.separator
    ids: list[int] = []
    budget = max(4 * n_tokens, 4096)  # characters to read before (re)tokenizing; doubles each round
    exhausted = False
    while len(ids) < n_tokens and not exhausted:
        got = 0
        while got < budget:
            doc = next(docs, None)
            if doc is None:
                exhausted = True
                break
            text = render(doc, tokenizer, state, opened)
            if text:
                used.append(text)
                got += len(text)
        if separator is None and used:
            sample = used[:200]
            separator = "" if all(t.endswith("\n") for t in sample) else "\n\n"
        ids = _encode(tokenizer, (separator or "").join(used)) if used else []
        budget *= 2
    if not ids or not any(t.strip() for t in used):
        raise UserError(f"the {opened.role} data {opened.source.path!r} holds no text (every document of "
                        f"{len(opened.files)} file(s) is empty)", f"config key `{opened.key}.source`",
                        "point it at files with text, or name the right `column:`")
    joined = (separator or "").join(used)
    ids = ids[:n_tokens]
    record = {"path": str(opened.source.path), "format": opened.format,
              "files": [str(p) for p in opened.files[:20]] + ([f"... {len(opened.files) - 20} more"]
                                                               if len(opened.files) > 20 else []),
              "n_files": len(opened.files), "column": opened.column, "split": _split_record(opened),
              "config": opened.source.config, "shuffle": opened.source.shuffle if opened.source.shuffle is not None
              else opened.role == "calibration", "seed": seed, "separator": separator, "documents": len(used),
              "text_chars": len(joined), "text_sha256": hashlib.sha256(joined.encode("utf-8")).hexdigest(),
              "tokens": len(ids), "tokens_sha256": token_hash(ids)}
    if "chat_template" in state:
        record["chat_template"] = state["chat_template"]
    return TextWindows(ids, record)


def _split_record(opened: OpenedSource) -> str | None:
    if len(opened.files) == 1 and Path(opened.source.path).is_file():
        return None
    return opened.source.split or DEFAULT_SPLIT[opened.role]


def token_hash(ids) -> str:
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()


def calibration_windows(source: DataSource, tokenizer, samples: int, seq_len: int, seed: int,
                        key: str = "calibration") -> TextWindows:
    """``samples`` windows of ``seq_len`` tokens (``as_rows(seq_len)``); UserError when the text is too short."""
    opened = open_source(source, "calibration", key)
    windows = take_tokens(opened, tokenizer, samples * seq_len, seed)
    if len(windows.ids) < samples * seq_len:
        raise UserError(f"the calibration data {source.path!r} gives {len(windows.ids)} tokens, fewer than "
                        f"samples x seq_len = {samples} x {seq_len} = {samples * seq_len}",
                        f"config key `{key}.source`", "give more text, or lower `calibration.samples` / "
                        "`calibration.seq_len`")
    windows.record.update(samples=samples, seq_len=seq_len)
    return windows


def quality_windows(source: DataSource, tokenizer, max_tokens: int, seq_len: int, seed: int,
                    key: str = "quality") -> TextWindows:
    """The first ``max_tokens`` tokens of the quality text (fewer when the text is shorter, as the default)."""
    windows = take_tokens(open_source(source, "quality", key), tokenizer, max_tokens, seed)
    windows.record.update(max_tokens=max_tokens, seq_len=seq_len)
    return windows


# --------------------------------------------------------------------------- overlap
def check_distinct_files(calibration: OpenedSource, quality: OpenedSource) -> None:
    """UserError when calibration and quality read the same file (whatever windows each takes from it)."""
    shared = sorted({p.resolve() for p in calibration.files} & {p.resolve() for p in quality.files})
    if shared:
        raise UserError(f"the calibration and quality (evaluation) data read the same file(s): "
                        f"{[str(p) for p in shared[:3]]}" + (f" and {len(shared) - 3} more" if len(shared) > 3 else ""),
                        "keys `calibration.source` and `quality.source`",
                        "calibrate on other data than you evaluate on (e.g. `split: train` for calibration and "
                        "`split: test` for quality)")


def check_no_overlap(calibration_rows, quality_ids, tokenizer=None, *, n: int = 32, where: str = "study config"):
    """UserError when a run of ``n`` tokens of the quality text also occurs in a calibration window.

    Hashed token n-grams (both sides use the model's tokenizer): a shared 32-token run means the
    two texts share a passage, e.g. the same file or split named twice.
    """
    quality_ids = [int(i) for i in quality_ids]
    rows = [[int(i) for i in row] for row in calibration_rows]
    n = max(4, min(n, len(quality_ids), *(len(r) for r in rows)))
    grams = {hash(tuple(quality_ids[i:i + n])) for i in range(len(quality_ids) - n + 1)}
    hits, example = 0, None
    total = 0
    for row in rows:
        for i in range(len(row) - n + 1):
            total += 1
            if hash(tuple(row[i:i + n])) in grams:
                hits += 1
                if example is None:
                    example = row[i:i + n]
    if hits:
        shown = ""
        if tokenizer is not None and example is not None:
            shown = f"; e.g. {tokenizer.decode(example)[:120]!r}"
        raise UserError(f"the calibration text overlaps the quality (evaluation) text: {hits} of {total} "
                        f"{n}-token runs of the calibration windows also occur in the quality text{shown}",
                        f"{where}: keys `calibration.source` and `quality.source`",
                        "calibrate on other data than you evaluate on (e.g. the train split for calibration and "
                        "the test split for quality)")
