"""What a new user meets in the first hour, each against the real thing: a busy port, Ctrl-C with
SIGINT ignored by the launcher, the README's `Client.for_url`, and the wording of validate.
(The core install itself: tests/test_core_install.py.)"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from liftdeploy.cli import app
from liftdeploy.client import Client, ClientError
from liftdeploy.local.engine import LocalEngine
from liftdeploy.local.server import Credentials, LocalServer, build
from liftdeploy.manifest import load

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = ROOT / "deployments"
IGNORING_SIGINT = ["sh", "-c", 'trap "" INT; exec "$0" "$@"']  # what `cmd &` in a script does to SIGINT


def cli_process(*args: str, ignore_sigint: bool = False, env_extra: dict[str, str] | None = None,
                **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "LIFTDEPLOY_PROXY", "LIFTDEPLOY_API"))}
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "liftdeploy.cli", *args]
    return subprocess.Popen([*IGNORING_SIGINT, *cmd] if ignore_sigint else cmd, cwd=ROOT, env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


# ## serve --local


def test_serve_local_refuses_a_busy_port_before_loading_anything():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli_process("serve", "--local", "deployments/qwen32b.toml", "--port", str(port))
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert stderr.splitlines() == [
        f"error: serve failed: port {port} on 127.0.0.1 is in use",
        "hint: stop what listens there, or choose another port with --port N (0: any free one)"]


def test_serve_local_started_with_sigint_ignored_stops_on_sigint():
    """`liftdeploy serve --local &` in a script, then `kill -INT`: it stops, as Ctrl-C stops it."""
    proc = cli_process("serve", "--local", "deployments/qwen32b.toml", "--port", "0", "--model", "smoke",
                       ignore_sigint=True)
    try:
        seen = ""
        deadline = time.monotonic() + 240  # the smoke model loads first
        while "serving " not in seen:
            assert proc.poll() is None and time.monotonic() < deadline, seen
            if select.select([proc.stderr], [], [], 1.0)[0]:
                seen += proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, seen + rest
    assert rest.splitlines()[-1] == "stopped on SIGINT"


# ## The README's Python client against `serve --local`


@pytest.fixture(scope="module")
def servers():
    """qwen32b (generate and warmup behind proxy auth) and qwen3-8b (bearer), on an engine that is never
    started: the warm-up endpoint answers `loading` without touching a model, after auth."""
    engine = LocalEngine(None, max_model_len=1024)
    proxy = Credentials(proxy_key="wk-readme", proxy_secret="ws-readme")
    bearer = Credentials(token="tok-readme")
    saved = os.environ.get("LIFTDEPLOY_API_TOKEN")
    try:
        with LocalServer(build(load(DEPLOYMENTS / "qwen32b.toml"), engine, proxy)) as a, \
                LocalServer(build(load(DEPLOYMENTS / "qwen3-8b.toml"), engine, bearer)) as b:
            yield {"proxy": a, "bearer": b}
    finally:
        if saved is None:
            os.environ.pop("LIFTDEPLOY_API_TOKEN", None)
        else:
            os.environ["LIFTDEPLOY_API_TOKEN"] = saved


def test_for_url_sends_the_proxy_credentials_the_server_asks_for(servers, monkeypatch):
    monkeypatch.setenv("LIFTDEPLOY_PROXY_KEY", "wk-readme")
    monkeypatch.setenv("LIFTDEPLOY_PROXY_SECRET", "ws-readme")
    with Client.for_url(servers["proxy"].url) as client:
        assert client.endpoints.auth == {"lift-sys-inference-health": "none", "lift-sys-inference-generate": "proxy",
                                         "lift-sys-inference-warmup": "proxy"}
        assert client.call("warmup")["status"] == "loading"
        assert client.health()["status"] == "healthy"


def test_for_url_sends_the_bearer_token_the_server_asks_for(servers, monkeypatch):
    monkeypatch.setenv("LIFTDEPLOY_API_TOKEN", "tok-readme")
    with Client.for_url(servers["bearer"].url) as client:
        assert client.endpoints.auth["qwen3-structured-warmup"] == "bearer"
        assert client.call("warmup")["status"] == "loading"


def without_credentials(monkeypatch) -> None:
    for name in ("LIFTDEPLOY_PROXY_KEY", "LIFTDEPLOY_PROXY_SECRET", "LIFTDEPLOY_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("auth", "wanted", "not_wanted"), [
    ("proxy", ["LIFTDEPLOY_PROXY_KEY", "LIFTDEPLOY_PROXY_SECRET"], "LIFTDEPLOY_API_TOKEN"),
    ("bearer", ["LIFTDEPLOY_API_TOKEN"], "LIFTDEPLOY_PROXY"),
])
def test_for_url_without_credentials_is_refused_with_the_hint_of_its_auth(servers, monkeypatch, auth, wanted,
                                                                           not_wanted):
    without_credentials(monkeypatch)
    with Client.for_url(servers[auth].url, retries=0) as client, pytest.raises(ClientError) as refused:
        client.call("warmup")
    assert refused.value.status == 401
    assert all(name in refused.value.hint for name in wanted) and not_wanted not in refused.value.hint


def test_smoke_without_credentials_names_what_the_proxy_endpoint_wants(servers, monkeypatch):
    """`liftdeploy smoke URL` on a server whose endpoints use proxy auth: the hint names the proxy
    variables, not LIFTDEPLOY_API_TOKEN."""
    without_credentials(monkeypatch)
    result = CliRunner().invoke(app, ["smoke", servers["proxy"].url, "--timeout", "30"])
    assert result.exit_code == 1, result.output
    error, hint = result.stderr.splitlines()
    assert error == ("error: smoke test failed: lift-sys-inference-warmup answered 401: missing or wrong Modal-Key / "
                     "Modal-Secret headers")
    assert hint.startswith("hint: this endpoint uses Modal proxy auth: set LIFTDEPLOY_PROXY_KEY and "
                           "LIFTDEPLOY_PROXY_SECRET"), hint
    assert "LIFTDEPLOY_API_TOKEN" not in result.stderr


def test_for_url_before_the_server_listens_sends_what_is_configured(monkeypatch):
    """Made while nothing answers yet (a warm-up started before `serve --local` listens): the default
    labels, with every configured credential, so the first answer once it is up is not a 401."""
    monkeypatch.setenv("LIFTDEPLOY_PROXY_KEY", "wk-early")
    monkeypatch.setenv("LIFTDEPLOY_PROXY_SECRET", "ws-early")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    early = Client.for_url(f"http://127.0.0.1:{port}")
    assert early.endpoints.auth == {"health": "auto", "warmup": "auto", "generate": "auto"}
    router = build(load(DEPLOYMENTS / "qwen32b.toml"), LocalEngine(None), Credentials(proxy_key="wk-early",
                                                                                      proxy_secret="ws-early"))
    with LocalServer(router, port=port), early:
        assert early.call("warmup")["status"] == "loading"
    # the labels it guessed (`warmup`) were not the server's: it took the server's list from its 404
    assert early.endpoints.urls["lift-sys-inference-warmup"] == f"http://127.0.0.1:{port}/lift-sys-inference-warmup"


# ## validate


def test_validate_names_the_envs_once_and_points_to_check(tmp_path):
    t4 = tmp_path / "t4.toml"
    t4.write_text((DEPLOYMENTS / "qwen32b.toml").read_text().replace('gpu = ["A100-80GB", "H100"]', 'gpu = ["T4"]'))
    assert 'gpu = ["T4"]' in t4.read_text()
    result = CliRunner().invoke(app, ["validate", str(t4)])
    assert result.exit_code == 0
    assert result.stdout == f"ok: {t4} (base, dev)\n"
    assert result.stderr == (f"hint: validate reads the manifest's form; `liftdeploy check {t4}` also checks GPU "
                             "memory fit, pins and Modal's rules\n")
    checked = CliRunner().invoke(app, ["check", str(t4)])
    assert checked.exit_code == 1 and "error[gpu-memory]" in checked.stdout  # ... and check says it does not fit


# ## check --resolve when the resolver cannot answer


def test_check_resolve_with_the_index_unreachable_says_the_pins_were_not_checked():
    """Not "the pins do not resolve, change them": nothing was resolved. (Without uv at all:
    tests/test_core_install.py, in a venv that has none.)"""
    unreachable = {"UV_INDEX_URL": "http://127.0.0.1:9/simple", "UV_HTTP_RETRIES": "0", "UV_NO_CACHE": "1"}
    proc = cli_process("check", "--resolve", "deployments/qwen32b.toml", env_extra=unreachable)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stdout + stderr
    errors = [line for line in stdout.splitlines() if line.startswith("error")]
    assert errors and all(line.startswith("error[resolve-unchecked]: ") for line in errors), stdout
    assert all("the pins were not resolved: the package index could not be reached" in line for line in errors)
    assert "do not resolve" not in stdout and "change the pins" not in stdout
