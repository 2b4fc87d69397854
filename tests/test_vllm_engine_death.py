"""An engine that dies: requests get a 503 with Retry-After, never hang, and warm-up says so.
On its own server: it kills that server's vLLM engine process."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.conftest import DEPLOYMENTS
from tests.support.vllm_server import engine_core_pids, serve_vllm

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_vllm(DEPLOYMENTS / "qwen3-8b.toml", tmp_path_factory.mktemp("vllm-death")) as served:
        yield served


def test_an_engine_that_dies_gets_503s_not_hangs(server):
    pids = engine_core_pids(server.process)
    assert pids, "no VLLM::EngineCore process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    replies = []
    for _ in range(3):
        try:
            replies.append(server.post("generate", {"prompt": "x", "schema": {"type": "object"}}, timeout=60))
        except httpx.ReadTimeout:
            pytest.fail("a request hung after the engine died")
    assert replies[-1].status_code == 503 and replies[-1].headers["retry-after"]
    assert all(r.status_code == 503 for r in replies[1:]), [r.text for r in replies]
    warm = server.get("warmup").json()
    assert warm["status"] == "failed" and warm["model_loaded"] is False
