"""The schema corpus (../shared/corpus/schemas.jsonl: JSONSchemaBench, SchemaStore, function-calling
and Pydantic models) and the one validity check its outputs are judged by."""

from __future__ import annotations

import os
from pathlib import Path

import jsonschema

# beside the checkout, or wherever LIFTDEPLOY_CORPUS says (a worktree elsewhere)
CORPUS = Path(os.environ.get("LIFTDEPLOY_CORPUS") or
              Path(__file__).resolve().parents[3] / "shared" / "corpus" / "schemas.jsonl")


def valid(value, schema: dict) -> bool:
    """Whether `value` is an instance of `schema`, formats checked (as the deployed module checks)."""
    validator = jsonschema.validators.validator_for(schema)
    return not any(validator(schema, format_checker=validator.FORMAT_CHECKER).iter_errors(value))
