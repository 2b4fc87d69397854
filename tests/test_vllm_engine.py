"""The deployed engine, run for real: `liftdeploy serve --local --engine vllm` serves the rendered
module's own VLLMEngine and apps on vLLM's CPU build (the smoke model), and these tests drive it
over HTTP as a client would: the generate and openai routes, batching, warm-up, a client that goes
away, a max_tokens cut and refused schemas (an engine that dies: test_vllm_engine_death.py)."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.engine

SHORT = {"type": "string", "maxLength": 12}
DIGIT = {"type": "integer", "minimum": -9, "maximum": 9}
# Ordinary schemas, each of a kind users send: bounded strings, enums, patterns, formats,
# nullable/anyOf, nested objects and arrays, $ref/$defs.
SCHEMAS = {
    "bounded-strings": {"type": "object", "properties": {"name": SHORT, "code": {"type": "string", "minLength": 2,
                                                                                    "maxLength": 4}},
                        "required": ["name", "code"]},
    "enum": {"type": "object", "properties": {"level": {"enum": ["low", "medium", "high"]}, "ok": {"type": "boolean"}},
             "required": ["level", "ok"]},
    "pattern": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                "required": ["sku"]},
    "format": {"type": "object", "properties": {"day": {"type": "string", "format": "date"},
                                                "mail": {"type": "string", "format": "email"}},
               "required": ["day", "mail"]},
    "nullable": {"type": "object", "properties": {"note": {"anyOf": [SHORT, {"type": "null"}]},
                                                  "n": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
                 "required": ["note", "n"]},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"],
        "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"tags": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3}},
              "required": ["tags"]},
    "refs": {"$defs": {"point": {"type": "object", "properties": {"x": DIGIT, "y": DIGIT},
                                 "required": ["x", "y"], "additionalProperties": False}},
             "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
             "required": ["a", "b"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def server(vllm_server):
    return vllm_server


def generate(server, schema, **options):
    return server.post("generate", {"prompt": "Fill in the fields.", "schema": schema, **options})


def test_warmup_and_health_report_the_real_engine(server):
    warm = server.get("warmup").json()
    assert warm["status"] == "warm" and warm["model_loaded"] is True
    assert warm["model"] == "smoke:qwen3" and warm["smoke_model"] is True
    assert warm["load_seconds"] > 0 and warm["requests_running"] == 0
    health = httpx.get(f"{server.route('health')}/", timeout=30).json()  # public in this manifest
    assert health["backend"] == "vLLM 0.32.0 with guidance"
    assert "vllm 0.32.0" in server.log_text().lower() or "v0.32.0" in server.log_text()


def test_auth_is_enforced(server):
    reply = httpx.post(f"{server.route('generate')}/", json={"prompt": "x", "schema": {"type": "object"}}, timeout=30)
    assert reply.status_code == 401


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_finished_output_is_valid(server, name):
    schema = SCHEMAS[name]
    for temperature in (0.0, 0.7, 1.0):
        reply = generate(server, schema, max_tokens=256, temperature=temperature)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["finish_reason"] in ("stop", "length")
        if body["finish_reason"] == "stop":
            value = json.loads(body["text"])  # the engine's own text, not only the app's verdict
            jsonschema.validate(value, schema)
            assert body["complete"] is True and body["ir_json"] == value
        else:
            assert body["complete"] is False and body["ir_json"] is None
            assert "max_tokens" in body["incomplete_reason"]


def test_default_output_is_laid_out_with_no_free_whitespace(server):
    """qwen3-8b's default whitespace is `spaced` (guidance): json.dumps's layout, nothing else."""
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "b": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
              "required": ["a", "b"], "additionalProperties": False}
    body = generate(server, schema, max_tokens=64, temperature=1.0).json()
    assert body["finish_reason"] == "stop", body
    assert body["text"] == json.dumps(json.loads(body["text"]))


def test_max_tokens_cut_is_never_presented_as_valid(server):
    body = generate(server, SCHEMAS["nested"], max_tokens=3).json()
    assert body["finish_reason"] == "length" and body["tokens_used"] == 3
    assert body["complete"] is False and body["ir_json"] is None
    assert body["incomplete_reason"] == "cut by max_tokens (3) before the JSON was finished"


@pytest.mark.parametrize(("schema", "fragment"), [
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
    # the reason is on llguidance's second line: kept whole
    ({"type": "object", "properties": {"b": {"type": "string", "pattern": "(?=x)abc"}}}, "look-around"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "invalid JSON Schema"),
], ids=["uniqueItems", "look-around", "not-a-schema"])
def test_a_schema_the_engine_refuses_is_a_400_with_its_reason(server, schema, fragment):
    reply = generate(server, schema, max_tokens=16)
    assert reply.status_code == 400, reply.text
    assert fragment in reply.json()["detail"]


def test_a_schema_only_xgrammar_accepts_is_still_served(server):
    # llguidance refuses a oneOf whose branches overlap in type (it cannot prove "exactly one"); vLLM's
    # xgrammar validator accepts it: one of the pinned vLLM's backends does. The ranges keep it exclusive.
    schema = {"type": "object", "properties": {"v": {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                               {"type": "number", "minimum": 100, "maximum": 200}]}},
              "required": ["v"], "additionalProperties": False}
    body = generate(server, schema, max_tokens=64, temperature=1.0).json()
    assert body["finish_reason"] == "stop", body
    jsonschema.validate(json.loads(body["text"]), schema)


def test_concurrent_requests_are_batched_by_the_engine(server):
    # exactly 400 digits: hundreds of tokens each, seconds of batched decoding on this CPU, so every
    # request is in the engine while the others are, and the poller sees them even on a busy machine
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 400,
              "maxItems": 400}
    peak = 0
    done = threading.Event()

    seen: list = []

    def watch():
        nonlocal peak
        while not done.is_set():
            try:
                answer = server.get("warmup", timeout=30)
                peak = max(peak, answer.json()["requests_running"])
            except Exception as exc:  # said in the assertion below, not lost with the thread
                seen.append(repr(exc))
            time.sleep(0.02)

    async def burst():
        async with httpx.AsyncClient(headers=server.headers, timeout=300) as client:
            body = {"prompt": "Count.", "schema": schema, "max_tokens": 1000, "temperature": 1.0}
            return await asyncio.gather(*(client.post(f"{server.route('generate')}/", json=body) for _ in range(8)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        replies = asyncio.run(burst())
    finally:
        done.set()
        watcher.join()
    assert [r.status_code for r in replies] == [200] * 8
    assert peak == 8, seen[:3]  # all eight were in vLLM's scheduler at once, not one after another


def test_openai_route_with_the_official_sdk(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.route('openai')}/v1", api_key=server.headers["Authorization"].split()[1])
    schema = SCHEMAS["enum"]
    reply = client.chat.completions.create(
        model="Qwen/Qwen3-8B", messages=[{"role": "user", "content": "Rate it."}], max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "rating", "schema": schema}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_a_client_that_disconnects_is_aborted_in_the_engine(server):
    # at least 8000 tokens (4000 digits and their commas): minutes of decoding on a CPU
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 4000}
    body = json.dumps({"prompt": "Count.", "schema": schema, "max_tokens": 8192, "temperature": 1.0})
    url = httpx.URL(server.route("generate"))
    client = http.client.HTTPConnection(url.host, url.port, timeout=30)
    client.request("POST", f"{url.path}/", body=body, headers={**server.headers, "Content-Type": "application/json"})

    def running() -> int:
        return server.get("warmup").json()["requests_running"]

    # the client hangs up only once its request is generating in the engine (the pre-check and the
    # grammar compile come first, and take a while on a slow machine)
    deadline = time.monotonic() + 120
    while running() == 0:
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.1)
    client.close()
    deadline = time.monotonic() + 30  # the 8000 tokens would take minutes; the abort takes a moment
    while running() != 0:
        assert time.monotonic() < deadline, "the engine kept generating for a client that had gone"
        time.sleep(0.1)
