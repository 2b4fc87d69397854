"""Find the line of a key path in TOML text, so errors can say `file:line`.

tomllib keeps no positions, so this scans the text: table headers, array-of-table
headers, `key = value` lines and the keys of one-line inline tables. Good enough for
pointing at a mistake; it never decides validity.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")
_INLINE_KEY = re.compile(r"""[{,]\s*([A-Za-z0-9_-]+|"[^"]*")\s*=""")


def _split(dotted: str) -> tuple[str, ...]:
    parts = re.findall(r'"[^"]*"|\'[^\']*\'|[^.\s]+', dotted)
    return tuple(p.strip("\"'") for p in parts)


@lru_cache(maxsize=32)
def _index(text: str) -> dict[tuple[Any, ...], int]:
    lines: dict[tuple[Any, ...], int] = {}
    arrays: dict[tuple[Any, ...], int] = {}
    table: tuple[Any, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header and not _KEY.match(line):
            path: tuple[Any, ...] = _split(header.group(2))
            if header.group(1) == "[[":
                arrays[path] = arrays.get(path, -1) + 1
                lines.setdefault(path, number)
                path = (*path, arrays[path])
            table = path
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            path = (*table, *_split(key.group(1)))
            lines.setdefault(path, number)
            rest = line[key.end():]
            if rest.lstrip().startswith("{"):
                for inner in _INLINE_KEY.finditer(rest):
                    lines.setdefault((*path, inner.group(1).strip('"')), number)
    return lines


def locate(text: str, loc: list[Any] | tuple[Any, ...], env: str | None = None) -> int | None:
    """The line of the longest prefix of `loc` found in `text` (under `[env.<env>]` if given)."""
    index = _index(text)
    prefix = ("env", env) if env else ()
    loc = tuple(loc)
    for end in range(len(loc), 0, -1):
        line = index.get((*prefix, *loc[:end]))
        if line is not None:
            return line
    return None
