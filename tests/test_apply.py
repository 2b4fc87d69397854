"""`liftdeploy plan / apply / destroy` end to end, against the control-plane double.

Each command runs as a user runs it: `python -m liftdeploy.cli ...` in a subprocess, in a
folder holding a copy of an example manifest. The real `modal` client inside it deploys
over gRPC to tests/support/modal_control_plane.py, and the tests assert on the decoded
requests Modal's servers would have received, on what the command printed, and on the
files it left beside the manifest. Nothing of liftdeploy is replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import grpclib
import pytest
from google.protobuf.message import Message
from modal_proto import api_pb2

from tests.support.modal_control_plane import ModalControlPlane

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = ROOT / "deployments"

SECRETS = {"huggingface": {"HF_TOKEN": "hf_dummy"}, "qwen3-api-token": {"LIFTDEPLOY_API_TOKEN": "tok-dummy"}}
# What `plan` and `apply` ask Modal about the environment before anything is deployed.
LOOKUPS = {"ClientHello", "WorkspaceNameLookup", "EnvironmentGetOrCreate", "EnvironmentList"}


# ## Helpers


def liftdeploy(cp: ModalControlPlane | None, *args: str, cwd: Path, stdin: str | None = None,
               env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`liftdeploy ARGS` in a subprocess pointed at the double (modal reads its config at import)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "LIFTDEPLOY_"))}
    if cp is not None:
        full.update(cp.env())
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    full["COLUMNS"] = "200"  # keep rich from wrapping URLs
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "liftdeploy.cli", *args],
        cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout,
        **({"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}),
    )


def output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path}"
    path.write_text(text.replace(old, new))


def tag_of(manifest: Path) -> str:
    return "manifest-" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]


def state_file(folder: Path, module: str) -> Path:
    return folder / ".liftdeploy" / f"{module}.state.json"


def functions_in(requests: list[tuple[str, Message]]) -> dict[str, list[api_pb2.Function]]:
    """Like ModalControlPlane.created_functions(), over a slice of the recorded requests."""
    out: dict[str, list[api_pb2.Function]] = {}
    for method, req in requests:
        if method != "FunctionCreate":
            continue
        if req.HasField("function"):
            out[req.function.function_name] = [req.function]
        else:
            ranked = sorted(req.function_data.ranked_functions, key=lambda r: r.rank)
            out[req.function_data.function_name] = [r.function for r in ranked]
    return out


def gpus(ranks: list[api_pb2.Function]) -> list[str]:
    return [f.resources.gpu_config.gpu_type + (f":{f.resources.gpu_config.count}"
                                                 if f.resources.gpu_config.count > 1 else "") for f in ranks]


def web_endpoints(fn: api_pb2.Function) -> dict[str, tuple[str, bool]]:
    """method name -> (requested label, requires_proxy_auth), for the web methods of a class."""
    return {
        name: (m.webhook_config.requested_suffix, m.webhook_config.requires_proxy_auth)
        for name, m in fn.method_definitions.items()
        if m.webhook_config.type == api_pb2.WEBHOOK_TYPE_ASGI_APP
    }


@dataclasses.dataclass
class Applied:
    """One successful `liftdeploy apply`, with what Modal received snapshotted right after it."""

    cp: ModalControlPlane
    folder: Path
    manifest: Path
    module: str  # rendered module / state file stem
    result: subprocess.CompletedProcess
    requests: list[tuple[str, Message]]
    functions: dict[str, list[api_pb2.Function]]
    volumes: dict[tuple[str, str], str]
    secrets: dict[tuple[str, str], str]

    @property
    def state(self) -> dict[str, Any]:
        return json.loads(state_file(self.folder, self.module).read_text())

    def calls(self, method: str) -> list[Message]:
        return [req for m, req in self.requests if m == method]


def apply_copy(cp: ModalControlPlane, folder: Path, name: str, env: str | None, module: str) -> Applied:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / name
    shutil.copy(DEPLOYMENTS / name, manifest)
    start = len(cp.requests)
    result = liftdeploy(cp, "apply", name, *(["--env", env] if env else []), "--yes", "--no-verify", cwd=folder)
    assert result.returncode == 0, output(result)
    requests = list(cp.requests)[start:]
    return Applied(cp, folder, manifest, module, result, requests, functions_in(requests), dict(cp.volumes),
                   {k: v[0] for k, v in cp.secrets.items()})


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (manifest, rendered module, state) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def disarm(cp: ModalControlPlane) -> None:
    # The double has no public call to cancel `fail(..., times=None)`; a failed test must not
    # leave its failure armed for the next one.
    with cp._lock:
        cp._failures.clear()
    cp._image_build_failure = None


# ## Fixtures


@pytest.fixture(scope="module")
def plane():
    with ModalControlPlane() as cp:
        for environment in ("main", "prod"):  # qwen3-8b's prod env deploys to Modal environment `prod`
            for name, values in SECRETS.items():
                cp.add_secret(name, values, environment=environment)
        yield cp
        assert cp.errors == [], f"the double itself crashed: {cp.errors}"


@pytest.fixture(scope="module")
def applied32(plane, tmp_path_factory) -> Applied:
    """deployments/qwen32b.toml applied once (base env); later tests copy its folder."""
    return apply_copy(plane, tmp_path_factory.mktemp("qwen32b"), "qwen32b.toml", None, "qwen32b")


@pytest.fixture
def armed(plane):
    yield plane
    disarm(plane)


# ## apply: what Modal receives


def test_apply_qwen32b_deploys_the_manifest(applied32):
    a, cp = applied32, applied32.cp
    tag = tag_of(a.manifest)

    # The app: named and placed as the manifest says, published under the manifest's hash.
    (create,) = a.calls("AppCreate")
    assert create.environment_name == "main"
    (publish,) = a.calls("AppPublish")
    assert (publish.name, publish.deployment_tag, publish.app_state) == (
        "lift-sys-inference", tag, api_pb2.APP_STATE_DEPLOYED)
    deployed = cp.deployed_app("lift-sys-inference", "main")
    assert deployed is not None and deployed.app_id == publish.app_id
    assert set(publish.function_ids) == {"web_lift_sys_inference_health", "Inference.*"}
    assert set(publish.class_ids) == {"Inference"}

    # The GPU class: one ranked Function per GPU of the fallback chain, in order.
    ranks = a.functions["Inference.*"]
    assert gpus(ranks) == ["A100-80GB", "H100"]
    fn = ranks[0]
    for other in ranks[1:]:  # everything but the GPU is the same on every rank
        assert (other.volume_mounts, other.timeout_secs, other.autoscaler_settings) == (
            fn.volume_mounts, fn.timeout_secs, fn.autoscaler_settings)
    assert fn.is_class
    assert {m.mount_path: m.volume_id for m in fn.volume_mounts} == {
        "/models": a.volumes[("main", "lift-sys-models")],
        "/root/.cache/vllm": a.volumes[("main", "lift-sys-vllm-cache")],
    }
    volumes = {req.deployment_name: req.object_creation_type for req in a.calls("VolumeGetOrCreate")}
    assert volumes == {"lift-sys-models": api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
                       "lift-sys-vllm-cache": api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING}
    assert (fn.timeout_secs, fn.startup_timeout_secs, fn.task_idle_timeout_secs) == (600, 900, 300)
    auto = fn.autoscaler_settings
    assert (auto.scaledown_window, auto.min_containers, auto.HasField("max_containers"),
            auto.HasField("buffer_containers")) == (300, 0, False, False)
    assert (fn.max_concurrent_inputs, fn.target_concurrent_inputs) == (20, 0)
    assert list(fn.secret_ids) == []  # qwen32b names no secrets
    # generate and warm-up: proxy auth (the manifest's default), each at its own label: `<app>-<kind>`
    assert web_endpoints(fn) == {"web_lift_sys_inference_generate": ("lift-sys-inference-generate", True),
                                 "web_lift_sys_inference_warmup": ("lift-sys-inference-warmup", True)}

    # health: its own function, no GPU, no auth, answering without the model.
    (health,) = a.functions["web_lift_sys_inference_health"]
    assert health.resources.gpu_config.count == 0 and not health.resources.gpu_config.gpu_type
    assert health.webhook_config.type == api_pb2.WEBHOOK_TYPE_ASGI_APP
    assert (health.webhook_config.requested_suffix, health.webhook_config.requires_proxy_auth) == (
        "lift-sys-inference-health", False)
    assert not health.volume_mounts

    # The image: the CUDA base, the pins, the env.
    commands = "\n".join(c for req in a.calls("ImageGetOrCreate") for c in req.image.dockerfile_commands)
    assert "FROM nvidia/cuda:12.4.1-devel-ubuntu22.04" in commands
    assert "hf-transfer==0.1.9 transformers==4.53.0 vllm==0.9.2 xgrammar==0.1.19" in commands
    assert "ENV PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in commands
    assert fn.image_id in cp.images

    # The module Modal received is the module written beside the manifest.
    rendered = a.folder / "qwen32b.py"
    umask = os.umask(0o022)
    os.umask(umask)
    assert rendered.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    uploaded = {name: data for files in cp.mounts.values() for name, data in files.items()}
    assert uploaded["/root/qwen32b.py"] == rendered.read_bytes()
    assert f"# manifest sha256: {hashlib.sha256(a.manifest.read_bytes()).hexdigest()}" in rendered.read_text()

    # The state of this apply.
    state = a.state
    assert state["app_id"] == publish.app_id
    assert (state["app_name"], state["environment"], state["env"], state["tag"]) == (
        "lift-sys-inference", "main", None, tag)
    assert state["manifest_sha256"] == hashlib.sha256(a.manifest.read_bytes()).hexdigest()
    assert state["urls"] == {f"lift-sys-inference-{kind}": cp.web_url(f"lift-sys-inference-{kind}")
                             for kind in ("health", "generate", "warmup")}
    assert state["settings"]["scaling.scaledown_window"] == 300
    assert state["settings"]["compute.gpu"] == "A100-80GB → H100"
    assert state["settings"]["app.name"] == "lift-sys-inference"

    # What the user read.
    out = a.result.stdout
    assert "No previous apply is recorded" in out
    assert re.search(r"^✓ deploy \([\d.]+ s\) " + re.escape(publish.app_id), out, re.M)
    assert re.search(r"^✓ record state \([\d.]+ s\) \.liftdeploy/qwen32b\.state\.json", out, re.M)
    assert "warm-up" not in out and "smoke" not in out  # --no-verify
    assert "Traceback" not in a.result.stderr


@pytest.mark.parametrize("env", [None, "prod"])
def test_apply_qwen3_8b_with_secrets_and_autoscaling(plane, tmp_path, env):
    from liftdeploy.manifest import load

    module = "qwen3_8b" + (f"_{env}" if env else "")
    environment = "prod" if env == "prod" else "main"
    a = apply_copy(plane, tmp_path, "qwen3-8b.toml", env, module)
    (create,) = a.calls("AppCreate")
    assert create.environment_name == environment
    (publish,) = a.calls("AppPublish")
    assert (publish.name, publish.deployment_tag) == ("qwen3-structured", tag_of(a.manifest))
    assert set(publish.function_ids) == {"web_qwen3_structured_health", "Inference.*", "business_hours_start",
                                         "business_hours_end"}

    ranks = a.functions["Inference.*"]
    if env == "prod":
        assert gpus(ranks) == ["H100", "A100-80GB"]
    else:  # `any` expanded to the cheapest few other GPUs that fit, after the two named ones
        chain = gpus(ranks)
        assert chain == ["L40S", "A100-80GB", "L4", "A10G", "A100-40GB"]
        assert chain == load(a.manifest, env).manifest.gpu_chain()
    fn = ranks[0]
    min_c, max_c = (1, 8) if env == "prod" else (0, 4)
    auto = fn.autoscaler_settings
    assert (auto.min_containers, auto.max_containers, auto.buffer_containers, auto.scaledown_window) == (
        min_c, max_c, 1, 600)
    assert (fn.warm_pool_size, fn.concurrency_limit, fn._experimental_buffer_containers) == (min_c, max_c, 1)
    assert (fn.max_concurrent_inputs, fn.target_concurrent_inputs) == (32, 24)
    assert (fn.timeout_secs, fn.startup_timeout_secs, fn.task_idle_timeout_secs) == (600, 1200, 600)
    # the Hugging Face secret and the bearer-token secret, both looked up by name, with the keys they must hold
    required = {req.deployment_name: list(req.required_keys) for req in a.calls("SecretGetOrCreate")}
    assert required == {"huggingface": ["HF_TOKEN"], "qwen3-api-token": ["LIFTDEPLOY_API_TOKEN"]}
    assert {req.environment_name for req in a.calls("SecretGetOrCreate")} == {environment}
    assert list(fn.secret_ids) == [a.secrets[(environment, "huggingface")], a.secrets[(environment, "qwen3-api-token")]]
    assert {req.environment_name for req in a.calls("VolumeGetOrCreate")} == {environment}
    assert {m.mount_path for m in fn.volume_mounts} == {"/models", "/root/.cache/vllm"}
    # bearer endpoints: the app checks the token, so Modal's proxy auth stays off
    assert web_endpoints(fn) == {f"web_qwen3_structured_{kind}": (f"qwen3-structured-{kind}", False)
                                 for kind in ("warmup", "generate", "openai")}
    (health,) = a.functions["web_qwen3_structured_health"]
    assert health.resources.gpu_config.count == 0
    assert health.webhook_config.requested_suffix == "qwen3-structured-health"
    # business hours: Modal's autoscaler on a schedule, in the manifest's time zone, without a GPU
    for name, cron in (("business_hours_start", "0 8 * * 1-5"), ("business_hours_end", "0 18 * * 1-5")):
        (scheduled,) = a.functions[name]
        assert (scheduled.schedule.cron.cron_string, scheduled.schedule.cron.timezone) == (cron, "Europe/Berlin")
        assert scheduled.resources.gpu_config.count == 0
    # the GPU class snapshots the sleeping engine (CPU and GPU memory)
    assert fn.checkpointing_enabled and fn.experimental_options == {"enable_gpu_snapshot": "True"}

    state = a.state
    assert (state["env"], state["environment"], state["tag"], state["app_id"]) == (
        env, environment, tag_of(a.manifest), publish.app_id)
    assert plane.deployed_app("qwen3-structured", environment).app_id == publish.app_id
    assert set(state["urls"]) == {f"qwen3-structured-{kind}" for kind in ("health", "warmup", "generate", "openai")}
    assert state["settings"]["scaling.min_containers"] == min_c
    assert (a.folder / f"{module}.py").is_file()


def test_apply_qwen3_coder_on_sglang(plane, tmp_path):
    """The seeds' SGLang deployment goes through the same apply as the vLLM ones."""
    a = apply_copy(plane, tmp_path, "qwen3-coder-30b.toml", None, "qwen3_coder_30b")
    (publish,) = a.calls("AppPublish")
    assert (publish.name, publish.deployment_tag) == ("lift-sys-coder", tag_of(a.manifest))
    assert set(publish.function_ids) == {"web_lift_sys_coder_health", "Inference.*"}
    ranks = a.functions["Inference.*"]
    assert gpus(ranks) == ["A100-80GB", "H100"]  # 30.5B parameters held: 80 GB GPUs only
    fn = ranks[0]
    assert {m.mount_path: m.volume_id for m in fn.volume_mounts} == {
        "/models": a.volumes[("main", "lift-sys-models")],
        "/root/.cache/sglang-jit": a.volumes[("main", "lift-sys-sglang-cache")],
    }
    assert (fn.timeout_secs, fn.startup_timeout_secs, fn.task_idle_timeout_secs) == (600, 900, 300)
    assert (fn.max_concurrent_inputs, fn.target_concurrent_inputs) == (20, 0)
    assert web_endpoints(fn) == {f"web_lift_sys_coder_{kind}": (f"lift-sys-coder-{kind}", True)
                                 for kind in ("warmup", "generate", "openai")}
    (health,) = a.functions["web_lift_sys_coder_health"]
    assert health.resources.gpu_config.count == 0
    assert health.webhook_config.requested_suffix == "lift-sys-coder-health"

    # The image: SGLang and its stack pinned, its JIT caches on the cache volume.
    commands = "\n".join(c for req in a.calls("ImageGetOrCreate") for c in req.image.dockerfile_commands)
    assert "flashinfer-python==0.5.0 sglang==0.5.4.post3 transformers==4.57.1 xgrammar==0.1.25" in commands
    assert "ENV SGLANG_DG_CACHE_DIR=/root/.cache/sglang-jit/deep_gemm" in commands
    assert "vllm" not in commands
    uploaded = {name: data for files in plane.mounts.values() for name, data in files.items()}
    module = (a.folder / "qwen3_coder_30b.py").read_bytes()
    assert uploaded["/root/qwen3_coder_30b.py"] == module
    assert b'"--grammar-backend",\n    "llguidance"' in module

    state = a.state
    assert state["settings"]["engine.kind"] == "sglang" and state["settings"]["image.sglang"] == "0.5.4.post3"
    assert set(state["urls"]) == {f"lift-sys-coder-{kind}" for kind in ("health", "warmup", "generate", "openai")}
    assert "Traceback" not in a.result.stderr
    plan = liftdeploy(None, "plan", "qwen3-coder-30b.toml", cwd=a.folder)
    assert plan.returncode == 0 and "No changes." in plan.stdout


# ## plan against the recorded state


def test_plan_after_apply_says_no_changes(applied32):
    result = liftdeploy(None, "plan", "qwen32b.toml", cwd=applied32.folder)
    assert result.returncode == 0, output(result)
    assert "No changes." in result.stdout
    assert tag_of(applied32.manifest) in result.stdout
    # what the render uses, not the manifest's unset value (it printed "grammar backend None")
    assert "vLLM 0.9.2, grammar backend guidance, whitespace spaced" in result.stdout
    assert "Plan:" not in result.stdout


def test_plan_shows_an_edited_setting(applied32, tmp_path):
    shutil.copytree(applied32.folder, tmp_path, dirs_exist_ok=True)
    edit(tmp_path / "qwen32b.toml", "scaledown_window = 300", "scaledown_window = 120")
    result = liftdeploy(None, "plan", "qwen32b.toml", cwd=tmp_path)
    assert result.returncode == 0, output(result)
    out = result.stdout
    assert "No changes." not in out
    assert out.rstrip().endswith("Plan: 0 to add, 1 to change (0 with a cold start, 1 in place), 0 to remove.")
    assert [line for line in out.splitlines() if re.match(r"^  (-/\+|[-+~]) ", line)] == [
        "  ~   scaling.scaledown_window: 300 → 120   (in place)"]


def test_plan_shows_added_and_removed_settings(applied32, tmp_path):
    shutil.copytree(applied32.folder, tmp_path, dirs_exist_ok=True)
    manifest = tmp_path / "qwen32b.toml"
    edit(manifest, "startup_timeout = 900\n", "startup_timeout = 900\nmax_containers = 3\n")
    edit(manifest, 'packages = ["hf-transfer==0.1.9"]\n', "")
    result = liftdeploy(None, "plan", "qwen32b.toml", cwd=tmp_path)
    assert result.returncode == 0, output(result)
    assert "  +   scaling.max_containers: 3" in result.stdout.splitlines()
    assert "  -   image.hf-transfer: 0.1.9" in result.stdout.splitlines()
    assert "Plan: 1 to add, 0 to change, 1 to remove." in result.stdout


def test_plan_without_state_creates_everything(tmp_path):
    shutil.copy(DEPLOYMENTS / "qwen32b.toml", tmp_path)
    result = liftdeploy(None, "plan", "qwen32b.toml", cwd=tmp_path)
    assert result.returncode == 0, output(result)
    assert "No previous apply is recorded: the whole deployment will be created (a cold start)." in result.stdout
    assert re.search(r"^Plan: [1-9]\d* to add, 0 to change, 0 to remove\.$", result.stdout, re.M)
    assert not (tmp_path / ".liftdeploy").exists() and not (tmp_path / "qwen32b.py").exists()  # plan writes nothing


# ## apply: failures leave the last good render and state untouched

FAILURES = [
    ("ImageGetOrCreate", "injected: image definition refused"),
    ("VolumeGetOrCreate", "injected: volume lift-sys-models is not yours"),
    ("FunctionCreate", "injected: GPU type not allowed"),
    ("AppPublish", "injected: publish refused"),
    ("image build", "uv: no matching distribution for vllm==0.9.2"),
]


@pytest.mark.parametrize("method, message", FAILURES, ids=[f[0].replace(" ", "-") for f in FAILURES])
def test_failed_deploy_keeps_previous_render_and_state(applied32, armed, tmp_path, method, message):
    cp = armed
    shutil.copytree(applied32.folder, tmp_path, dirs_exist_ok=True)
    manifest = tmp_path / "qwen32b.toml"
    # A real change that needs a deploy, and an image layer no earlier test has built (so a build must happen).
    edit(manifest, "timeout = 600", "timeout = 660")
    edit(manifest, 'TOKENIZERS_PARALLELISM = "false" }',
         f'TOKENIZERS_PARALLELISM = "false", LIFTDEPLOY_TEST_RUN = "{uuid.uuid4().hex}" }}')
    before = snapshot(tmp_path)
    previous = cp.deployed_app("lift-sys-inference")
    previous_tag, previous_version = previous.deployment_tag, previous.version
    if method == "image build":
        cp.fail_image_build(message)
    else:
        cp.fail(method, grpclib.Status.FAILED_PRECONDITION, message, times=None)
    start = len(cp.requests)

    result = liftdeploy(cp, "apply", "qwen32b.toml", "--yes", "--no-verify", cwd=tmp_path)

    assert result.returncode == 1, output(result)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.startswith("error: deploy failed: "), output(result)
    assert message in result.stderr.split("\nhint: ")[0]  # Modal's own reason, before the hint
    assert "hint: " in result.stderr
    assert "✓ deploy" not in result.stdout and "applied " not in result.stdout
    # the failure happened where it was injected
    methods = [m for m, _ in list(cp.requests)[start:]]
    if method == "image build":
        assert "ImageJoinStreaming" in methods
    else:
        assert method in methods
    if method != "AppPublish":
        assert "AppPublish" not in methods
    # nothing beside the manifest changed: same rendered module, same state, byte for byte
    assert snapshot(tmp_path) == before
    # and Modal still runs the previous deployment
    current = cp.deployed_app("lift-sys-inference")
    assert current is previous and (current.deployment_tag, current.version) == (previous_tag, previous_version)


# ## apply: refused before anything is deployed


def assert_nothing_deployed(cp: ModalControlPlane, start: int, folder: Path, before: dict[str, bytes]) -> None:
    methods = [m for m, _ in list(cp.requests)[start:]]
    assert "AppCreate" not in methods and "AppPublish" not in methods, methods
    assert snapshot(folder) == before


def test_apply_refuses_a_manifest_that_fails_check(plane, tmp_path):
    manifest = tmp_path / "qwen32b.toml"
    shutil.copy(DEPLOYMENTS / "qwen32b.toml", manifest)
    edit(manifest, 'gpu = ["A100-80GB", "H100"]', 'gpu = ["L4"]')  # a 32B model in 24 GB
    before, start = snapshot(tmp_path), len(plane.requests)
    result = liftdeploy(plane, "apply", "qwen32b.toml", "--yes", "--no-verify", cwd=tmp_path)
    assert result.returncode == 1, output(result)
    assert "error[gpu-memory]" in result.stderr
    assert "error: check failed: 1 error(s); nothing was deployed" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_deployed(plane, start, tmp_path, before)
    assert plane.method_names()[start:] == []  # not even a connection to Modal


def test_apply_refuses_a_conflicting_transformers_pin(plane, tmp_path):
    from liftdeploy import compat

    if not hasattr(compat, "pin_findings"):
        pytest.skip("liftdeploy.compat.pin_findings has not landed yet")
    manifest = tmp_path / "qwen32b.toml"
    shutil.copy(DEPLOYMENTS / "qwen32b.toml", manifest)
    edit(manifest, 'transformers = "4.53.0"', 'transformers = "4.57.0"')  # breaks vllm 0.9.2 at import
    before, start = snapshot(tmp_path), len(plane.requests)
    result = liftdeploy(plane, "apply", "qwen32b.toml", "--yes", "--no-verify", cwd=tmp_path)
    assert result.returncode == 1, output(result)
    assert "image.pins.transformers" in result.stderr
    assert "nothing was deployed" in result.stderr and "Traceback" not in result.stderr
    assert plane.method_names()[start:] == []
    assert_nothing_deployed(plane, start, tmp_path, before)


# `apply --env dev` judges exactly the target it deploys: the base merged with `[env.dev]`.
# An error the env shares with the base, or a secret written anywhere in the file, blocks it.
SHARED_ERRORS = {
    "pin-shared-with-base": ('transformers = "4.53.0"', 'transformers = "4.57.0"', "error[vllm-transformers-aimv2]"),
    "secret-value-in-the-file": ('TOKENIZERS_PARALLELISM = "false"',
                                 'TOKENIZERS_PARALLELISM = "false", HF_TOKEN = "hf_' + "a1B2c3D4e5" * 4 + '"',
                                 "error[secret-value]"),
}


@pytest.mark.parametrize("case", list(SHARED_ERRORS), ids=list(SHARED_ERRORS))
def test_apply_env_refuses_what_check_finds_on_that_env(plane, tmp_path, case):
    old, new, shown = SHARED_ERRORS[case]
    manifest = tmp_path / "qwen32b.toml"
    shutil.copy(DEPLOYMENTS / "qwen32b.toml", manifest)
    edit(manifest, old, new)  # in the base; `[env.dev]` changes neither
    before, start = snapshot(tmp_path), len(plane.requests)
    result = liftdeploy(plane, "apply", "qwen32b.toml", "--env", "dev", "--yes", "--no-verify", cwd=tmp_path)
    assert result.returncode == 1, output(result)
    assert shown in result.stderr and "nothing was deployed" in result.stderr, output(result)
    assert "Traceback" not in result.stderr
    assert plane.method_names()[start:] == []
    assert_nothing_deployed(plane, start, tmp_path, before)


@pytest.mark.parametrize("stdin", ["n\n", None], ids=["answers-no", "stdin-closed"])
def test_apply_without_yes_deploys_nothing_unless_confirmed(plane, tmp_path, stdin):
    shutil.copy(DEPLOYMENTS / "qwen32b.toml", tmp_path)
    before, start = snapshot(tmp_path), len(plane.requests)
    result = liftdeploy(plane, "apply", "qwen32b.toml", "--no-verify", cwd=tmp_path, stdin=stdin)
    assert result.returncode != 0, output(result)
    assert "Deploy this?" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    if stdin is not None:
        assert "cancelled; nothing was deployed" in result.stdout
    # Only the questions about the environment were asked (`modal_env`); nothing was created.
    assert set(plane.method_names()[start:]) <= LOOKUPS
    assert snapshot(tmp_path) == before


# ## an env overlay, then destroy


def test_apply_env_overlay_then_destroy(plane, tmp_path):
    a = apply_copy(plane, tmp_path, "qwen32b.toml", "dev", "qwen32b_dev")
    (create,) = a.calls("AppCreate")
    assert create.environment_name == "dev"
    (publish,) = a.calls("AppPublish")
    assert publish.name == "lift-sys-inference-dev"
    deployed = plane.deployed_app("lift-sys-inference-dev", "dev")
    assert deployed is not None and deployed.app_id == publish.app_id
    fn = a.functions["Inference.*"][0]
    assert gpus(a.functions["Inference.*"]) == ["A10G", "L4"]
    assert fn.task_idle_timeout_secs == 120 and fn.autoscaler_settings.scaledown_window == 120
    assert {req.environment_name for req in a.calls("VolumeGetOrCreate")} == {"dev"}
    state = a.state
    assert (state["env"], state["environment"], state["app_name"]) == ("dev", "dev", "lift-sys-inference-dev")
    assert state["settings"]["model.id"] == "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert (tmp_path / "qwen32b_dev.py").is_file()

    plan = liftdeploy(None, "plan", "qwen32b.toml", "--env", "dev", cwd=tmp_path)
    assert "No changes." in plan.stdout, output(plan)

    start = len(plane.requests)
    result = liftdeploy(plane, "destroy", "qwen32b.toml", "--env", "dev", "--yes", cwd=tmp_path)
    assert result.returncode == 0, output(result)
    stops = [req for m, req in list(plane.requests)[start:] if m == "AppStop"]
    assert [s.app_id for s in stops] == [publish.app_id]
    assert plane.deployed_app("lift-sys-inference-dev", "dev") is None
    assert plane.deployed_app("lift-sys-inference", "main") is not None  # the base env is untouched
    assert not state_file(tmp_path, "qwen32b_dev").exists()
    assert (tmp_path / "qwen32b_dev.py").is_file()  # the rendered module is source: it stays

    # After destroy, nothing is deployed: plan must not claim the deployment matches.
    plan = liftdeploy(None, "plan", "qwen32b.toml", "--env", "dev", cwd=tmp_path)
    assert plan.returncode == 0, output(plan)
    assert "No changes." not in plan.stdout
    assert "the whole deployment will be created" in plan.stdout

    # A second destroy: Modal says the app is already stopped, and the command fails.
    again = liftdeploy(plane, "destroy", "qwen32b.toml", "--env", "dev", "--yes", cwd=tmp_path)
    assert again.returncode != 0 and "already stopped" in again.stdout + again.stderr, output(again)


def test_destroy_without_yes_stops_nothing(plane, tmp_path):
    shutil.copy(DEPLOYMENTS / "qwen32b.toml", tmp_path)
    start = len(plane.requests)
    result = liftdeploy(plane, "destroy", "qwen32b.toml", cwd=tmp_path, stdin="n\n")
    assert result.returncode != 0, output(result)
    assert "Stop app lift-sys-inference in environment main?" in result.stdout
    assert plane.method_names()[start:] == []


# ## apply with verification: warm-up and smoke test against a local server


def test_apply_with_verification_against_a_local_server(tmp_path, monkeypatch):
    """The double hands out URLs on 127.0.0.1, where the rendered module's own endpoint apps
    answer from the local CPU engine: apply then warms up and smoke-tests for real."""
    pytest.importorskip("liftdeploy.local.engine")
    from liftdeploy.local.server import LocalServer, build, local_engine
    from liftdeploy.manifest import load

    manifest = tmp_path / "qwen32b.toml"
    shutil.copy(DEPLOYMENTS / "qwen32b.toml", manifest)
    monkeypatch.delenv("LIFTDEPLOY_API_TOKEN", raising=False)  # build() may set it: restored afterwards
    creds = {"LIFTDEPLOY_PROXY_KEY": "wk-applytest", "LIFTDEPLOY_PROXY_SECRET": "ws-applytest"}
    for name, value in creds.items():
        monkeypatch.setenv(name, value)
    loaded = load(manifest)
    engine = local_engine(loaded, model="smoke")
    engine.start()
    router = build(loaded, engine)
    with LocalServer(router) as server, ModalControlPlane(web_url_base=server.url) as cp:
        result = liftdeploy(cp, "apply", "qwen32b.toml", "--yes", "--timeout", "120", cwd=tmp_path, env=creds)
        assert cp.errors == []
    assert result.returncode == 0, output(result)
    for step in ("deploy", "record state", "warm-up", "smoke test"):
        assert re.search(rf"^✓ {step} \([\d.]+ s\)", result.stdout, re.M), output(result)
    assert re.search(r"^✓ smoke test .*finish_reason=(stop|length)", result.stdout, re.M)
    state = json.loads(state_file(tmp_path, "qwen32b").read_text())
    assert state["urls"] == {label: f"{server.url}/{label}"
                             for label in (f"lift-sys-inference-{kind}" for kind in ("health", "generate", "warmup"))}
