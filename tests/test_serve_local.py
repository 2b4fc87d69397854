"""End to end over real HTTP: the rendered module's own FastAPI apps, served on 127.0.0.1 with the
local CPU engine (XGrammar + transformers on the offline smoke model), as `serve --local` does."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from liftdeploy.local.engine import LocalEngine
from liftdeploy.local.server import Credentials, LocalServer, build
from liftdeploy.manifest import load
from tests.conftest import DEPLOYMENTS

# Where the local server answers each endpoint: /<label>, the label `<app name>-<kind>` by default.
GENERATE_32B = "/lift-sys-inference-generate"
HEALTH_32B = "/lift-sys-inference-health"
WARMUP_32B = "/lift-sys-inference-warmup"
GENERATE_Q3 = "/qwen3-structured-generate"
OPENAI_Q3 = "/qwen3-structured-openai"
GENERATE_CODER = "/lift-sys-coder-generate"
HEALTH_CODER = "/lift-sys-coder-health"
OPENAI_CODER = "/lift-sys-coder-openai"

SHORT = {"type": "string", "maxLength": 12}
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0,
                                                                                        "maximum": 120}},
                                "required": ["name", "age"]}},
        "required": ["user"],
    },
    "array-bounds": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": SHORT, "minItems": 2, "maxItems": 3}},
        "required": ["tags"],
    },
    "enum": {
        "type": "object",
        "properties": {"level": {"enum": ["low", "medium", "high"]}, "ok": {"type": "boolean"}},
        "required": ["level", "ok"],
    },
    "bounded-integers": {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                       "y": {"type": "integer", "minimum": 100, "maximum": 200}},
        "required": ["x", "y"],
    },
    "optional-fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}, "note": SHORT,
                       "extra": {"type": "boolean"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "seeds-ir": {
        "type": "object",
        "properties": {
            "intent": {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 40}},
                       "required": ["summary"]},
            "signature": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "parameters": {"type": "array", "maxItems": 3, "items": {
                        "type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                         "type_hint": {"type": "string", "maxLength": 10}},
                        "required": ["name", "type_hint"]}},
                    "returns": {"type": "string", "maxLength": 10},
                },
                "required": ["name", "parameters", "returns"],
            },
        },
        "required": ["intent", "signature"],
    },
}


@pytest.fixture(scope="module")
def engine(smoke_engine):
    return smoke_engine


@pytest.fixture(scope="module")
def qwen32b(engine):
    """The seeds' deployment: health public, generate and warmup behind Modal proxy auth."""
    creds = Credentials(proxy_key="wk-test", proxy_secret="ws-test")
    with LocalServer(build(load(DEPLOYMENTS / "qwen32b.toml"), engine, creds)) as server:
        yield server, {"Modal-Key": "wk-test", "Modal-Secret": "ws-test"}


@pytest.fixture(scope="module")
def qwen3(engine):
    """A current vLLM with bearer auth and the OpenAI-compatible route."""
    creds = Credentials(token="t0ken-for-tests")
    with LocalServer(build(load(DEPLOYMENTS / "qwen3-8b.toml"), engine, creds)) as server:
        yield server, {"Authorization": "Bearer t0ken-for-tests"}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_generate_matches_schema(qwen32b, name):
    server, auth = qwen32b
    schema = SCHEMAS[name]
    response = httpx.post(f"{server.url}{GENERATE_32B}", headers=auth, timeout=120,
                          json={"prompt": f"Give me {name}", "schema": schema, "max_tokens": 400, "temperature": 0.7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "smoke:qwen2"
    assert body["finish_reason"] == "stop", body  # every string is bounded, so the grammar must finish
    assert body["complete"] is True
    assert json.loads(body["text"]) == body["ir_json"]
    jsonschema.validate(body["ir_json"], schema)
    assert body["tokens_used"] > 0 and body["generation_time_ms"] > 0


def test_cut_by_max_tokens_is_never_presented_as_valid(qwen32b):
    server, auth = qwen32b
    body = httpx.post(f"{server.url}{GENERATE_32B}", headers=auth, timeout=60,
                      json={"prompt": "x", "schema": SCHEMAS["seeds-ir"], "max_tokens": 3}).json()
    assert body["finish_reason"] == "length"
    assert body["complete"] is False and body["ir_json"] is None
    assert body["text"]


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        ({"prompt": "add"}, 422, '"schema"'),  # the seeds' KeyError: 'schema'
        ({"schema": {"type": "object"}}, 422, '"prompt"'),
        ({"prompt": "x", "schema": {"type": "object"}, "max_tokens": "many"}, 422, '"max_tokens"'),
        ({"prompt": "x", "schema": {"type": "object"}, "max_tokens": 999_999}, 422, '"max_tokens"'),
        ({"prompt": "x", "schema": {"type": "object"}, "temperature": 9}, 422, '"temperature"'),
        ({"prompt": "x" * 40_000, "schema": {"type": "object"}}, 422, '"prompt"'),
        ({"prompt": "x", "schema": "not an object"}, 422, '"schema"'),
        ({"prompt": "x", "schema": {"type": "object"}, "surprise": 1}, 422, '"surprise"'),
        ({"prompt": "x", "schema": {"type": 12}}, 400, "invalid JSON Schema"),
        ({"prompt": "x", "schema": {"$ref": "#/definitions/missing"}}, 400, "cannot be used for constrained decoding"),
        ({"prompt": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}, 400, "constrained decoding"),
        ({"prompt": "x", "schema": json.loads("[" * 0 + '{"a":' * 40 + "1" + "}" * 40)}, 422, "nests deeper"),
    ],
    ids=["missing-schema", "missing-prompt", "mistyped", "max-tokens-bound", "temperature-bound", "long-prompt",
         "schema-not-object", "unknown-field", "invalid-schema", "unresolvable-ref", "contradictory", "too-deep"],
)
def test_client_errors_are_4xx_never_500(qwen32b, payload, status, fragment):
    server, auth = qwen32b
    response = httpx.post(f"{server.url}{GENERATE_32B}", headers=auth, json=payload, timeout=60)
    assert response.status_code == status, response.text
    assert fragment in response.text


def test_oversized_body_is_413(qwen32b):
    server, auth = qwen32b
    response = httpx.post(f"{server.url}{GENERATE_32B}", headers={**auth, "content-type": "application/json"},
                          content=b'{"prompt": "' + b"x" * 1_100_000 + b'"}', timeout=60)
    assert response.status_code == 413


def test_health_warmup_and_auth(qwen32b):
    server, auth = qwen32b
    health = httpx.get(f"{server.url}{HEALTH_32B}").json()  # public: auth = "none" in the manifest
    assert health["status"] == "healthy" and health["smoke_model"] is True
    assert health["gpu"] == ["A100-80GB", "H100"]
    assert httpx.get(f"{server.url}{WARMUP_32B}").status_code == 401
    assert httpx.get(f"{server.url}{WARMUP_32B}", headers={**auth, "Modal-Secret": "wrong"}).status_code == 401
    warm = httpx.get(f"{server.url}{WARMUP_32B}", headers=auth).json()
    assert warm["model_loaded"] is True and warm["load_seconds"] > 0
    assert httpx.post(f"{server.url}{GENERATE_32B}", json={"prompt": "x", "schema": {}}).status_code == 401
    assert httpx.get(f"{server.url}/nowhere").status_code == 404


def test_bearer_auth(qwen3):
    server, auth = qwen3
    payload = {"prompt": "x", "schema": SCHEMAS["enum"], "max_tokens": 64}
    assert httpx.post(f"{server.url}{GENERATE_Q3}", json=payload, timeout=60).status_code == 401
    wrong = httpx.post(f"{server.url}{GENERATE_Q3}", json=payload, headers={"Authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{server.url}{GENERATE_Q3}", json=payload, headers=auth, timeout=60).status_code == 200


def test_model_still_loading_is_503_with_retry_after():
    engine = LocalEngine(None)  # never started: what a request meets while the model loads
    with LocalServer(build(load(DEPLOYMENTS / "qwen32b.toml"), engine, Credentials(None, "k", "s"))) as server:
        response = httpx.post(f"{server.url}{GENERATE_32B}", headers={"Modal-Key": "k", "Modal-Secret": "s"},
                              json={"prompt": "x", "schema": {"type": "object"}})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"


def test_openai_route_declines_the_transformers_engine(qwen3):
    """The route is vLLM's own server: without vLLM it answers every call with a 400 naming the
    vLLM engine, in OpenAI's error shape, so the SDK shows it (tests/test_openai_route.py serves it)."""
    openai = pytest.importorskip("openai")
    server, auth = qwen3
    client = openai.OpenAI(base_url=f"{server.url}{OPENAI_Q3}/v1", api_key="t0ken-for-tests", max_retries=0)
    messages = [{"role": "user", "content": "x"}]
    for call in (client.models.list, lambda: client.chat.completions.create(model="Qwen/Qwen3-8B", messages=messages)):
        with pytest.raises(openai.BadRequestError, match="--engine vllm") as caught:
            call()
        assert caught.value.code == "vllm_engine_required"
    with pytest.raises(openai.AuthenticationError):  # auth still comes first
        openai.OpenAI(base_url=f"{server.url}{OPENAI_Q3}/v1", api_key="wrong", max_retries=0).models.list()


# ## The SGLang deployment, on the CPU engine standing in for SGLang


@pytest.fixture(scope="module")
def coder(engine):
    """deployments/qwen3-coder-30b.toml: the SGLang module's own apps, proxy auth, OpenAI route."""
    creds = Credentials(proxy_key="wk-test", proxy_secret="ws-test")
    with LocalServer(build(load(DEPLOYMENTS / "qwen3-coder-30b.toml"), engine, creds)) as server:
        yield server, {"Modal-Key": "wk-test", "Modal-Secret": "ws-test"}


def test_sglang_module_generates_and_validates_like_the_vllm_one(coder):
    server, auth = coder
    schema = SCHEMAS["seeds-ir"]
    answer = httpx.post(f"{server.url}{GENERATE_CODER}", headers=auth, timeout=120,
                        json={"prompt": "add(a, b)", "schema": schema, "max_tokens": 256})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"ir_json", "complete", "incomplete_reason", "text", "tokens_used", "attempts",
                         "generation_time_ms", "finish_reason", "model"}
    if body["complete"]:
        jsonschema.validate(body["ir_json"], schema)
    missing = httpx.post(f"{server.url}{GENERATE_CODER}", json={"prompt": "x"}, headers=auth, timeout=30)
    assert missing.status_code == 422 and "schema" in missing.text
    unauthorised = httpx.post(f"{server.url}{GENERATE_CODER}", json={"prompt": "x", "schema": {}}, timeout=30)
    assert unauthorised.status_code == 401
    health = httpx.get(f"{server.url}{HEALTH_CODER}", timeout=30).json()
    assert health["backend"] == "SGLang 0.5.4.post3 with guidance" and health["smoke_model"] is True


def test_sglang_module_openai_route(coder):
    openai = pytest.importorskip("openai")
    server, auth = coder
    client = openai.OpenAI(base_url=f"{server.url}{OPENAI_CODER}/v1", api_key="unused", default_headers=auth,
                           max_retries=0)
    assert [m.id for m in client.models.list()] == ["Qwen/Qwen3-Coder-30B-A3B-Instruct"]
    schema = SCHEMAS["enum"]
    completion = client.chat.completions.create(
        model="Qwen/Qwen3-Coder-30B-A3B-Instruct",
        messages=[{"role": "user", "content": "A level, please."}],
        response_format={"type": "json_schema", "json_schema": {"name": "level", "schema": schema}},
        max_tokens=64,
    )
    if completion.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(completion.choices[0].message.content), schema)


def test_serve_local_says_which_engine_stands_in_for_sglang(tmp_path):
    """`liftdeploy serve --local` on the SGLang manifest: one line names the stand-in."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "liftdeploy.cli", "serve", "--local",
                                 str(DEPLOYMENTS / "qwen3-coder-30b.toml"), "--port", str(port), "--model", "smoke"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    try:
        deadline = time.monotonic() + 180
        while "serving" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        text = log.read_text()
        assert "serving" in text, text
        assert ("engine: transformers + XGrammar on this CPU stand in for SGLang 0.5.4.post3 "
                "(SGLang's server needs a CUDA GPU)") in text
        health = httpx.get(f"http://127.0.0.1:{port}{HEALTH_CODER}", timeout=30)
        assert health.status_code == 200 and health.json()["model"] == "Qwen/Qwen3-Coder-30B-A3B-Instruct"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
