"""Grading a deployment's answers against labelled examples (`liftdeploy eval`).

A task file is JSON Lines, one task per line:

    {"id": "person-age-01", "prompt": "...", "schema": {...}, "expected": {...}, "tags": ["extraction"]}

`tags` is optional; `expected` must be valid against `schema`. Each answer is graded three ways:

- **valid**: it is JSON and matches the schema (jsonschema, formats checked: the runtime's own check).
- **exact**: it equals `expected` as JSON: strings verbatim, numbers by value (`1 == 1.0`), `true` is
  not `1`, objects with the same keys, arrays with the same length and order.
- **fields**: `expected` flattened to its leaves (`user.name`, `tags[0]`, plus `len(tags)` for every
  array); a leaf is right when the answer holds an equal value at that path. Strings compare
  normalised (`normalise`), numbers by value, booleans and null exactly; a missing path is wrong.
  Keys the answer adds beyond `expected` are not counted here (`exact` and `valid` see them).

Only the standard library and jsonschema are imported.
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LiftdeployError, printable

KEYS = ("id", "prompt", "schema", "expected", "tags")
NO_JSON: Any = object()  # an answer that held no JSON at all; also a path the answer lacks
REQUIRED = KEYS[:4]
TRAILING_PUNCTUATION = ".,;:!?"


class TaskFileError(LiftdeployError):
    """A task file that cannot be read: the file and line, what is wrong, how to fix it (exit 2)."""

    exit_code = 2

    def __init__(self, where: str, message: str, hint: str):
        super().__init__(printable(f"{where}: {message}"), hint)


@dataclass(frozen=True)
class Task:
    id: str
    prompt: str
    schema: dict[str, Any]
    expected: Any
    tags: tuple[str, ...] = ()
    line: int = 0


def schema_problem(output: Any, schema: dict[str, Any]) -> str | None:
    """Where `output` breaks `schema` (jsonschema with format checking), or None when it is valid.
    The same check as the rendered runtime's `schema_problem` (templates/_runtime.py.j2)."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)
    errors = validator(schema, format_checker=validator.FORMAT_CHECKER).iter_errors(output)
    error = jsonschema.exceptions.best_match(errors)
    if error is None:
        return None
    return f"does not match the schema at {error.json_path}: {error.message[:300]}"


def load_tasks(path: Path) -> list[Task]:
    """Every task of a JSON Lines file; TaskFileError naming file:line at the first bad line."""
    import jsonschema
    from referencing.exceptions import Unresolvable  # jsonschema's own dependency

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskFileError(str(path), "no such task file",
                            "pass one with --tasks FILE (JSON Lines: id, prompt, schema, expected)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskFileError(str(path), f"cannot read the task file: {exc}", "pass a UTF-8 JSON Lines file") from None
    tasks: list[Task] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise TaskFileError(where, f"not JSON: {exc}", "each line is one JSON object, "
                                '{"id": ..., "prompt": ..., "schema": {...}, "expected": ...}') from None
        if not isinstance(row, dict):
            raise TaskFileError(where, f"a JSON {type(row).__name__}, not an object", "each line is one JSON object")
        for key in row:
            if key not in KEYS:
                close = difflib.get_close_matches(key, KEYS, n=1)
                raise TaskFileError(where, f"unknown key `{key}`",
                                    f"did you mean `{close[0]}`?" if close else f"the keys are {', '.join(KEYS)}")
        missing = [key for key in REQUIRED if key not in row]
        if missing:
            raise TaskFileError(where, f"missing `{missing[0]}`", f"every task has {', '.join(REQUIRED)}")
        task_id, prompt, schema, tags = row["id"], row["prompt"], row["schema"], row.get("tags", [])
        if not isinstance(task_id, str) or not task_id:
            raise TaskFileError(where, "`id` is not a non-empty string", 'e.g. "id": "person-age-01"')
        if task_id in seen:
            raise TaskFileError(where, f"`id` `{task_id}` is used again (first on line {seen[task_id]})",
                                "give every task its own id")
        if not isinstance(prompt, str) or not prompt.strip():
            raise TaskFileError(where, f"task `{task_id}`: `prompt` is not a non-empty string", "write the prompt")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise TaskFileError(where, f"task `{task_id}`: `tags` is not a list of strings", 'e.g. "tags": ["dates"]')
        if not isinstance(schema, dict):
            raise TaskFileError(where, f"task `{task_id}`: `schema` is not an object", "give a JSON Schema object")
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise TaskFileError(where, f"task `{task_id}`: `schema` is not a valid JSON Schema: {exc.message[:200]}",
                                "fix the schema (check it with jsonschema's check_schema)") from None
        try:
            problem = schema_problem(row["expected"], schema)
        except Unresolvable as exc:  # a `$ref` jsonschema cannot follow
            raise TaskFileError(where, f"task `{task_id}`: `schema` has a `$ref` that does not resolve: {exc}",
                                "point each `$ref` at a definition inside the schema (`#/$defs/...`)") from None
        if problem:
            raise TaskFileError(where, f"task `{task_id}`: `expected` {problem}",
                                "the expected answer must itself be valid against the task's schema")
        seen[task_id] = number
        tasks.append(Task(task_id, prompt, schema, row["expected"], tuple(tags), number))
    if not tasks:
        raise TaskFileError(str(path), "no tasks in the file", "add one JSON object per line")
    return tasks


# ## Comparing values


def normalise(text: str) -> str:
    """How strings compare for field accuracy: Unicode NFKC, casefolded, runs of whitespace made one
    space, ends stripped, then trailing `.,;:!?` removed (`" Alice  Smith. "` → `"alice smith"`)."""
    folded = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return folded.rstrip(TRAILING_PUNCTUATION).rstrip()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def same(expected: Any, got: Any, *, loose_strings: bool = False) -> bool:
    """JSON equality: numbers by value (`1 == 1.0`, `"1" != 1`), booleans are not numbers, strings
    verbatim (or `normalise`d with `loose_strings`), containers element by element."""
    if _number(expected):
        return _number(got) and expected == got
    if isinstance(expected, str):
        if not isinstance(got, str):
            return False
        return normalise(expected) == normalise(got) if loose_strings else expected == got
    if isinstance(expected, dict):
        return (isinstance(got, dict) and expected.keys() == got.keys()
                and all(same(v, got[k], loose_strings=loose_strings) for k, v in expected.items()))
    if isinstance(expected, list):
        return (isinstance(got, list) and len(expected) == len(got)
                and all(same(e, g, loose_strings=loose_strings) for e, g in zip(expected, got, strict=True)))
    return type(expected) is type(got) and expected == got  # bool and None


_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


def _child(path: str, key: str) -> str:
    part = key if _SIMPLE_KEY.match(key) else json.dumps(key)
    return f"{path}.{part}" if path else part


def leaves(expected: Any, got: Any, path: str = "") -> Iterator[tuple[str, bool]]:
    """(path, right) for every leaf of `expected`: scalars, empty objects and arrays, and each
    array's length (`len(path)`). Under a missing or mistyped container, every leaf is wrong."""
    if isinstance(expected, dict) and expected:
        here = got if isinstance(got, dict) else {}
        for key, value in expected.items():
            yield from leaves(value, here.get(key, NO_JSON), _child(path, key))
    elif isinstance(expected, list) and expected:
        here_list = got if isinstance(got, list) else None
        yield f"len({path or '$'})", here_list is not None and len(here_list) == len(expected)
        for i, value in enumerate(expected):
            item = here_list[i] if here_list is not None and i < len(here_list) else NO_JSON
            yield from leaves(value, item, f"{path}[{i}]")
    else:
        yield path or "$", got is not NO_JSON and same(expected, got, loose_strings=True)


# ## Grading answers


@dataclass
class Grade:
    """One answer graded against its task."""

    valid: bool
    exact: bool
    fields_right: int
    fields_total: int
    problem: str | None = None  # why it is not valid: not JSON, or where it breaks the schema
    wrong: list[str] = field(default_factory=list)  # the paths of the fields it got wrong


def grade(task: Task, answer: Any) -> Grade:
    """Grade a parsed answer (`NO_JSON` when there was none to parse)."""
    fields = list(leaves(task.expected, answer))
    wrong = [path for path, right in fields if not right]
    if answer is NO_JSON:
        return Grade(False, False, 0, len(fields), "not JSON", wrong)
    problem = schema_problem(answer, task.schema)
    return Grade(problem is None, same(task.expected, answer), len(fields) - len(wrong), len(fields), problem, wrong)


def first_json(text: str) -> Any:
    """The first JSON object or array in free text (after prose, inside a code fence); NO_JSON if none."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        return value
    return NO_JSON


def parse_strict(text: str) -> Any:
    """The answer when the whole text is one JSON value (surrounding whitespace allowed); else NO_JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return NO_JSON
