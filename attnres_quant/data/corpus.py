"""Training corpus: the running interpreter's standard-library source mixed with proxy-task train items.

* Stdlib: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, excluding
  ``site-packages``, ``__pycache__`` and test directories (``test``, ``tests``,
  ``idle_test``), sorted by relative POSIX path.  A file is *held out* when
  ``sha256(relative_path) % HELDOUT_MODULUS == 0`` (about 5 % of files), so the split
  is by file and identical on every machine with the same Python version.
* Proxy tasks: ``proxy_tasks.generate(family, "train", n, seed)`` for every family,
  formatted with :func:`proxy_tasks.format_training_text` (test items never enter).

:func:`data_hash` is a sha256 over the exact documents used (relative paths, file
contents and proxy item texts), recorded in the training card.
"""

from __future__ import annotations

import hashlib
import pathlib
import random
import sysconfig
from dataclasses import dataclass, field

from . import proxy_tasks

HELDOUT_MODULUS = 20
_EXCLUDED_DIRS = {"site-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_split_of(relpath: str) -> str:
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:4], "big") % HELDOUT_MODULUS == 0 else "train"


def stdlib_files(split: str | None = None) -> list[tuple[str, pathlib.Path]]:
    """Sorted ``(relative_posix_path, path)`` of stdlib sources, optionally one split only."""
    root = stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS & set(rel.parts[:-1]):
            continue
        relpath = rel.as_posix()
        if split is None or stdlib_split_of(relpath) == split:
            out.append((relpath, path))
    out.sort(key=lambda t: t[0])
    return out


def stdlib_texts(split: str, max_files: int | None = None) -> list[tuple[str, str]]:
    """``(relative_path, text)`` for the files of ``split`` ('train' or 'heldout')."""
    out = []
    for relpath, path in stdlib_files(split)[:max_files]:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append((relpath, text))
    return out


def items_per_family(n_per_family: int | dict) -> dict[str, int]:
    """``{family: n}`` from one count for every family or a per-family mapping.

    A mapping weights the families of the training mix (e.g. more math items, which are
    short); a family missing from it gets no training items.
    """
    if isinstance(n_per_family, dict):
        unknown = sorted(set(n_per_family) - set(proxy_tasks.FAMILIES))
        if unknown:
            raise ValueError(f"unknown proxy families {unknown}; expected some of {proxy_tasks.FAMILIES}")
        return {f: int(n_per_family.get(f, 0)) for f in proxy_tasks.FAMILIES}
    return {f: int(n_per_family) for f in proxy_tasks.FAMILIES}


def proxy_train_texts(n_per_family: int | dict, seed: int = 0) -> list[str]:
    """Training texts of all proxy families, interleaved deterministically.

    ``n_per_family`` is one count for every family or a ``{family: count}`` mapping.
    """
    texts: list[str] = []
    for family, n in items_per_family(n_per_family).items():
        items = proxy_tasks.generate(family, "train", n, seed=seed)
        texts += [proxy_tasks.format_training_text(family, it) for it in items]
    random.Random(seed + 12345).shuffle(texts)
    return texts


@dataclass
class Corpus:
    stdlib_train: list[tuple[str, str]]
    stdlib_heldout: list[tuple[str, str]]
    proxy_train: list[str]
    sha256: str = field(default="")

    def summary(self) -> dict:
        return {
            "stdlib_root": str(stdlib_root()),
            "stdlib_train_files": len(self.stdlib_train),
            "stdlib_train_bytes": sum(len(t.encode()) for _, t in self.stdlib_train),
            "stdlib_heldout_files": len(self.stdlib_heldout),
            "stdlib_heldout_bytes": sum(len(t.encode()) for _, t in self.stdlib_heldout),
            "proxy_train_items": len(self.proxy_train),
            "proxy_train_bytes": sum(len(t.encode()) for t in self.proxy_train),
            "data_sha256": self.sha256,
        }


def data_hash(stdlib_train, stdlib_heldout, proxy_train) -> str:
    h = hashlib.sha256()
    for tag, docs in (("train", stdlib_train), ("heldout", stdlib_heldout)):
        for rel, text in docs:
            h.update(f"{tag}\0{rel}\0".encode())
            h.update(hashlib.sha256(text.encode("utf-8")).digest())
    for text in proxy_train:
        h.update(b"proxy\0")
        h.update(text.encode("utf-8"))
    return h.hexdigest()


def build_corpus(proxy_items_per_family: int | dict, seed: int = 0) -> Corpus:
    tr = stdlib_texts("train")
    ho = stdlib_texts("heldout")
    px = proxy_train_texts(proxy_items_per_family, seed=seed)
    return Corpus(tr, ho, px, data_hash(tr, ho, px))
