"""`liftdeploy warmup`, `smoke` and `bench` against a live `serve --local` server."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from liftdeploy.cli import app
from liftdeploy.local.engine import LocalEngine
from liftdeploy.local.server import Credentials, LocalServer, build
from liftdeploy.manifest import load
from tests.conftest import DEPLOYMENTS

runner = CliRunner()


@pytest.fixture(scope="module")
def server():
    engine = LocalEngine(None, max_model_len=1024)
    engine.start()
    creds = Credentials(proxy_key="wk-cli", proxy_secret="ws-cli")
    with LocalServer(build(load(DEPLOYMENTS / "qwen32b.toml"), engine, creds)) as live:
        yield live


ENV = {"LIFTDEPLOY_PROXY_KEY": "wk-cli", "LIFTDEPLOY_PROXY_SECRET": "ws-cli"}


def test_warmup_and_smoke(server):
    warm = runner.invoke(app, ["warmup", server.url, "--timeout", "60"], env=ENV)
    assert warm.exit_code == 0, warm.output
    assert "warm: smoke:qwen2" in warm.output
    smoke = runner.invoke(app, ["smoke", server.url], env=ENV)
    assert smoke.exit_code == 0, smoke.output
    assert "ok: health, warm-up and generate answered" in smoke.output


def test_smoke_without_credentials_fails_cleanly(server):
    result = runner.invoke(app, ["smoke", server.url], env={"LIFTDEPLOY_PROXY_KEY": "", "LIFTDEPLOY_PROXY_SECRET": ""})
    assert result.exit_code == 1
    assert "error: smoke test failed: lift-sys-inference-warmup answered 401" in result.output
    assert "Traceback" not in result.output


def test_warmup_gives_up_at_the_deadline():
    result = runner.invoke(app, ["warmup", "http://127.0.0.1:9", "--timeout", "1"])
    assert result.exit_code == 1
    assert "error: warm-up failed: the model was not ready after 1 s" in result.output


def test_bench_writes_json_and_plot(server, tmp_path):
    result = runner.invoke(app, ["bench", server.url, "-c", "1,2", "-n", "3", "--max-tokens", "16",
                                 "-o", str(tmp_path)], env=ENV)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    assert all(level["errors"] == 0 and level["tokens_per_s"] > 0 for level in report["levels"])
    assert report["first_response_s"] > 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert runner.invoke(app, ["bench", server.url, "-c", "0"]).exit_code == 2
