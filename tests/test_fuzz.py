"""Hostile input over real HTTP: the rendered app's own OpenAPI, fuzzed with schemathesis.

The qwen3-8b deployment (bearer auth, `generate`) is served on 127.0.0.1 with the local CPU
engine, exactly as `liftdeploy serve --local` does. (Its OpenAI-compatible route is vLLM's own
server: hostile input against it runs on the real engine, in tests/test_openai_route.py.) Schemathesis
reads each endpoint's `/<label>/openapi.json` (FastAPI's own) and generates request bodies both
inside the documented schema (they reach the engine: real XGrammar compiles of arbitrary
`schema` objects, real decoding) and outside it (they must be refused with a 4xx). Every request
carries the valid bearer token, so it gets past auth and into validation. Raw bodies and
Authorization headers are fuzzed with plain hypothesis on top.

The manifest copy lowers `decoding.max_tokens_limit` to 16, so a valid body costs at most 16
decode steps of the smoke model: the whole run stays around a minute.

The property: no request is ever answered with a 5xx, every 4xx says why (`detail`), and
afterwards the server still answers health and a valid generate.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from liftdeploy.local.engine import LocalEngine
from liftdeploy.local.server import Credentials, LocalServer, build
from liftdeploy.manifest import load
from tests.conftest import DEPLOYMENTS

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Where the local server answers each endpoint: /<label>, the label `<app name>-<kind>` by default.
GENERATE_Q3 = "/qwen3-structured-generate"
HEALTH_Q3 = "/qwen3-structured-health"
OPENAI_Q3 = "/qwen3-structured-openai"

TOKEN = "fuzz-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_TOKENS = 16

# (label, path, method, generation mode, examples): 850 schemathesis requests, and 160 more below.
PLAN = [
    ("qwen3-structured-generate", "/", "POST", "positive", 450),
    ("qwen3-structured-generate", "/", "POST", "negative", 400),
]
RAW_BODIES = 100
AUTH_HEADERS = 60


def cheap_manifest(folder: Path) -> Path:
    """deployments/qwen3-8b.toml with every request capped at MAX_TOKENS new tokens."""
    text = (DEPLOYMENTS / "qwen3-8b.toml").read_text()
    decoding = f"[decoding]\nmax_tokens = {MAX_TOKENS}\nmax_tokens_limit = {MAX_TOKENS}\n\n"
    assert "[decoding]" not in text
    path = folder / "qwen3-8b.toml"
    path.write_text(text.replace("[[endpoints]]", decoding + "[[endpoints]]", 1))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = LocalEngine(None, max_model_len=2048)
    engine.start()
    manifest = cheap_manifest(tmp_path_factory.mktemp("fuzz"))
    with LocalServer(build(load(manifest), engine, Credentials(token=TOKEN))) as srv:
        yield srv


class Tally:
    """Every response seen, by (what was fuzzed, status); the 5xx and detail-less 4xx in full."""

    def __init__(self) -> None:
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.bad: list[str] = []
        self.seconds: dict[str, float] = {}

    def record(self, what: str, status: int, body: bytes, request: object) -> None:
        self.statuses[(what, status)] += 1
        if status >= 500:
            self.bad.append(f"{what}: {status} {body[:300]!r} for {request!r:.600}")
        elif status >= 400:
            try:
                detail = json.loads(body).get("detail")
            except (ValueError, AttributeError):
                detail = None
            if not detail:
                self.bad.append(f"{what}: {status} without a detail: {body[:300]!r} for {request!r:.600}")

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck), print_blob=True)


def fuzzer(strategy, base_url: str, what: str, examples: int, session, tally: Tally):
    @fuzz_settings(examples)
    @given(case=strategy)
    def run(case):
        response = case.call(base_url=base_url, session=session, headers=AUTH, timeout=60)
        tally.record(what, response.status_code, response.content, case.body)

    return run


def fuzz_openapi(server: LocalServer, tally: Tally) -> None:
    import requests

    session = requests.Session()
    for label, path, method, mode, examples in PLAN:
        document = httpx.get(f"{server.url}/{label}/openapi.json", timeout=10).json()
        operation = schemathesis.openapi.from_dict(document)[path][method]
        what = f"{label} {mode}"
        before, started = tally.total, time.monotonic()
        fuzzer(operation.as_strategy(schemathesis.GenerationMode(mode)), f"{server.url}/{label}", what,
               examples, session, tally)()
        tally.seconds[what] = time.monotonic() - started
        # hypothesis may stop early only when it runs out of distinct inputs; it must not here
        assert tally.total - before >= 0.9 * examples, (what, tally.total - before)


def fuzz_raw(server: LocalServer, tally: Tally) -> None:
    """Bodies that are not the documented JSON at all, and garbage Authorization headers."""
    client = httpx.Client(timeout=60)
    json_ish = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=20)
    body = st.one_of(st.binary(max_size=2000), json_ish.map(lambda v: json.dumps(v).encode()),
                     st.text(max_size=200).map(lambda t: ('{"prompt": "' + t).encode("utf-8", "surrogatepass")))
    content_type = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                    "multipart/form-data", "application/json; charset=latin-1", ""])
    target = st.just(GENERATE_Q3)

    @fuzz_settings(RAW_BODIES)
    @given(target=target, body=body, content_type=content_type)
    def raw(target, body, content_type):
        headers = {**AUTH, "content-type": content_type}
        response = client.post(f"{server.url}{target}", content=body, headers=headers)
        tally.record("raw body", response.status_code, response.content, (target, content_type, body))

    header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                           max_size=80).map(str.strip)
    header = st.one_of(header_value, header_value.map(lambda v: ("Bearer " + v).strip()), st.just(f"bearer  {TOKEN}"),
                       st.just(f"Basic {TOKEN}"), st.just(TOKEN))

    @fuzz_settings(AUTH_HEADERS)
    @given(target=target, authorization=header)
    def auth(target, authorization):
        response = client.post(f"{server.url}{target}", json={"prompt": "x", "schema": {"type": "object"}},
                               headers={"Authorization": authorization.encode("latin-1")})
        tally.record("authorization", response.status_code, response.content, (target, authorization))
        assert response.status_code == 401, (authorization, response.text)

    started = time.monotonic()
    raw()
    tally.seconds["raw body"] = time.monotonic() - started
    started = time.monotonic()
    auth()
    tally.seconds["authorization"] = time.monotonic() - started
    client.close()


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx(server):
    tally = Tally()
    started = time.monotonic()
    fuzz_openapi(server, tally)
    fuzz_raw(server, tally)
    seconds = time.monotonic() - started
    summary = ", ".join(f"{what} {status}: {n}" for (what, status), n in sorted(tally.statuses.items()))
    phases = ", ".join(f"{what} {s:.0f} s" for what, s in tally.seconds.items())
    print(f"\nfuzzed {tally.total} requests in {seconds:.0f} s ({phases}): {summary}")

    assert tally.bad == [], "\n".join(tally.bad[:20])
    assert tally.total >= 1000
    # the fuzzing reached both sides of validation, and the engine itself
    assert tally.statuses[("qwen3-structured-generate positive", 200)] > 0, summary
    assert tally.statuses[("qwen3-structured-generate negative", 422)] > 0, summary

    # afterwards the server still answers, promptly and correctly
    started = time.monotonic()
    assert httpx.get(f"{server.url}{HEALTH_Q3}", timeout=10).json()["status"] == "healthy"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    response = httpx.post(f"{server.url}{GENERATE_Q3}", headers=AUTH, timeout=30,
                          json={"prompt": "ok?", "schema": schema, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["finish_reason"] == "stop" and body["complete"] is True, body
    jsonschema.validate(body["ir_json"], schema)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-40, 1e-6])
def test_tiny_temperature_samples_greedily(temperature):
    """Found by the fuzzer: a tiny positive temperature overflowed logits / temperature to inf, the
    softmax to NaN, and torch.multinomial raised (a 503). Below 1e-5 it is greedy, as in vLLM."""
    torch = pytest.importorskip("torch")
    from liftdeploy.local.engine import _sample

    logits = torch.tensor([1.0, 3.0, 2.0, float("-inf")])
    assert _sample(logits, temperature, 0.95, torch.Generator().manual_seed(0)) == 1


# ## What the fuzzer found, pinned down (fast: a stub engine, no model)


class StubEngine:
    """Answers every request with a fixed text, as if the model had generated it."""

    ready, name, is_smoke = True, "stub", True

    def __init__(self, text: str = '{"ok": true}') -> None:
        self.text = text

    def prepare(self, schema: dict) -> dict:
        return schema

    def running(self) -> int:
        return 0

    async def generate(self, messages, schema, **kwargs) -> dict:
        return {"text": self.text, "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop"}


@pytest.fixture(scope="module")
def stub_server():
    engine = StubEngine()
    with LocalServer(build(load(DEPLOYMENTS / "qwen3-8b.toml"), engine, Credentials(token=TOKEN))) as srv:
        yield srv, engine


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
@pytest.mark.parametrize("target", [GENERATE_Q3])
def test_non_utf8_body_is_422(stub_server, target, content_type):
    """FastAPI's 422 echoes a non-JSON body as bytes and decoded them strictly: a 500."""
    server, _ = stub_server
    response = httpx.post(f"{server.url}{target}", content=b'{"prompt": "\xc4"}',
                          headers={**AUTH, "content-type": content_type})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body"]


@pytest.mark.parametrize(("body", "field", "echo"), [
    (b'{"prompt": "x", "schema": {}, "temperature": NaN}', "temperature", "nan"),
    (b'{"prompt": "x", "schema": {}, "max_tokens": Infinity}', "max_tokens", "inf"),
    (b'{"prompt": -Infinity, "schema": {}}', "prompt", "-inf"),
])
def test_non_finite_numbers_are_422(stub_server, body, field, echo):
    """Python's JSON parser accepts NaN / Infinity; echoing them in the 422 could not be serialised."""
    server, _ = stub_server
    response = httpx.post(f"{server.url}{GENERATE_Q3}", content=body,
                          headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", field] and error["input"] == echo


@pytest.mark.parametrize("text", ["1e999", "[-1e400]", "9" * 5000])
def test_output_numbers_out_of_range_are_not_presented_as_valid(stub_server, text):
    """A number Python cannot hold (inf, or more than 4300 digits) was a 500 or a silent null."""
    server, engine = stub_server
    engine.text = text
    try:
        response = httpx.post(f"{server.url}{GENERATE_Q3}", headers=AUTH, json={"prompt": "x", "schema": {}})
    finally:
        engine.text = '{"ok": true}'
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["complete"], body["ir_json"], body["text"], body["finish_reason"]) == (False, None, text, "invalid")
