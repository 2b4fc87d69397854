"""The core install — `pip install liftdeploy`, no extras, no torch — as a new user has it.

A venv made with nothing but `pip install <this project>` runs every command that needs neither a
GPU nor torch: validate, render, schema, check, plan, apply (against the control-plane double,
warm-up and smoke test included), destroy, warmup, smoke, bench and eval (against a local server), and
the README's Python client. `serve --local` and `check --resolve` fail with one `error:` line
naming what to install. Nothing ends in "internal error".

The venv is cached in the test cache (tests/support/cache.py), keyed by pyproject's dependency
list: the first run resolves and installs the core dependencies from the package index, as pip
does for a user, then uninstalls liftdeploy itself. Each session builds this tree's wheel and
installs it (--no-deps) into a folder of its own, first on the venv's path, so sessions of
different trees never share liftdeploy's code. The local server runs in this (dev) process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cache import cached
from tests.support.modal_control_plane import ModalControlPlane

pytestmark = pytest.mark.network  # the first run installs from the package index; CI runs it

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = ROOT / "deployments"
CREDS = {"LIFTDEPLOY_PROXY_KEY": "wk-core", "LIFTDEPLOY_PROXY_SECRET": "ws-core"}
NOT_IN_CORE = ("torch", "transformers", "tokenizers", "xgrammar", "fastapi", "uvicorn", "vllm", "matplotlib", "uv")


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> dict[str, Path]:
    """{"python": the venv's interpreter, "bin": a folder with its `liftdeploy` script, "site": this tree}."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[.*?^\]", pyproject, re.S | re.M)
    assert deps, "pyproject.toml has no [project] dependencies list"
    key = {"dependencies": hashlib.sha256(deps.group(0).encode()).hexdigest()[:16],
           "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}

    def make(venv: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _pip(venv / "bin" / "python", "install", "--quiet", str(ROOT))  # what a user runs
        _pip(venv / "bin" / "python", "uninstall", "--yes", "--quiet", "liftdeploy")  # keep its dependencies

    venv = cached(f"core-venv-{key['dependencies']}-py{key['python']}", key, make)
    python = venv / "bin" / "python"
    session = tmp_path_factory.mktemp("core-install")
    _pip(python, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(session / "dist"), str(ROOT))
    wheel = next((session / "dist").glob("liftdeploy-*.whl"))
    _pip(python, "install", "--quiet", "--no-deps", "--target", str(session / "site"), str(wheel))
    return {"python": python, "bin": session / "site" / "bin", "site": session / "site"}


def env_for(core: dict[str, Path], **extra: str) -> dict[str, str]:
    """A user's shell with only the core venv: no dev venv, no uv on PATH, no modal account."""
    keep = ("HOME", "LANG", "LC_ALL", "TMPDIR", "PIP_CONFIG_FILE", "SSL_CERT_FILE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(PATH=os.pathsep.join([str(core["bin"]), str(core["python"].parent), "/usr/bin", "/bin"]),
               PYTHONPATH=str(core["site"]), COLUMNS="200", NO_COLOR="1",
               MODAL_CONFIG_PATH="/nonexistent/modal.toml")
    env.update(extra)
    return env


def run(core: dict[str, Path], *args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(core["bin"] / "liftdeploy"), *args], cwd=cwd, env=env or env_for(core),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both and "internal error" not in both, shown(proc)
    return proc


def shown(proc: subprocess.CompletedProcess) -> str:
    command = " ".join(map(str, proc.args))
    return f"{command}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@pytest.fixture
def folder(tmp_path) -> Path:
    shutil.copytree(DEPLOYMENTS, tmp_path / "deployments")
    (tmp_path / "pyproject.toml").write_text("")  # a project root: rendered modules name manifests from it
    return tmp_path


@pytest.fixture(scope="module")
def server():
    """The seeds' deployment served from this process (the dev install) on 127.0.0.1."""
    from liftdeploy.local.engine import LocalEngine
    from liftdeploy.local.server import Credentials, LocalServer, build
    from liftdeploy.manifest import load

    engine = LocalEngine(None, max_model_len=1024)
    engine.start()
    creds = Credentials(proxy_key=CREDS["LIFTDEPLOY_PROXY_KEY"], proxy_secret=CREDS["LIFTDEPLOY_PROXY_SECRET"])
    with LocalServer(build(load(DEPLOYMENTS / "qwen32b.toml"), engine, creds)) as live:
        yield live


def test_the_core_install_has_no_extras(core):
    probe = ("import importlib.util, json, sys; "
             "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))")
    proc = subprocess.run([str(core["python"]), "-c", probe, *NOT_IN_CORE, "jsonschema", "modal", "liftdeploy"],
                          env=env_for(core), capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == ["jsonschema", "modal", "liftdeploy"]


def test_commands_that_need_no_server(core, folder):
    assert run(core, "--help", cwd=folder).returncode == 0
    valid = run(core, "validate", "deployments/qwen32b.toml", "deployments/qwen3-8b.toml", cwd=folder)
    assert valid.returncode == 0 and valid.stdout.splitlines() == [
        "ok: deployments/qwen32b.toml (base, dev)", "ok: deployments/qwen3-8b.toml (base, prod)"], shown(valid)
    rendered = run(core, "render", "deployments/qwen3-8b.toml", "-o", "out", cwd=folder)
    assert rendered.returncode == 0 and (folder / "out" / "qwen3_8b.py").is_file(), shown(rendered)
    drift = run(core, "render", "deployments/qwen32b.toml", "--check", cwd=folder)
    assert drift.returncode == 0, shown(drift)
    schema = run(core, "schema", cwd=folder)
    assert schema.returncode == 0 and json.loads(schema.stdout)["title"], shown(schema)
    check = run(core, "check", cwd=folder)
    assert check.returncode == 0, shown(check)
    assert re.fullmatch(r"checked \d+ manifest\(s\) and env\(s\): 0 error\(s\), 0 warning\(s\)",
                        check.stdout.splitlines()[-1]), shown(check)
    plan = run(core, "plan", "deployments/qwen32b.toml", cwd=folder)
    assert plan.returncode == 0 and "Plan: " in plan.stdout, shown(plan)


def test_check_resolve_without_uv_says_uv_is_missing(core, folder):
    proc = run(core, "check", "--resolve", cwd=folder)
    assert (proc.returncode, proc.stdout) == (2, ""), shown(proc)
    assert proc.stderr.splitlines() == ["error: --resolve needs uv: uv is not installed, so the pins were not resolved",
                                        "hint: pip install uv (or put uv on PATH), or drop --resolve"]


def test_serve_local_names_the_extra(core, folder):
    proc = run(core, "serve", "--local", "deployments/qwen32b.toml", "--port", "0", cwd=folder)
    assert proc.returncode == 1, shown(proc)
    error, hint = proc.stderr.splitlines()
    assert re.fullmatch(r"error: serve failed: `serve --local` needs liftdeploy's `local` extra \(.*\btorch\b.* not "
                        r"installed\)", error), shown(proc)
    assert hint == "hint: pip install 'liftdeploy[local]'"


def test_apply_warms_up_and_smoke_tests(core, folder, server):
    """The whole apply, ending in the smoke test that needs jsonschema; then destroy."""
    with ModalControlPlane(web_url_base=server.url) as cp:
        env = env_for(core, **cp.env(), **CREDS)
        applied = run(core, "apply", "qwen32b.toml", "--yes", "--timeout", "120", cwd=folder / "deployments", env=env)
        assert applied.returncode == 0, shown(applied)
        for step in ("deploy", "record state", "warm-up", "smoke test"):
            assert re.search(rf"^✓ {step} \(", applied.stdout, re.M), shown(applied)
        destroyed = run(core, "destroy", "qwen32b.toml", "--yes", cwd=folder / "deployments", env=env)
        assert destroyed.returncode == 0, shown(destroyed)
        assert cp.errors == []


def test_warmup_smoke_bench_and_eval_against_a_local_server(core, folder, server):
    env = env_for(core, **CREDS)
    warm = run(core, "warmup", server.url, "--timeout", "60", cwd=folder, env=env)
    assert warm.returncode == 0 and "warm: smoke:qwen2" in warm.stdout, shown(warm)
    smoke = run(core, "smoke", server.url, cwd=folder, env=env)
    assert smoke.returncode == 0 and "ok: health, warm-up and generate answered" in smoke.stdout, shown(smoke)
    bench = run(core, "bench", server.url, "-c", "1", "-n", "2", "--max-tokens", "8", "-o", "b", cwd=folder, env=env)
    assert bench.returncode == 0, shown(bench)
    assert json.loads((folder / "b" / "bench.json").read_text())["levels"][0]["errors"] == 0
    assert not (folder / "b" / "bench.png").exists()  # no matplotlib in the core install: JSON only
    tasks = ROOT / "tests" / "fixtures" / "eval_tasks_small.jsonl"
    graded = run(core, "eval", server.url, "--tasks", str(tasks), "--limit", "2", "--max-tokens", "16", "-o", "e",
                 cwd=folder, env=env)
    assert graded.returncode == 0, shown(graded)
    assert len(json.loads((folder / "e" / "eval.json").read_text())["records"]) == 2
    assert not (folder / "e" / "eval.png").exists()


def test_the_readme_client_example(core, folder, server):
    """README, "Python client", with the credentials `serve --local` prints exported."""
    code = f"""
from liftdeploy.client import Client
from liftdeploy.verify import SMOKE_SCHEMA
with Client.for_url({server.url!r}) as client:
    client.warmup()
    result = client.generate("Create a function add(a, b)", SMOKE_SCHEMA, max_tokens=64)
    print(result.finish_reason, result.model)
"""
    proc = subprocess.run([str(core["python"]), "-c", code], cwd=folder, env=env_for(core, **CREDS),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, shown(proc)
    assert proc.stdout.split()[1] == "smoke:qwen2"
