"""Schemas that are valid JSON but nasty for a grammar compiler, sent to a live local server.

Each one must be refused with a 4xx that says why, or compile within
`decoding.schema_compile_timeout` and be answered; never a 5xx, never a hung request, and the
next ordinary request must still be answered promptly. The server is the qwen3-8b deployment
(`serve --local`, CPU engine: real XGrammar compiles, real decoding of the smoke model) with
`max_tokens` capped at 16 so that a schema which does compile costs little to decode.

"Never hang a worker" cannot mean that a compile is stopped: XGrammar compiles in C++ on a
thread that Python cannot kill. What it means, and what the last tests check, is that the
request which overran is answered when the timeout expires, the event loop keeps answering,
and overrunning compiles cannot make any other request wait: while every compile thread is
busy a new schema gets an immediate 503 with Retry-After, and generation is unaffected.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import pytest

from liftdeploy.local.engine import LocalEngine
from liftdeploy.local.server import Credentials, LocalServer, build
from liftdeploy.manifest import load
from tests.conftest import DEPLOYMENTS

# Where the local server answers each endpoint: /<label>, the label `<app name>-<kind>` by default.
GENERATE_Q3 = "/qwen3-structured-generate"
HEALTH_Q3 = "/qwen3-structured-health"
OPENAI_Q3 = "/qwen3-structured-openai"

TOKEN = "patho-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
COMPILE_TIMEOUT = 10.0  # the manifest default: decoding.schema_compile_timeout
MAX_DEPTH = 32  # decoding.max_schema_depth
MAX_SCHEMA_BYTES = 65_536  # decoding.max_schema_bytes
PROMPT = 30.0  # seconds an ordinary request may take after a pathological one
OK_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}


def manifest(folder: Path, **decoding: object) -> Path:
    """deployments/qwen3-8b.toml, 16 max_tokens by default, plus `decoding` overrides. (The limit
    stays high enough for the slow schemas' minItems: a minimum beyond it is refused before compiling.)"""
    values = {"max_tokens": 16, "max_tokens_limit": 4096, **decoding}
    table = "[decoding]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()) + "\n"
    text = (DEPLOYMENTS / "qwen3-8b.toml").read_text()
    path = folder / "qwen3-8b.toml"
    path.write_text(text.replace("[[endpoints]]", table + "[[endpoints]]", 1))
    return path


@pytest.fixture(scope="module")
def engine():
    engine = LocalEngine(None, max_model_len=2048)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    with LocalServer(build(load(manifest(tmp_path_factory.mktemp("patho"))), engine,
                           Credentials(token=TOKEN))) as srv:
        yield srv


# ## The schemas


def nested_objects(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def nested_arrays(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema, "minItems": 1, "maxItems": 1}
    return schema


def near_max_bytes() -> dict:
    """An object of required properties, just under max_schema_bytes once serialised."""
    properties, size = {}, 60
    while size < MAX_SCHEMA_BYTES - 200:
        name = f"p{len(properties):05d}"
        properties[name] = {"type": "integer", "minimum": 0, "maximum": 9}
        size = len(json.dumps({"type": "object", "properties": properties, "required": list(properties)}))
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    assert MAX_SCHEMA_BYTES - 300 < len(json.dumps(schema)) <= MAX_SCHEMA_BYTES
    return schema


LINKED_LIST = {
    "$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
        "required": ["value", "next"], "additionalProperties": False}},
    "$ref": "#/$defs/node",
}
TREE = {
    "$defs": {"tree": {"type": "object", "properties": {
        "label": {"type": "string", "maxLength": 4},
        "children": {"type": "array", "items": {"$ref": "#/$defs/tree"}, "maxItems": 2}},
        "required": ["label", "children"], "additionalProperties": False}},
    "$ref": "#/$defs/tree",
}

# name -> (schema or its JSON text, what may come back): "4xx" refused with a message; "200" compiled (well
# within the timeout) and answered; "either" both are acceptable, e.g. a big schema compiles but the prompt
# that states it is longer than the smoke model's context (a 400 from the engine); "unenforced" XGrammar
# accepts the schema but ignores a keyword of it (`not`), so the output need not match.
CASES: dict[str, tuple[dict | str, str]] = {
    # nesting: within the limit, at it, beyond it, and far beyond (up to what the body parser takes)
    "objects-depth-15": (nested_objects(15), "200"),  # 31 levels of containers: within 32
    "arrays-depth-31": (nested_arrays(31), "200"),
    "objects-depth-16": (nested_objects(16), "4xx"),  # 33 levels
    "arrays-depth-500": (nested_arrays(500), "4xx"),
    "objects-depth-300": (nested_objects(300), "4xx"),  # 600 levels: was a RecursionError 500
    # as JSON text: deeper than this process's own json.dumps can go (the server parses ~980 levels)
    "objects-depth-480": ('{"type": "object", "properties": {"a": ' * 480 + "{}" + "}}" * 480, "4xx"),
    "arrays-depth-970": ('{"x": ' + "[" * 970 + "]" * 970 + "}", "4xx"),
    # huge enums
    "enum-10k-integers": ({"enum": list(range(10_000))}, "either"),
    "enum-10k-strings": ({"type": "string", "enum": [f"v{i}" for i in range(10_000)]}, "4xx"),  # > 64 KiB
    "enum-5k-strings": ({"type": "string", "enum": [f"v{i}" for i in range(5_000)]}, "either"),
    "enum-empty": ({"enum": []}, "4xx"),
    # recursion through $ref
    "linked-list": (LINKED_LIST, "200"),
    "tree": (TREE, "200"),
    "ref-to-root": ({"$ref": "#"}, "4xx"),  # admits no value: was a 503
    "required-self": ({"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}, "either"),
    "mutual-refs": ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "4xx"),
    "dead-end-ref": ({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "required": ["a"],
                      "$defs": {"x": {"$ref": "#/$defs/x"}}}, "4xx"),  # a dead end after '{"a":': was a 503
    "ref-chain-1500": ({"$defs": {**{f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(1500)},
                                  "d1500": {"type": "integer"}}, "$ref": "#/$defs/d0"}, "either"),
    "ref-missing": ({"$ref": "#/$defs/nowhere"}, "4xx"),
    # huge anyOf
    "anyOf-700-objects": ({"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}},
                                       "required": [f"k{i}"]} for i in range(700)]}, "either"),
    "anyOf-nested-1000-patterns": ({"anyOf": [{"anyOf": [{"anyOf": [
        {"type": "string", "pattern": f"^x{i}{j}{k}$"} for k in range(10)]} for j in range(10)]} for i in range(10)]},
        "either"),
    "allOf-contradiction": ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "either"),
    "not-everything": ({"not": {}}, "4xx"),  # llguidance, lenient, reads it as `false`: no value
    # regexes that are catastrophic for a backtracking matcher, or huge once expanded
    "regex-nested-plus": ({"type": "string", "pattern": "^(a+)+$", "maxLength": 8}, "200"),
    "regex-alternation-star": ({"type": "string", "pattern": "^(a|a)*b$"}, "200"),
    "regex-dot-star-30": ({"type": "string", "pattern": "^(.*a){30}$"}, "200"),
    "regex-a-100000": ({"type": "string", "pattern": "^a{100000}$"}, "200"),
    # llguidance (the default backend) ends it: its matcher rejects a token its own mask allowed;
    # vLLM then ends the request with an error, a 400 here
    "regex-nested-repeat-1e6": ({"type": "string", "pattern": "^((a{100}){100}){100}$"}, "either"),
    "regex-range-1e6": ({"type": "string", "pattern": "^[a-z]{1,1000000}$"}, "200"),
    "regex-backreference": ({"type": "string", "pattern": "^(a)\\1$"}, "4xx"),
    "regex-invalid": ({"type": "string", "pattern": "(("}, "4xx"),
    "patternProperties-evil": ({"type": "object", "patternProperties": {"^(a+)+$": {"type": "integer"}}}, "200"),
    # sizes no output can reach within max_tokens_limit: refused before any backend builds them out
    # (llguidance runs out of memory on minItems 1e9); maxima beyond it are capped
    "minItems-100000": ({"type": "array", "items": {"type": "integer"}, "minItems": 100_000}, "4xx"),
    "minItems-1e9-no-items": ({"type": "array", "minItems": 10**9}, "4xx"),
    "maxItems-1e9": ({"type": "array", "items": {"type": "integer"}, "minItems": 10**6, "maxItems": 10**9}, "4xx"),
    "maxItems-1e9-only": ({"type": "array", "items": {"type": "integer"}, "maxItems": 10**9}, "200"),
    "minLength-1e9-untyped": ({"minLength": 10**9}, "4xx"),
    "string-minLength-1e9": ({"type": "string", "minLength": 10**9}, "4xx"),
    "string-maxLength-1e9": ({"type": "string", "maxLength": 10**9}, "200"),
    "minProperties-1e9": ({"type": "object", "minProperties": 10**9}, "4xx"),
    "prefixItems-1500": ({"type": "array", "prefixItems": [{"type": "integer"}] * 1500, "minItems": 1500}, "either"),
    "integer-range-1e30": ({"type": "integer", "minimum": -10**30, "maximum": 10**30}, "4xx"),
    "near-max-bytes": (near_max_bytes(), "either"),
    "over-max-bytes": ({"enum": ["x" * 70_000]}, "4xx"),
}


def ordinary_generate(url: str) -> httpx.Response:
    return httpx.post(f"{url}{GENERATE_Q3}", headers=AUTH, timeout=PROMPT,
                      json={"prompt": "ok?", "schema": OK_SCHEMA, "temperature": 0})


@pytest.mark.parametrize("name", list(CASES))
def test_pathological_schema_is_answered_and_the_server_stays_up(server, name):
    schema, expected = CASES[name]
    text = schema if isinstance(schema, str) else json.dumps(schema)
    started = time.monotonic()
    response = httpx.post(f"{server.url}{GENERATE_Q3}", timeout=COMPILE_TIMEOUT + 50,
                          headers={**AUTH, "content-type": "application/json"},
                          content='{"prompt": "x", "temperature": 0, "schema": ' + text + "}")
    seconds = time.monotonic() - started
    assert response.status_code < 500, response.text[:500]
    assert seconds < COMPILE_TIMEOUT + 20, seconds  # the compile bound, plus 16 tokens of decoding
    assert "did not compile within" not in response.text  # none of these needs the full timeout here
    if response.status_code >= 400:
        assert expected in ("4xx", "either"), response.text[:500]
        assert response.status_code in (400, 413, 422), response.text[:500]
        # a 422 echoes its input, which may be too deep for this process's own json.loads
        assert '{"detail":' in response.text[:20] and ('"msg":"' in response.text or response.status_code != 422)
    else:
        assert expected in ("200", "either", "unenforced"), response.text[:500]
        body = response.json()
        if body["complete"] and expected != "unenforced":  # complete within 16 tokens: it matches
            jsonschema.validate(body["ir_json"], schema)

    started = time.monotonic()
    after = ordinary_generate(server.url)
    assert after.status_code == 200, after.text
    assert after.json()["complete"] is True
    assert time.monotonic() - started < PROMPT


# ## Compiles that overrun the timeout


def slow_schema(tag: int) -> dict:
    """Compiles in seconds on this engine (~3-4 s on 2 cores): far beyond a 0.2 s timeout."""
    return {"type": "array", "prefixItems": [{"type": "integer"}] * 2900, "minItems": 2900, "description": str(tag)}


@pytest.fixture
def impatient(engine, tmp_path):
    """The same deployment with schema_compile_timeout = 0.2 s."""
    with LocalServer(build(load(manifest(tmp_path, schema_compile_timeout=0.2)), engine,
                           Credentials(token=TOKEN))) as srv:
        yield srv


def test_an_overrunning_compile_is_answered_at_the_timeout(impatient):
    started = time.monotonic()
    response = httpx.post(f"{impatient.url}{GENERATE_Q3}", headers=AUTH, timeout=60,
                          json={"prompt": "x", "schema": slow_schema(0)})
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == "schema did not compile within 0.2 s"
    assert time.monotonic() - started < 2
    # the compile goes on in the background; the server answers meanwhile
    started = time.monotonic()
    assert httpx.get(f"{impatient.url}{HEALTH_Q3}", timeout=5).status_code == 200
    assert time.monotonic() - started < 2


def test_overrunning_compiles_never_make_another_request_wait(impatient):
    """Eight hostile schemas at once, then an ordinary request: everything is answered promptly,
    and once the compilers are free again the ordinary request succeeds."""

    def post(schema: dict) -> tuple[int, float, str]:
        started = time.monotonic()
        response = httpx.post(f"{impatient.url}{GENERATE_Q3}", headers=AUTH, timeout=60,
                              json={"prompt": "x", "schema": schema, "temperature": 0})
        return response.status_code, time.monotonic() - started, response.text

    with ThreadPoolExecutor(8) as pool:
        hostile = [pool.submit(post, slow_schema(i)) for i in range(1, 9)]
        time.sleep(0.5)  # all eight are in: four compiling, four refused
        status, seconds, text = post(OK_SCHEMA)
        answers = [h.result() for h in hostile]
    for code, took, body in answers:
        assert code in (400, 503), body
        assert took < 5, (code, took, body)  # 0.2 s timeout, or refused at once; slack for a busy CPU
    assert sorted(code for code, _, _ in answers).count(503) >= 1  # the compilers were full
    # the ordinary request was not queued behind them: answered at once, either way
    assert status in (200, 503), text
    assert seconds < 5, seconds
    if status == 503:
        assert "schemas are compiling" in text

    # the compiles end on their own; then ordinary requests go through again
    deadline = time.monotonic() + 120
    while True:
        status, seconds, text = post(OK_SCHEMA)
        if status == 200 or time.monotonic() > deadline:
            break
        assert status == 503, text
        time.sleep(1)
    assert status == 200, text


# ## Reasons and formats, as the stand-in answers them (the vLLM engine: tests/test_openai_route.py)


def test_a_refusal_carries_the_backend_s_whole_reason(server):
    response = httpx.post(f"{server.url}{GENERATE_Q3}", headers=AUTH, timeout=60,
                          json={"prompt": "x", "schema": {"type": "string", "pattern": "(?=x)abc"}})
    assert response.status_code == 400 and "look-around" in response.json()["detail"], response.text


@pytest.mark.parametrize("fmt", ["byte", "binary"])
def test_an_unknown_format_is_served(server, fmt):
    schema = {"type": "object", "properties": {"data": {"type": "string", "format": fmt, "maxLength": 8}},
              "required": ["data"], "additionalProperties": False}
    response = httpx.post(f"{server.url}{GENERATE_Q3}", headers=AUTH, timeout=60,
                          json={"prompt": "Some bytes.", "schema": schema, "temperature": 0, "max_tokens": 64})
    assert response.status_code == 200 and response.json()["complete"] is True, response.text
    jsonschema.validate(response.json()["ir_json"], schema)
