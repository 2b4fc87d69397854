"""The labelled task set that `liftdeploy eval` grades a deployment on (liftdeploy/data/eval_tasks.jsonl).

Offline and model-free: it checks that every task is gradable — a valid, closed schema, one expected answer
that validates against it (with format checking), and strings to extract that appear verbatim in the prompt —
and that the set covers each category it promises."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest
from jsonschema import Draft202012Validator

FORMATS = Draft202012Validator.FORMAT_CHECKER

# The categories the set promises (the first tag and the id's prefix), with the fewest tasks each may have.
COVERAGE = {
    "people": 20,
    "organisations": 15,
    "dates": 15,
    "money": 15,
    "addresses": 12,
    "enums": 20,
    "booleans": 15,
    "nullable": 12,
    "bounded": 10,
    "arrays": 12,
    "nested": 10,
    "tool-call": 12,
    "arithmetic": 8,
    "long-text": 6,
}
LEVELS = {"direct", "step", "hard"}


def load_tasks() -> list[dict[str, Any]]:
    text = resources.files("liftdeploy").joinpath("data", "eval_tasks.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


TASKS = load_tasks()


def by_id(params: list[dict[str, Any]]) -> list[Any]:
    return [pytest.param(t, id=t["id"]) for t in params]


def object_schemas(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object schema in ``schema``: itself, its properties' and its arrays' items, recursively."""
    found = [schema] if schema.get("type") == "object" else []
    for sub in schema.get("properties", {}).values():
        found += object_schemas(sub)
    if isinstance(schema.get("items"), dict):
        found += object_schemas(schema["items"])
    return found


def free_strings(value: Any, schema: dict[str, Any]) -> list[str]:
    """The strings in ``value`` copied from the text: those whose schema has no enum, format or pattern."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in free_strings(v, schema["properties"][k])]
    if isinstance(value, list):
        return [s for v in value for s in free_strings(v, schema["items"])]
    if isinstance(value, str) and not {"enum", "format", "pattern"} & schema.keys():
        return [value]
    return []


def test_set_size_and_unique_ids() -> None:
    ids = [t["id"] for t in TASKS]
    assert len(ids) >= 150
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)


def test_coverage() -> None:
    counts = {cat: sum(t["tags"][0] == cat for t in TASKS) for cat in COVERAGE}
    short = {cat: (counts[cat], least) for cat, least in COVERAGE.items() if counts[cat] < least}
    assert not short, f"categories below their count (have, want): {short}"


def test_format_checking_is_on() -> None:
    """`date` and `email` are only checked when jsonschema is given a format checker: make sure it bites."""
    date = Draft202012Validator({"type": "string", "format": "date"}, format_checker=FORMATS)
    email = Draft202012Validator({"type": "string", "format": "email"}, format_checker=FORMATS)
    assert not date.is_valid("2025-02-30") and not date.is_valid("14 March 2025")
    assert not email.is_valid("lena.varga at northfieldlabs.org")


@pytest.mark.parametrize("task", by_id(TASKS))
def test_task_is_gradable(task: dict[str, Any]) -> None:
    assert set(task) in ({"id", "prompt", "schema", "expected"}, {"id", "prompt", "schema", "expected", "tags"})
    category, level = task["tags"][0], task["tags"][1]
    assert category in COVERAGE and task["id"].startswith(f"{category}-") and level in LEVELS
    schema, expected = task["schema"], task["expected"]

    Draft202012Validator.check_schema(schema)
    Draft202012Validator(schema, format_checker=FORMATS).validate(expected)

    assert schema["type"] == "object"
    for sub in object_schemas(schema):
        assert sub["additionalProperties"] is False, sub
        assert set(sub["required"]) <= set(sub["properties"]), sub
    # Every answered field is required: an optional property is only ever one the text lacks.
    assert set(expected) <= set(schema["required"])

    for s in free_strings(expected, schema):
        assert s in task["prompt"], f"{s!r} is not copied verbatim from the prompt"


@pytest.mark.parametrize("task", by_id([t for t in TASKS if t["tags"][0] == "long-text"]))
def test_long_texts_are_long(task: dict[str, Any]) -> None:
    assert len(task["prompt"].split()) >= 150
    assert 3 <= len(task["expected"]) <= 6
