"""`liftdeploy serve --local` stops cleanly on SIGINT (Ctrl-C) and SIGTERM (`kill`, Docker, systemd,
Kubernetes, CI runners), on both engines, with a request running: the request is answered 503 in
its route's shape, serve exits 0 with one line and no traceback, and no process it started outlives
it (vLLM's engine core and workers included). The signal goes to serve alone, as `kill PID` sends it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from liftdeploy.cli import app
from tests.support.vllm_server import Served, require_vllm, serve_vllm, stop

DEPLOYMENTS = Path(__file__).resolve().parent.parent / "deployments"
MANIFEST = DEPLOYMENTS / "qwen3-8b.toml"  # bearer auth; health, warmup, generate and openai endpoints
# Long on any model: 400 integers, at least ~800 tokens
LONG = {"prompt": "Count.", "schema": {"type": "array", "items": {"type": "integer"}, "minItems": 400,
                                      "maxItems": 400}, "max_tokens": 8000}
SIGNALS = [signal.SIGTERM, signal.SIGINT]


def stop_with_a_request_running(served: Served, sig: signal.Signals) -> tuple[httpx.Response, list[psutil.Process]]:
    """Send LONG, wait until the engine runs it, send `sig` to serve; the answer, and the processes
    serve had started."""
    first = served.post("generate", {"prompt": "One.", "schema": {"type": "integer"}, "max_tokens": 8})
    assert first.status_code == 200, first.text  # the backend's first compile (its imports) is behind us
    answer: dict[str, object] = {}

    def post() -> None:
        try:
            answer["response"] = served.post("generate", LONG, timeout=300)
        except httpx.HTTPError as exc:  # a dropped connection: what must not happen
            answer["response"] = exc

    sender = threading.Thread(target=post)
    sender.start()
    deadline = time.monotonic() + 300
    while served.get("warmup", timeout=30).json()["requests_running"] < 1:
        ended = answer.get("response")
        assert ended is None, f"the request ended before it ran: {getattr(ended, 'text', ended)}"
        assert time.monotonic() < deadline, served.log_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)  # generating now
    started = psutil.Process(served.process.pid).children(recursive=True)
    os.kill(served.process.pid, sig)
    sender.join(timeout=120)
    response = answer.get("response")
    assert isinstance(response, httpx.Response), f"{response!r}\n{served.log_text()[-3000:]}"
    return response, started


def assert_stopped_cleanly(served: Served, sig: signal.Signals, response: httpx.Response,
                           started: list[psutil.Process]) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == {"detail": "the server is stopping"}
    assert served.process.wait(timeout=120) == 0, served.log_text()[-3000:]
    log = served.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert f"stopped on {sig.name}; 1 running request answered 503" in log.splitlines(), log[-3000:]
    _, alive = psutil.wait_procs(started, timeout=30)  # the resource tracker ends once serve has
    assert alive == [], f"outlived serve: {[(p.pid, p.name()) for p in alive]}"


def openai_base_url(served: Served) -> str:
    """The `openai` endpoint's URL as serve printed it."""
    found = re.search(r"^  openai +(\S+)  auth=bearer$", served.log_text(), re.MULTILINE)
    assert found, served.log_text()[-3000:]
    return found.group(1)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_transformers_engine_stops_cleanly_with_a_request_running(tmp_path, sig):
    with serve_vllm(MANIFEST, tmp_path, engine="transformers", startup=300) as served:
        base_url = openai_base_url(served)  # what the SDK takes as base_url: vLLM's route, declined by this engine
        assert base_url == f"{served.route('openai')}/v1"
        declined = httpx.get(f"{base_url}/models", headers=served.headers, timeout=30)
        assert declined.status_code == 400 and declined.json()["error"]["code"] == "vllm_engine_required"
        response, started = stop_with_a_request_running(served, sig)
        assert_stopped_cleanly(served, sig, response, started)


@pytest.mark.engine
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_vllm_engine_stops_cleanly_with_a_request_running(tmp_path, sig):
    with serve_vllm(MANIFEST, tmp_path) as served:
        models = httpx.get(f"{openai_base_url(served)}/models", headers=served.headers, timeout=60)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "Qwen/Qwen3-8B", models.text
        response, started = stop_with_a_request_running(served, sig)
        assert any("EngineCor" in p.name() for p in started)  # vLLM's engine core ran in a process of its own
        assert_stopped_cleanly(served, sig, response, started)


@pytest.mark.engine
def test_vllm_engine_stopped_while_loading_leaves_no_process(tmp_path):
    """SIGTERM once vLLM's engine core has started, before the model is served."""
    require_vllm()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "liftdeploy.cli", "serve", "--local", "--engine", "vllm",
                                    str(MANIFEST), "--port", "0", "--model", "smoke"],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not any("EngineCor" in p.name() for p in psutil.Process(process.pid).children(recursive=True)):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        started = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        stop(process)
    text = log.read_text()
    assert "serving " not in text and "Traceback" not in text, text[-3000:]
    assert text.splitlines()[-1] == "stopped on SIGTERM while loading the model", text[-3000:]
    _, alive = psutil.wait_procs(started, timeout=30)
    assert alive == [], f"outlived serve: {[(p.pid, p.name()) for p in alive]}"


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_serve_refuses_a_port_out_of_range_as_a_usage_error(port):
    result = CliRunner().invoke(app, ["serve", "--local", str(MANIFEST), "--port", port])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: --port {port} is not a TCP port",
                                          "hint: use a port from 1 to 65535, or 0 for any free one"]
