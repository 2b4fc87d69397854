"""Deploy a vLLM-style Modal app against the local control-plane double (tests/support).

The real `modal` client (CLI and library) runs its deploy code paths over gRPC against
ModalControlPlane on 127.0.0.1; the tests then assert on the decoded protobuf requests that
Modal's servers would have received.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import grpclib
import pytest
from grpclib.client import Channel
from grpclib.exceptions import GRPCError
from modal_proto import api_grpc, api_pb2

from tests.support.modal_control_plane import ModalControlPlane

APP_SOURCE = textwrap.dedent(
    """
    import modal

    app = modal.App("liftdeploy-sample")

    image = (
        modal.Image.from_registry("nvidia/cuda:12.4.1-devel-ubuntu22.04", add_python="3.12")
        .uv_pip_install("vllm==0.9.2", "xgrammar==0.1.19", "fastapi[standard]")
        .env({"HF_HUB_ENABLE_HF_TRANSFER": "1", "VLLM_USE_V1": "1"})
    )
    web_image = modal.Image.debian_slim(python_version="3.12").uv_pip_install("fastapi[standard]")

    models = modal.Volume.from_name("liftdeploy-models", create_if_missing=True)
    cache = modal.Volume.from_name("liftdeploy-vllm-cache", create_if_missing=True)
    hf = modal.Secret.from_name("huggingface")


    @app.function(image=web_image)
    @modal.asgi_app(label="sample-gateway")
    def gateway():
        from fastapi import FastAPI

        return FastAPI()


    @app.cls(
        image=image,
        gpu=["H100", "A100-80GB", "L40S:2"],
        volumes={"/models": models, "/root/.cache/vllm": cache},
        secrets=[hf],
        timeout=1800,
        startup_timeout=900,
        scaledown_window=300,
        min_containers=1,
        max_containers=4,
        buffer_containers=2,
    )
    @modal.concurrent(max_inputs=32, target_inputs=16)
    class Inference:
        @modal.enter()
        def load(self):
            import vllm  # noqa: F401  (heavy import: only ever inside the container)

            self.engine = None

        @modal.asgi_app(label="sample-extract", requires_proxy_auth=True)
        def extract(self):
            from fastapi import FastAPI

            return FastAPI()

        @modal.asgi_app(label="sample-classify", requires_proxy_auth=False)
        def classify(self):
            from fastapi import FastAPI

            return FastAPI()
    """
)


@pytest.fixture
def control_plane():
    with ModalControlPlane() as cp:
        cp.add_secret("huggingface", {"HF_TOKEN": "hf_dummy"})
        yield cp
        assert cp.errors == [], f"the double itself crashed: {cp.errors}"


@pytest.fixture
def app_file(tmp_path: Path) -> Path:
    # A unique module name per test: the in-process tests import it.
    path = tmp_path / f"sample_app_{uuid.uuid4().hex[:8]}.py"
    path.write_text(APP_SOURCE)
    return path


def modal_cli(cp: ModalControlPlane, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(cp.env())
    env["COLUMNS"] = "200"  # keep rich from wrapping URLs
    return subprocess.run(
        [sys.executable, "-m", "modal", *args],
        check=False,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def import_app(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module.app


def assert_deployment_recorded(cp: ModalControlPlane, name: str, tag: str, app_file: Path) -> None:
    methods = cp.method_names()
    assert methods[:2] == ["AppGetByDeploymentName", "AppCreate"]
    assert methods[-1] == "AppPublish"
    assert "FunctionCreate" in methods and "ClassCreate" in methods

    functions = cp.created_functions()
    assert set(functions) == {"gateway", "Inference.*"}

    # --- the inference class: one ranked Function per GPU in the fallback list
    ranks = functions["Inference.*"]
    gpus = [(f.resources.gpu_config.gpu_type, f.resources.gpu_config.count) for f in ranks]
    assert gpus == [("H100", 1), ("A100-80GB", 1), ("L40S", 2)]
    cls_fn = ranks[0]
    for f in ranks:  # everything but the GPU is identical across ranks
        assert f.volume_mounts == cls_fn.volume_mounts and f.secret_ids == cls_fn.secret_ids
    assert cls_fn.is_class
    env = cp.default_environment
    assert {m.mount_path: m.volume_id for m in cls_fn.volume_mounts} == {
        "/models": cp.volumes[(env, "liftdeploy-models")],
        "/root/.cache/vllm": cp.volumes[(env, "liftdeploy-vllm-cache")],
    }
    assert list(cls_fn.secret_ids) == [cp.secrets[(env, "huggingface")][0]]
    assert cls_fn.timeout_secs == 1800
    assert cls_fn.startup_timeout_secs == 900
    assert cls_fn.task_idle_timeout_secs == 300
    assert (cls_fn.warm_pool_size, cls_fn.concurrency_limit, cls_fn._experimental_buffer_containers) == (
        1,
        4,
        2,
    )
    auto = cls_fn.autoscaler_settings
    assert (auto.min_containers, auto.max_containers, auto.buffer_containers, auto.scaledown_window) == (
        1,
        4,
        2,
        300,
    )
    assert (cls_fn.max_concurrent_inputs, cls_fn.target_concurrent_inputs) == (32, 16)
    methods_def = cls_fn.method_definitions
    assert set(methods_def) == {"extract", "classify"}  # @modal.enter is a lifecycle hook, not a method
    web = {
        k: (m.webhook_config.type, m.webhook_config.requested_suffix, m.webhook_config.requires_proxy_auth)
        for k, m in methods_def.items()
    }
    assert web == {
        "extract": (api_pb2.WEBHOOK_TYPE_ASGI_APP, "sample-extract", True),
        "classify": (api_pb2.WEBHOOK_TYPE_ASGI_APP, "sample-classify", False),
    }

    # --- the image: registry base + python, uv_pip_install, then .env as its own layer
    images = {req.image.dockerfile_commands[-1]: req for req in cp.calls("ImageGetOrCreate")}
    env_layer = next(req for cmd, req in images.items() if cmd == "ENV VLLM_USE_V1=1")
    assert "ENV HF_HUB_ENABLE_HF_TRANSFER=1" in env_layer.image.dockerfile_commands
    commands = "\n".join(c for req in cp.calls("ImageGetOrCreate") for c in req.image.dockerfile_commands)
    assert "FROM nvidia/cuda:12.4.1-devel-ubuntu22.04" in commands
    assert "vllm==0.9.2 xgrammar==0.1.19" in commands
    assert cls_fn.image_id in cp.images  # the image the class runs on was "built"

    # --- the plain web function
    (gateway,) = functions["gateway"]
    assert gateway.webhook_config.type == api_pb2.WEBHOOK_TYPE_ASGI_APP
    assert gateway.webhook_config.requested_suffix == "sample-gateway"
    assert not gateway.webhook_config.requires_proxy_auth
    assert gateway.resources.gpu_config.count == 0

    # --- the module itself was uploaded in a mount the functions reference
    uploaded = {fn: data for files in cp.mounts.values() for fn, data in files.items()}
    assert uploaded[f"/root/{app_file.name}"] == app_file.read_bytes()

    # --- the publication
    publish = cp.calls("AppPublish")[-1]
    assert (publish.name, publish.deployment_tag, publish.app_state) == (
        name,
        tag,
        api_pb2.APP_STATE_DEPLOYED,
    )
    assert set(publish.function_ids) == {"gateway", "Inference.*"}
    assert set(publish.class_ids) == {"Inference"}
    app = cp.deployed_app(name)
    assert app is not None and app.state == api_pb2.APP_STATE_DEPLOYED and app.deployment_tag == tag


def test_cli_deploy_records_what_modal_would_receive(control_plane, app_file):
    result = modal_cli(
        control_plane, "deploy", str(app_file), "--name", "sample-cli", "--tag", "v1", cwd=app_file.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_deployment_recorded(control_plane, "sample-cli", "v1", app_file)
    # The web URLs the double handed back are what `modal deploy` prints.
    for label in ("sample-gateway", "sample-extract", "sample-classify"):
        assert control_plane.web_url(label) in result.stdout
    assert "https://test-workspace--sample-extract.modal.run 🔑" in result.stdout
    assert "App deployed" in result.stdout


def test_python_api_deploy_and_redeploy_reuses_app(control_plane, app_file):
    import modal

    app = import_app(app_file)
    with control_plane.configured(), modal.enable_output():
        app.deploy(name="sample-api", environment_name="main", tag="v2")
    assert_deployment_recorded(control_plane, "sample-api", "v2", app_file)
    first = control_plane.deployed_app("sample-api")
    first_ids = dict(first.function_ids)
    builds = len(control_plane.calls("ImageJoinStreaming"))
    n = len(control_plane.requests)

    with control_plane.configured():
        app.deploy(name="sample-api", environment_name="main", tag="v3")
    second = control_plane.requests[n:]
    assert [m for m, _ in second][:2] == ["AppGetByDeploymentName", "AppGetLayout"]
    assert "AppCreate" not in [m for m, _ in second]
    assert control_plane.deployed_app("sample-api") is first and first.version == 2
    assert first.deployment_tag == "v3" and first.function_ids == first_ids
    # FunctionCreate updated the existing functions rather than making new ones
    existing = {r.existing_function_id for m, r in second if m == "FunctionCreate"}
    assert existing == set(first_ids.values())
    assert len(control_plane.calls("ImageJoinStreaming")) == builds  # every image was a cache hit


def test_cli_app_stop(control_plane, app_file):
    deployed = modal_cli(control_plane, "deploy", str(app_file), "--name", "to-stop", cwd=app_file.parent)
    assert deployed.returncode == 0, deployed.stderr
    app_id = control_plane.deployed_app("to-stop").app_id

    stopped = modal_cli(control_plane, "app", "stop", "to-stop", "--yes", cwd=app_file.parent)
    assert stopped.returncode == 0, stopped.stderr
    (stop,) = control_plane.calls("AppStop")
    assert stop.app_id == app_id and stop.source == api_pb2.APP_STOP_SOURCE_CLI
    assert control_plane.deployed_app("to-stop") is None

    again = modal_cli(control_plane, "app", "stop", "to-stop", "--yes", cwd=app_file.parent)
    assert again.returncode != 0 and "already stopped" in again.stderr


@pytest.mark.parametrize(
    "method, status",
    [
        ("FunctionCreate", grpclib.Status.FAILED_PRECONDITION),
        ("ImageGetOrCreate", grpclib.Status.PERMISSION_DENIED),
    ],
)
def test_cli_deploy_fails_when_an_rpc_fails(control_plane, app_file, method, status):
    control_plane.fail(method, status, message=f"injected: {method} refused", times=None)
    result = modal_cli(control_plane, "deploy", str(app_file), "--name", "doomed", cwd=app_file.parent)
    assert result.returncode != 0
    assert f"injected: {method} refused" in result.stdout + result.stderr
    assert "AppPublish" not in control_plane.method_names()
    assert control_plane.calls("AppClientDisconnect")  # the client tells Modal the deploy failed
    assert control_plane.deployed_app("doomed") is None


def test_python_api_deploy_raises_on_injected_failure(control_plane, app_file):
    import modal.exception

    app = import_app(app_file)
    control_plane.fail("FunctionCreate", grpclib.Status.INVALID_ARGUMENT, "GPU type not allowed", times=None)
    with (
        control_plane.configured(),
        pytest.raises(modal.exception.InvalidError, match="GPU type not allowed"),
    ):
        app.deploy(name="doomed-api")


def test_transient_failure_is_retried_by_the_client(control_plane, app_file):
    control_plane.fail("FunctionCreate", grpclib.Status.UNAVAILABLE, times=1)
    result = modal_cli(control_plane, "deploy", str(app_file), "--name", "flaky", cwd=app_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(control_plane.calls("FunctionCreate")) == 3  # two functions, one attempt retried


def test_image_build_failure_and_missing_secret(control_plane, app_file):
    import modal.exception

    app = import_app(app_file)
    control_plane.fail_image_build("uv: no matching distribution for vllm==0.9.2")
    with (
        control_plane.configured(),
        pytest.raises(modal.exception.ImageBuildError, match="no matching distribution"),
    ):
        app.deploy(name="bad-image")

    # A fresh import: objects hydrated by one deploy (the Secret here) keep their ids in-process.
    fresh = app_file.with_name(f"fresh_{app_file.name}")
    fresh.write_text(APP_SOURCE)
    with ModalControlPlane() as bare:  # no secret "huggingface" in this workspace
        with bare.configured(), pytest.raises(modal.exception.NotFoundError, match="huggingface"):
            import_app(fresh).deploy(name="no-secret")
        assert bare.calls("SecretGetOrCreate")[0].deployment_name == "huggingface"


def test_unserved_rpcs_answer_unimplemented_with_their_name(control_plane):
    import asyncio

    async def call():
        async with Channel("127.0.0.1", control_plane.port) as channel:
            stub = api_grpc.ModalClientStub(channel)
            await stub.DictGetOrCreate(api_pb2.DictGetOrCreateRequest(deployment_name="d"))

    with pytest.raises(GRPCError) as info:
        asyncio.run(call())
    assert info.value.status == grpclib.Status.UNIMPLEMENTED and "DictGetOrCreate" in info.value.message
    assert control_plane.method_names() == ["DictGetOrCreate"]
    with pytest.raises(ValueError):
        control_plane.fail("NoSuchRpc")
