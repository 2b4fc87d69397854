"""liftdeploy.client against a real HTTP server on 127.0.0.1.

The server is uvicorn running a tiny FastAPI app whose answers are scripted per test:
each test registers a sequence of responses under its own path (503 with Retry-After,
422, a slow answer, ...) and counts the hits the server actually received. Nothing of
liftdeploy is replaced: the client's own httpx transport, retry loop, timeouts and
recorder run as they do against Modal.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from liftdeploy.client import AsyncClient, Client, ClientError, Endpoints, Recorder, Timeouts

GENERATION = {
    "ir_json": {"name": "add", "arity": 2, "pure": True},
    "complete": True,
    "text": '{"name": "add", "arity": 2, "pure": true}',
    "tokens_used": 17,
    "generation_time_ms": 12.5,
    "finish_reason": "stop",
    "model": "test-model",
}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}}
VALIDATION_422 = {"detail": [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]}


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: Any = field(default_factory=lambda: {"status": "healthy"})
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to sleep before answering


def unavailable(retry_after: str | None = "0") -> Answer:
    return Answer(503, {"detail": "loading; retry shortly"}, {"Retry-After": retry_after} if retry_after else {})


class Script:
    """Per-path scripted answers (the last one repeats) and a hit counter."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[Answer, ...]] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.bodies: dict[str, list[Any]] = collections.defaultdict(list)

    def add(self, *answers: Answer) -> str:
        name = uuid.uuid4().hex[:12]
        self.answers[name] = answers
        return name

    def app(self) -> FastAPI:
        api = FastAPI()

        @api.api_route("/{name}", methods=["GET", "POST"])
        async def scripted(name: str, request: Request):
            index = self.hits[name]
            self.hits[name] += 1
            if request.method == "POST":
                self.bodies[name].append(await request.json())
            answers = self.answers.get(name) or (Answer(404, {"detail": f"no script {name}"}),)
            answer = answers[min(index, len(answers) - 1)]
            if answer.delay:
                await asyncio.sleep(answer.delay)
            return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)

        return api


class Uvicorn:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app: Any):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Uvicorn:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def server():
    script = Script()
    with Uvicorn(script.app()) as running:
        running.script = script
        yield running


@pytest.fixture(autouse=True)
def no_recording_env(monkeypatch):
    """The developer's own LIFTDEPLOY_* settings must not leak into these tests."""
    for name in ("LIFTDEPLOY_RECORD", "LIFTDEPLOY_RECORDINGS", "LIFTDEPLOY_API_TOKEN",
                 "LIFTDEPLOY_PROXY_KEY", "LIFTDEPLOY_PROXY_SECRET"):
        monkeypatch.delenv(name, raising=False)


def client_for(base: str, path: str, *, kind: str = "health", label: str | None = None, auth: str = "none",
               cls: type = Client, **kwargs: Any):
    label = label or f"{kind}-ep"
    kwargs.setdefault("backoff", 0.01)
    return cls(Endpoints({label: f"{base}/{path}"}, {label: auth}), {label: kind}, **kwargs)


# ## Retries


def test_retries_503_then_succeeds(server):
    path = server.script.add(unavailable(), unavailable(), Answer(200, {"status": "healthy"}))
    with client_for(server.url, path, retries=4) as client:
        assert client.health() == {"status": "healthy"}
    assert server.script.hits[path] == 3


@pytest.mark.parametrize("status", [502, 504])
def test_retries_other_gateway_errors(server, status):
    path = server.script.add(Answer(status, {"detail": "gateway"}), Answer(200, {"status": "healthy"}))
    with client_for(server.url, path, retries=2) as client:
        assert client.health() == {"status": "healthy"}
    assert server.script.hits[path] == 2


def test_gives_up_after_retries_plus_one_attempts(server):
    path = server.script.add(unavailable())
    with client_for(server.url, path, label="my-health", retries=2) as client, \
            pytest.raises(ClientError) as info:
        client.health()
    assert server.script.hits[path] == 3
    error = info.value
    assert "my-health" in error.message and "3 attempts" in error.message and "HTTP 503" in error.message
    assert error.hint and "warmup" in error.hint


def test_transport_errors_are_retried_then_reported(server):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with client_for(f"http://127.0.0.1:{port}", "x", label="gone", retries=1,
                    timeouts=Timeouts(connect=1.0, read=1.0, cold_read=1.0)) as client, \
            pytest.raises(ClientError, match=r"gone did not answer after 2 attempts: ConnectError"):
        client.health()


@pytest.mark.parametrize("status, body", [(422, VALIDATION_422), (401, {"detail": "missing or wrong bearer token"}),
                                          (404, {"detail": "not here"})])
def test_4xx_is_never_retried(server, status, body):
    path = server.script.add(Answer(status, body), Answer(200))
    with client_for(server.url, path, kind="generate", label="gen", retries=4) as client, \
            pytest.raises(ClientError) as info:
        client.generate("hi", SCHEMA)
    assert server.script.hits[path] == 1
    assert info.value.status == status
    assert info.value.message.startswith(f"gen answered {status}")
    if status == 422:
        assert "prompt: Field required" in info.value.message  # the field named, not a JSON dump
        assert info.value.detail == VALIDATION_422["detail"]
        assert info.value.hint == "fix the fields named in the detail"


def test_an_openai_shaped_error_keeps_its_message(server):
    """The openai route answers refusals in OpenAI's shape: the message is the reason, not `None`."""
    reason = "response_format.json_schema.schema: schema cannot be used for constrained decoding: look-around"
    path = server.script.add(Answer(400, {"error": {"message": reason, "type": "BadRequestError",
                                                    "param": "response_format.json_schema.schema", "code": 400}}))
    with client_for(server.url, path, kind="generate", label="gen") as client, pytest.raises(ClientError) as info:
        client.generate("hi", SCHEMA)
    assert info.value.message == f"gen answered 400: {reason}"


def test_honours_retry_after(server):
    path = server.script.add(unavailable(retry_after="1"), Answer(200))
    with client_for(server.url, path, retries=2, backoff=0.01) as client:
        started = time.monotonic()
        client.health()
        waited = time.monotonic() - started
    assert server.script.hits[path] == 2
    # backoff alone would have waited 0.01 s; Retry-After says 1 s (loose upper bound: no perf assertion)
    assert 0.9 <= waited < 20


def test_without_retry_after_uses_exponential_backoff(server):
    path = server.script.add(unavailable(retry_after=None), unavailable(retry_after=None), Answer(200))
    with client_for(server.url, path, retries=2, backoff=0.2) as client:
        started = time.monotonic()
        client.health()
        waited = time.monotonic() - started
    assert server.script.hits[path] == 3
    assert waited >= 0.2 + 0.4 - 0.05  # backoff, then twice the backoff


# ## Cold-start-aware timeouts


def test_cold_read_timeout_until_first_success_then_warm_timeout(server):
    """The first request may meet a cold start and gets `cold_read`; once one succeeded, `read`."""
    slow = Answer(200, GENERATION, delay=1.0)
    path = server.script.add(slow)
    timeouts = Timeouts(connect=2.0, read=0.3, cold_read=10.0)
    with client_for(server.url, path, kind="generate", label="gen", retries=0, timeouts=timeouts) as client:
        assert not client.warm
        generation = client.generate("Describe add", SCHEMA)  # 1 s answer within the cold 10 s
        assert generation.ir_json == GENERATION["ir_json"] and generation.complete
        assert client.warm
        with pytest.raises(ClientError, match=r"gen did not answer after 1 attempts: ReadTimeout"):
            client.generate("Describe add", SCHEMA)  # the same 1 s answer now exceeds the warm 0.3 s
    assert server.script.hits[path] == 2
    assert server.script.bodies[path][0] == {"prompt": "Describe add", "schema": SCHEMA}


def test_warmup_always_waits_the_cold_timeout(server):
    path = server.script.add(Answer(200, {"model_loaded": True}, delay=0.6))
    timeouts = Timeouts(connect=2.0, read=0.2, cold_read=10.0)
    with client_for(server.url, path, kind="warmup", retries=0, timeouts=timeouts) as client:
        client.warm = True  # even on a warm client: warm-up may trigger a new container
        assert client.warmup() == {"model_loaded": True}


# ## Auth headers


def test_sends_bearer_token_and_proxy_credentials(server):
    seen: list[dict[str, str]] = []
    api = FastAPI()

    @api.get("/{label}")
    async def echo(label: str, request: Request):
        seen.append({k: v for k, v in request.headers.items() if k in ("authorization", "modal-key", "modal-secret")})
        return {"status": "healthy"}

    with Uvicorn(api) as echo_server:
        endpoints = Endpoints({"b": f"{echo_server.url}/b", "p": f"{echo_server.url}/p", "n": f"{echo_server.url}/n"},
                              {"b": "bearer", "p": "proxy", "n": "none"})
        for label, kind in (("b", "health"), ("p", "warmup"), ("n", "generate")):
            with Client(endpoints, {label: kind}, token="tok", proxy_auth=("wk-1", "ws-2"), backoff=0.01) as client:
                client.call(kind)
    assert seen == [{"authorization": "Bearer tok"}, {"modal-key": "wk-1", "modal-secret": "ws-2"}, {}]


# ## Recording and replay


def test_records_then_replays_offline(tmp_path: Path, monkeypatch):
    script = Script()
    ok = script.add(Answer(200, GENERATION))
    refused = script.add(Answer(422, VALIDATION_422))
    recordings = tmp_path / "recordings"
    monkeypatch.setenv("LIFTDEPLOY_RECORD", "record")
    monkeypatch.setenv("LIFTDEPLOY_RECORDINGS", str(recordings))
    with Uvicorn(script.app()) as live:
        urls = Endpoints({"gen": f"{live.url}/{ok}", "bad": f"{live.url}/{refused}"}, {"gen": "none", "bad": "none"})
        with Client(urls, {"gen": "generate"}, backoff=0.01) as client:
            recorded = client.generate("Describe add", SCHEMA, max_tokens=64)
        with Client(urls, {"bad": "generate"}, backoff=0.01) as client, pytest.raises(ClientError):
            client.generate("", SCHEMA)
    assert script.hits == {ok: 1, refused: 1}
    files = sorted(p.name for p in recordings.iterdir())
    assert len(files) == 2 and {f.split("-")[0] for f in files} == {"gen", "bad"}

    # The server is gone: replay answers from the files, with no network at all.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{live.url}/{ok}", timeout=1.0)
    monkeypatch.setenv("LIFTDEPLOY_RECORD", "replay")
    with Client(urls, {"gen": "generate"}, retries=0) as client:
        assert client.generate("Describe add", SCHEMA, max_tokens=64) == recorded
        assert client.warm
    with Client(urls, {"bad": "generate"}, retries=0) as client, pytest.raises(ClientError) as info:
        client.generate("", SCHEMA)  # a recorded refusal replays as the same refusal
    assert info.value.status == 422 and "prompt: Field required" in info.value.message
    assert script.hits == {ok: 1, refused: 1}

    # The same through a Recorder instance instead of the environment.
    monkeypatch.delenv("LIFTDEPLOY_RECORD")
    with Client(urls, {"gen": "generate"}, retries=0, recorder=Recorder(recordings, "replay")) as client:
        assert client.generate("Describe add", SCHEMA, max_tokens=64) == recorded


def test_retryable_answers_are_not_recorded(server, tmp_path: Path):
    path = server.script.add(unavailable(), Answer(200))
    with client_for(server.url, path, retries=2, recorder=Recorder(tmp_path, "record")) as client:
        client.health()
    saved = list(tmp_path.iterdir())
    assert len(saved) == 1 and '"status": 200' in saved[0].read_text()


def test_replay_without_a_recording_says_how_to_record(tmp_path: Path):
    recorder = Recorder(tmp_path / "empty", "replay")
    with client_for("http://127.0.0.1:9", "x", kind="generate", label="gen", recorder=recorder) as client, \
            pytest.raises(ClientError) as info:
        client.generate("never recorded", SCHEMA)
    assert "no recording for this gen request" in info.value.message
    assert "LIFTDEPLOY_RECORD=record" in (info.value.hint or "")


def test_unknown_record_mode_is_refused(monkeypatch):
    monkeypatch.setenv("LIFTDEPLOY_RECORD", "sometimes")
    with pytest.raises(ClientError, match="LIFTDEPLOY_RECORD is `sometimes`"):
        Recorder.from_env()


# ## The async client: same policy


def test_async_client_retries_then_succeeds(server):
    path = server.script.add(unavailable(), unavailable(), Answer(200, GENERATION))

    async def run():
        async with client_for(server.url, path, kind="generate", cls=AsyncClient, retries=3) as client:
            generation = await client.generate("Describe add", SCHEMA)
            return generation, client.warm

    generation, warm = asyncio.run(run())
    assert generation.ir_json == GENERATION["ir_json"] and warm
    assert server.script.hits[path] == 3


def test_async_client_never_retries_4xx(server):
    path = server.script.add(Answer(422, VALIDATION_422), Answer(200, GENERATION))

    async def run():
        async with client_for(server.url, path, kind="generate", label="gen", cls=AsyncClient, retries=3) as client:
            await client.generate("Describe add", SCHEMA)

    with pytest.raises(ClientError) as info:
        asyncio.run(run())
    assert info.value.status == 422 and server.script.hits[path] == 1


def test_async_client_gives_up_after_retries_plus_one(server):
    path = server.script.add(unavailable())

    async def run():
        async with client_for(server.url, path, label="ah", cls=AsyncClient, retries=1) as client:
            await client.health()

    with pytest.raises(ClientError, match=r"ah did not answer after 2 attempts: HTTP 503"):
        asyncio.run(run())
    assert server.script.hits[path] == 2
