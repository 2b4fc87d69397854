"""Ctrl-C during `liftdeploy apply`: nothing half-written, the previous apply untouched.

`liftdeploy apply --yes --no-verify` runs in a subprocess against the control-plane double, as in
tests/test_apply.py. The double holds one RPC (`ModalControlPlane.delay`), so the test knows the
deploy is waiting exactly there when it sends SIGINT; other runs are interrupted at fixed times
after the plan is printed, landing wherever the command happens to be then (rendering, importing
modal and the rendered module, connecting, the first RPCs).

After each: exit code 130, one `error:` line and no traceback, no `.*.tmp` file left, the rendered
module and `.liftdeploy/*.state.json` byte-identical to the previous apply's, and Modal still
serving the previous deployment.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.support.modal_control_plane import ModalControlPlane
from tests.test_apply import SECRETS, apply_copy, edit, output, snapshot, state_file

ROOT = Path(__file__).resolve().parent.parent
APP = "lift-sys-inference"


@pytest.fixture(scope="module")
def plane():
    with ModalControlPlane() as cp:
        for name, values in SECRETS.items():
            cp.add_secret(name, values)
        yield cp
        assert cp.errors == [], f"the double itself crashed: {cp.errors}"


@pytest.fixture(scope="module")
def applied(plane, tmp_path_factory):
    """deployments/qwen32b.toml applied once: the previous apply every test interrupts a new one of."""
    return apply_copy(plane, tmp_path_factory.mktemp("previous"), "qwen32b.toml", None, "qwen32b")


def changed_copy(applied, folder: Path) -> dict[str, bytes]:
    """The previous apply's folder with a changed manifest (and an image layer never built before)."""
    shutil.copytree(applied.folder, folder, dirs_exist_ok=True)
    manifest = folder / "qwen32b.toml"
    edit(manifest, "scaledown_window = 300", "scaledown_window = 120")
    edit(manifest, 'TOKENIZERS_PARALLELISM = "false" }',
         f'TOKENIZERS_PARALLELISM = "false", LIFTDEPLOY_TEST_RUN = "{uuid.uuid4().hex}" }}')
    return snapshot(folder)


def start_apply(cp: ModalControlPlane, folder: Path, *, ignore_sigint: bool = False) -> subprocess.Popen:
    """`liftdeploy apply`; with `ignore_sigint`, launched as `cmd &` in a script launches it: SIGINT ignored."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "LIFTDEPLOY_"))}
    env.update(cp.env())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["COLUMNS"] = "200"
    cmd = [sys.executable, "-m", "liftdeploy.cli", "apply", "qwen32b.toml", "--yes", "--no-verify"]
    if ignore_sigint:
        cmd = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *cmd]
    return subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def interrupt(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"apply did not stop within 60 s of SIGINT\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def assert_interrupted_cleanly(result: subprocess.CompletedProcess, folder: Path, before: dict[str, bytes]) -> None:
    # 130, or killed by SIGINT, which a shell reports as 130 too: CPython re-raises SIGINT on its way out
    # when a KeyboardInterrupt went through C code that flagged it unhandled, even one caught later
    # (seen when it lands while modal is being imported)
    assert result.returncode in (130, -signal.SIGINT), output(result)
    both = result.stdout + result.stderr
    assert "Traceback" not in both and "KeyboardInterrupt" not in both, output(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: interrupted; nothing half-written was left behind"], output(result)
    assert "applied " not in result.stdout, output(result)
    assert [p.name for p in folder.rglob(".*.tmp")] == []
    # the manifest, the rendered module and the state: byte for byte what they were, nothing added
    assert snapshot(folder) == before
    assert state_file(folder, "qwen32b").is_file() and (folder / "qwen32b.py").is_file()


# Where the deploy is held when SIGINT arrives, in the order `App.deploy()` calls them.
HELD = ["AppGetByDeploymentName", "FunctionPrecreate", "VolumeGetOrCreate", "ImageJoinStreaming", "MountPutFile",
        "FunctionCreate", "AppPublish"]


@pytest.mark.parametrize(("method", "ignore_sigint"), [*((m, False) for m in HELD), ("FunctionCreate", True)],
                         ids=[*HELD, "FunctionCreate-started-with-SIGINT-ignored"])
def test_sigint_while_modal_answers_keeps_the_previous_apply(plane, applied, tmp_path, method, ignore_sigint):
    cp = plane
    before = changed_copy(applied, tmp_path)
    previous = cp.deployed_app(APP)
    previous_tag, previous_version = previous.deployment_tag, previous.version
    start = len(cp.requests)
    cp.delay(method, 120)
    try:
        proc = start_apply(cp, tmp_path, ignore_sigint=ignore_sigint)
        deadline = time.monotonic() + 120
        while method not in [m for m, _ in list(cp.requests)[start:]]:
            assert proc.poll() is None, output(subprocess.CompletedProcess(proc.args, proc.returncode,
                                                                           *proc.communicate()))
            assert time.monotonic() < deadline, f"apply never called {method}"
            time.sleep(0.05)
        time.sleep(0.2)  # well inside the held call
        result = interrupt(proc)
    finally:
        cp.delay(method, None)

    assert_interrupted_cleanly(result, tmp_path, before)
    # Modal still serves the previous deployment: the interrupted one was never published
    current = cp.deployed_app(APP)
    assert current is previous and (current.deployment_tag, current.version) == (previous_tag, previous_version)


@pytest.mark.parametrize("after", [0.0, 0.05, 0.1, 0.2, 0.3, 0.5])
def test_sigint_after_the_plan_keeps_the_previous_apply(plane, applied, tmp_path, after):
    """SIGINT `after` seconds once the plan is printed: in rendering, importing modal and the rendered
    module, connecting, or the first RPCs, wherever that lands on this machine."""
    before = changed_copy(applied, tmp_path)
    cp = plane
    cp.delay("AppPublish", 60)  # the deploy cannot finish before SIGINT, wherever it arrives
    try:
        proc = start_apply(cp, tmp_path)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not any(line.startswith("Plan: ") for line in list(lines)):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.01)
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("apply did not stop within 60 s of SIGINT")
        reader.join(10)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), proc.stderr.read())
    finally:
        cp.delay("AppPublish", None)
    assert_interrupted_cleanly(result, tmp_path, before)
