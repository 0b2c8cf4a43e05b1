"""Bounded YAML reading for every config reader (study configs, training configs, ``--set`` values).

``yaml.safe_load`` never runs code, but it happily expands aliases: a config under 1 KB with nested
anchors ("billion laughs") expands to gigabytes and hangs the run.  Here the document is *composed*
first (aliases stay shared nodes, nothing is expanded), its expanded size is counted with
memoisation, and only a document within the bounds is constructed.  Recursive aliases, binary
files, oversized files and too-deep nesting are refused the same way: a :class:`UserError` naming
the file, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

MAX_FILE_BYTES = 4 * 1024 * 1024    # a study config is a few KB
MAX_EXPANDED_NODES = 100_000          # scalars + collections after alias expansion
MAX_ALIASES = 1_000


def _expanded_size(root: yaml.Node, where: str) -> tuple[int, int]:
    """(nodes after alias expansion, alias uses); raises UserError on a recursive alias."""
    sizes: dict[int, int] = {}
    seen: set[int] = set()
    aliases = 0
    # Iterative post-order walk: deep nesting must not hit Python's recursion limit here.
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            total = 1 + sum(sizes[id(c)] for c in children)
            sizes[key] = total
            if total > MAX_EXPANDED_NODES:
                _too_big(where, f"more than {MAX_EXPANDED_NODES:,} values once its aliases are expanded")
            continue
        if key in sizes:
            aliases += 1
            if aliases > MAX_ALIASES:
                _too_big(where, f"more than {MAX_ALIASES:,} alias uses (*name)")
            continue
        if key in on_path:
            raise UserError("the YAML refers to itself (a recursive alias)", where,
                            "remove the alias that points back into its own anchor")
        if key in seen:  # shared node still being sized on another branch: counted when done
            aliases += 1
        seen.add(key)
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise UserError("the YAML refers to itself (a recursive alias)", where,
                                "remove the alias that points back into its own anchor")
            stack.append((child, False))
    return sizes[id(root)], aliases


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _too_big(where: str, what: str) -> None:
    raise UserError(f"the YAML is too large: {what}", where,
                    "write the config out plainly; a study config needs no more than a few hundred values")


def loads(text: str, where: str) -> Any:
    """Parse one YAML document within the bounds; ``UserError`` naming ``where`` otherwise."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}, line {mark.line + 1}" if mark is not None else where
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"not valid YAML ({problem})", at,
                        "fix the YAML syntax (indentation, colons, quotes, brackets)") from None
    except RecursionError:
        raise UserError("the YAML is nested too deeply", where, "flatten the config") from None
    finally:
        loader.dispose()


def read_file(path: str | Path, what: str = "config") -> Any:
    """Read and parse a YAML file: size-bounded, UTF-8, alias-bounded."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UserError(f"the {what} file is {size:,} bytes, more than the {MAX_FILE_BYTES:,} a config may be",
                            str(path), f"pass a YAML {what} file")
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"the {what} file could not be read ({exc.strerror or exc})", str(path),
                        "check the path and its permissions") from None
    if b"\x00" in data:
        raise UserError(f"the {what} file is binary, not YAML text", str(path), f"pass a YAML {what} file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"the {what} file is not UTF-8 text (byte {exc.start})", str(path),
                        f"pass a YAML {what} file saved as UTF-8")
    return loads(text, str(path))
