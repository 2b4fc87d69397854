"""Real-world schemas through the deployed engine: every schema of ../shared/corpus/schemas.jsonl
(JSONSchemaBench, SchemaStore, function-calling and Pydantic models) is sent once to the rendered
module's `generate` route on vLLM's CPU build.

- A schema is served (200) exactly when one of the pinned vLLM's own validators accepts it
  (xgrammar or guidance); otherwise it is a 400 carrying vLLM's reason. Never a 5xx.
- No output that finished with "stop" is invalid against its schema (jsonschema, formats checked),
  and `complete` is true exactly for those that finished and are valid.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
from collections import Counter

import httpx
import pytest

from tests.conftest import DEPLOYMENTS
from tests.support.corpus import CORPUS, valid
from tests.support.vllm_server import REQUIRE_ENV, require_vllm

pytestmark = pytest.mark.engine


def corpus() -> list[dict]:
    if not CORPUS.is_file():
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"the schema corpus is missing: {CORPUS}", pytrace=False)
        pytest.skip(f"the schema corpus is missing: {CORPUS}")
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


@functools.cache
def rendered():
    """deployments/qwen3-8b.toml's rendered module: what the server runs."""
    from liftdeploy.local.server import import_rendered
    from liftdeploy.manifest import load

    return import_rendered(load(DEPLOYMENTS / "qwen3-8b.toml"))


def accepted_by_vllm(schema: dict) -> bool:
    """The oracle: does either of vLLM's structured-output validators take this schema, as every
    route hands it to the engine (formats the backend does not know dropped, within the token budget)?"""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams
    from vllm.v1.structured_output.backend_guidance import validate_guidance_grammar
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    try:
        schema = rendered().served_schema(schema)
    except ValueError:  # a minimum no output within max_tokens_limit can reach
        return False
    for check, kwargs in ((validate_xgrammar_grammar, {}), (validate_guidance_grammar, {"tokenizer": None})):
        try:
            check(SamplingParams(max_tokens=1, structured_outputs=StructuredOutputsParams(json=schema)), **kwargs)
        except Exception:
            continue
        return True
    return False


@pytest.fixture(scope="module")
def rows():
    require_vllm()
    return corpus()


@pytest.fixture(scope="module")
def answers(rows, vllm_server):

    async def run():
        slots = asyncio.Semaphore(16)
        async with httpx.AsyncClient(headers=vllm_server.headers, timeout=600) as client:
            async def one(row):
                async with slots:
                    body = {"prompt": "Produce an example.", "schema": row["schema"], "max_tokens": 384,
                            "temperature": 0.8}
                    return row, await client.post(f"{vllm_server.route('generate')}/", json=body)
            return await asyncio.gather(*(one(row) for row in rows))

    return asyncio.run(run())


# Accepted by vLLM's XGrammar validator once its unknown format is dropped, but not servable by this
# deployment's backend (llguidance), even leniently: refused with llguidance's reason.
UNSERVABLE = {"schemastore-jasonette": "is unsatisfiable"}


def test_no_5xx_and_served_exactly_what_vllm_accepts(answers):
    statuses = Counter(reply.status_code for _, reply in answers)
    assert set(statuses) <= {200, 400}, statuses
    wrongly = [(row["id"], reply.status_code, reply.text[:200]) for row, reply in answers
               if (reply.status_code == 200) != (accepted_by_vllm(row["schema"]) and row["id"] not in UNSERVABLE)]
    assert not wrongly
    assert statuses[200] >= 200  # hundreds of constrained outputs, not a handful


def test_refusals_carry_vllms_reason(answers):
    for row, reply in answers:
        if reply.status_code == 400:
            assert reply.json()["detail"].startswith("schema cannot be used for constrained decoding: "), row["id"]
            assert UNSERVABLE.get(row["id"], "") in reply.json()["detail"], row["id"]


def test_no_output_that_stopped_is_invalid(answers):
    finished = [(row, reply.json()) for row, reply in answers if reply.status_code == 200]
    stopped = [(row, body) for row, body in finished if body["finish_reason"] == "stop"]
    invalid = []
    for row, body in stopped:
        try:
            value = json.loads(body["text"])
        except ValueError:
            invalid.append((row["id"], "not JSON", body["text"][:120]))
            continue
        if not valid(value, row["schema"]):
            invalid.append((row["id"], "breaks its schema", body["text"][:120]))
    assert not invalid
    assert len(stopped) >= 50  # the random model finishes many of them within max_tokens
    for row, body in finished:
        assert body["complete"] == (body["finish_reason"] == "stop"), (row["id"], body)
        if body["finish_reason"] == "invalid":  # every attempt finished, the last one is no value of the schema:
            # a keyword no backend enforces (oneOf's "exactly one", if/then), or a number JSON cannot carry
            # back (1e999); said so, never called complete, and no false alarm
            assert body["incomplete_reason"] and body["attempts"] >= 1, (row["id"], body)
            assert not representable(body["text"]) or not valid(json.loads(body["text"]), row["schema"]), row["id"]
    invalid_finishes = sum(body["finish_reason"] == "invalid" for _, body in finished)
    print(f"{len(stopped)} stopped, all valid; {invalid_finishes} finished invalid after every attempt")


def representable(text: str) -> bool:
    """Whether every number parses to a finite float (1e999 is valid JSON, but not a value to return)."""
    def finite(number: str) -> float:
        if not math.isfinite(float(number)):
            raise ValueError(number)
        return float(number)

    try:
        json.loads(text, parse_float=finite, parse_constant=finite)
    except ValueError:
        return False
    return True
