"""A local test double of Modal's control plane, speaking Modal's real gRPC protocol.

The `modal` client talks gRPC (grpclib, HTTP/2 without TLS for http:// URLs) to
``MODAL_SERVER_URL``.  This module serves the service defined by the client's own protocol
package (``modal_proto.api_grpc.ModalClientBase``) on 127.0.0.1, so ``modal deploy`` and
``App.deploy()`` run their real code paths against it, with no Modal account and no network.

Every request is recorded as ``(method_name, decoded protobuf message)`` so that tests can
assert what Modal would have received, and any RPC can be made to fail with a chosen gRPC
status (:meth:`ModalControlPlane.fail`), or wait first (:meth:`ModalControlPlane.delay`).  Every RPC of
the service is routed: the ones below
have behaviour, all others answer ``UNIMPLEMENTED`` naming the method, so a gap is obvious.

Served RPCs (what ``modal deploy`` / ``App.deploy()`` / ``modal app stop`` call):

* session: ``ClientHello``, ``EnvironmentGetOrCreate`` (builder 2025.06), ``EnvironmentList``,
  ``WorkspaceNameLookup``. Environments: by default every name exists (the default one with an
  empty web suffix, any other with its own name as suffix); pass ``environments={name: web_suffix}``
  (or call :meth:`ModalControlPlane.add_environment`) and only those exist: anything else is
  ``NOT_FOUND``, as on a workspace where it was never created
* apps: ``AppGetByDeploymentName``, ``AppCreate``, ``AppGetLayout``, ``AppHeartbeat``,
  ``AppPublish``, ``AppClientDisconnect``, ``AppGetLifecycle``, ``AppLookup``, ``AppStop``,
  ``TaskList`` (always no containers)
* images: ``ImageGetOrCreate`` (content-addressed ``im-`` ids; first sight is "not built"),
  ``ImageJoinStreaming`` (streams one fake log line, then ``GENERIC_STATUS_SUCCESS`` with
  ``ImageMetadata``; or a failure, see :meth:`ModalControlPlane.fail_image_build`)
* storage: ``VolumeGetOrCreate`` (honours create-if-missing), ``SecretGetOrCreate`` (secrets must
  be added first with :meth:`ModalControlPlane.add_secret`, like on a real workspace)
* mounts: ``MountBatchedCheckExistence``, ``MountPutFile`` (stores inline file data, replies
  ``exists=True``), ``MountGetOrCreate`` (keeps the file contents: :attr:`mounts`)
* lookups and autoscaler: ``ClassGet``, ``FunctionGet`` (objects of a deployed app, by tag),
  ``FunctionUpdateSchedulingParams`` (``update_autoscaler``: overrides kept in
  :attr:`autoscaler_overrides`, answered merged over the deployed settings)
* functions: ``FunctionPrecreate``, ``FunctionCreate`` (answers web URLs
  ``https://<workspace>[-<web suffix>]--<label>.modal.run``; a generated host over 63 characters
  is cut to 56 plus ``-`` and 6 hex digits of its SHA-256, Modal's documented truncation),
  ``ClassCreate``

Helper API (see the methods for details)::

    with ModalControlPlane() as cp:          # serves on 127.0.0.1:<free port>, own thread
        cp.add_secret("huggingface", {"HF_TOKEN": "x"})
        cp.fail("FunctionCreate", grpclib.Status.FAILED_PRECONDITION, "no", times=None)
        cp.delay("AppPublish", 30)           # hold every AppPublish call (None: stop)
        subprocess.run([..., "-m", "modal", "deploy", path], env={**os.environ, **cp.env()})
        with cp.configured():                # or in-process: env vars + fresh Client.from_env()
            app.deploy(name="x", tag="v1")
        cp.requests / cp.calls("AppPublish") / cp.method_names()
        cp.created_functions()["Inference.*"]  # one api_pb2.Function per GPU rank
        cp.deployed_app("x"), cp.volumes, cp.secrets, cp.images, cp.mounts, cp.web_url(label)

Not served: ``BlobCreate`` (files above modal's inline limit, 4 MiB, would need an HTTP blob
store) and everything used only at run time (function calls, sandboxes, logs, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import secrets as _secrets
import string
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpclib
import grpclib.const
import grpclib.server
from google.protobuf import empty_pb2, json_format
from google.protobuf.message import Message
from grpclib.exceptions import GRPCError
from modal_proto import api_grpc, api_pb2
from typing_extensions import Self

_ALNUM = string.ascii_letters + string.digits
BUILDER_VERSION = "2025.06"


def new_id(prefix: str) -> str:
    """An object id as Modal makes them: type prefix, dash, 22 alphanumerics (e.g. ``ap-...``)."""
    return f"{prefix}-" + "".join(_secrets.choice(_ALNUM) for _ in range(22))


def _hashed_id(prefix: str, data: bytes) -> str:
    return f"{prefix}-" + hashlib.sha256(data).hexdigest()[:22]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


@dataclass
class DeployedApp:
    app_id: str
    name: str
    environment: str
    state: int = api_pb2.APP_STATE_INITIALIZING
    function_ids: dict[str, str] = field(default_factory=dict)
    class_ids: dict[str, str] = field(default_factory=dict)
    deployment_tag: str = ""
    deployed_at: float = 0.0
    version: int = 0
    stopped_at: float = 0.0
    stopped_by: str = ""


@dataclass
class _Failure:
    status: grpclib.Status
    message: str
    times: int | None  # None: every call


class ModalControlPlane:
    """grpclib server on 127.0.0.1 (own thread and event loop) answering the modal client.

    Use as a context manager (or call :meth:`start` / :meth:`stop`).  State (apps, volumes,
    secrets, images, mounts, functions) lives on the instance and survives between deploys.
    """

    def __init__(self, workspace: str = "test-workspace", environment: str = "main",
                 web_url_base: str | None = None, environments: dict[str, str] | None = None):
        self.workspace = workspace
        # When set (e.g. a `serve --local` server), web URLs point there: `<base>/<label>`.
        self.web_url_base = web_url_base
        self.default_environment = environment
        # name -> web suffix; None: every environment exists (see `web_suffix`)
        self.environments: dict[str, str] | None = None if environments is None else dict(environments)
        self.requests: list[tuple[str, Message]] = []
        self.apps: dict[str, DeployedApp] = {}  # by app id
        self.volumes: dict[tuple[str, str], str] = {}  # (environment, name) -> vo- id
        self.secrets: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}  # -> (st- id, env)
        self.images: dict[str, api_pb2.Image] = {}  # im- id -> definition, once "built"
        self._pending_images: dict[str, api_pb2.Image] = {}  # im- id -> definition, not yet built
        self.mounts: dict[str, dict[str, bytes]] = {}  # mo- id -> {remote filename: content}
        self.functions: dict[str, api_pb2.FunctionCreateRequest] = {}  # fu- id -> last create
        self.autoscaler_overrides: dict[str, api_pb2.AutoscalerSettings] = {}  # fu- id -> update_autoscaler
        self._blobs: dict[str, bytes] = {}  # sha256 hex -> file content
        self._handles: dict[str, Message] = {}  # object id -> handle metadata (for layouts)
        self._function_data: dict[str, api_pb2.FunctionData] = {}  # fu- id -> as FunctionCreate answered
        self._failures: dict[str, _Failure] = {}
        self._delays: dict[str, float] = {}  # method -> seconds each call waits (see delay())
        self.errors: list[tuple[str, Exception]] = []  # exceptions raised by the double's own code
        self._image_build_failure: str | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpclib.server.Server | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ test helper API
    @property
    def url(self) -> str:
        assert self.port, "server not started"
        return f"http://127.0.0.1:{self.port}"

    def env(self, config_path: str | None = None) -> dict[str, str]:
        """Environment variables that point a modal client (CLI or library) at this double."""
        return {
            "MODAL_SERVER_URL": self.url,
            "MODAL_TOKEN_ID": "ak-controlplane-double",
            "MODAL_TOKEN_SECRET": "as-controlplane-double",
            # A config file that does not exist: no real ~/.modal.toml is read.
            "MODAL_CONFIG_PATH": config_path or f"/nonexistent/modal-double-{self.port}.toml",
            "MODAL_PROFILE": "",
            "MODAL_ENVIRONMENT": "",
        }

    @contextlib.contextmanager
    def configured(self) -> Iterator[ModalControlPlane]:
        """Point the modal library *in this process* at the double (for `App.deploy()` tests).

        Sets :meth:`env` in ``os.environ`` and swaps modal's process-wide ``Client.from_env()``
        singleton for a fresh one; both are restored/closed on exit.  (MODAL_CONFIG_PATH only takes
        effect in a new process: modal reads it at import.)"""
        import modal

        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        modal.Client._set_env_client(None)
        try:
            yield self
        finally:
            if modal.client._Client._client_from_env is not None:
                modal.Client.from_env().close()  # the cached client, bound to this double
            modal.Client._set_env_client(None)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def calls(self, name: str) -> list[Message]:
        """The decoded requests of one RPC, in order (failed attempts included)."""
        return [msg for method, msg in list(self.requests) if method == name]

    def method_names(self) -> list[str]:
        return [method for method, _ in list(self.requests)]

    def fail(
        self,
        method: str,
        status: grpclib.Status = grpclib.Status.UNAVAILABLE,
        message: str | None = None,
        times: int | None = 1,
    ) -> None:
        """Make the next `times` calls of `method` fail with `status` (`times=None`: all calls).

        The modal client retries DEADLINE_EXCEEDED, UNAVAILABLE, CANCELLED, INTERNAL and UNKNOWN,
        so to make a deploy fail use another status or `times=None`.
        """
        if method not in rpc_handlers():
            raise ValueError(f"{method!r} is not an RPC of modal.client.ModalClient")
        with self._lock:
            self._failures[method] = _Failure(status, message or f"injected failure in {method}", times)

    def delay(self, method: str, seconds: float | None) -> None:
        """Hold every call of `method` for `seconds` before answering it (`None`: stop delaying).

        The call is recorded (in :attr:`requests`) before the wait, so a test can see that a client is
        waiting there, e.g. to interrupt it mid-deploy. Other calls are served meanwhile."""
        if method not in rpc_handlers():
            raise ValueError(f"{method!r} is not an RPC of modal.client.ModalClient")
        with self._lock:
            if seconds is None:
                self._delays.pop(method, None)
            else:
                self._delays[method] = seconds

    def fail_image_build(self, exception: str = "injected image build failure") -> None:
        """Make the next image build report GENERIC_STATUS_FAILURE with this exception text."""
        self._image_build_failure = exception

    def add_environment(self, name: str, web_suffix: str | None = None) -> None:
        """Create an environment (as `modal environment create` would); its web suffix defaults to
        its name. From then on only declared environments exist."""
        if self.environments is None:
            self.environments = {self.default_environment: ""}
        self.environments[name] = name if web_suffix is None else web_suffix

    def web_suffix(self, environment: str) -> str:
        """The web suffix of an environment (raises NOT_FOUND for an undeclared one)."""
        env = environment or self.default_environment
        if self.environments is None:
            return "" if env == self.default_environment else env
        if env not in self.environments:
            raise GRPCError(grpclib.Status.NOT_FOUND, f"Environment '{env}' not found")
        return self.environments[env]

    def add_secret(self, name: str, env_dict: dict[str, str] | None = None, environment: str = "") -> str:
        """Create a named Secret (as `modal secret create` would); returns its `st-` id."""
        key = (environment or self.default_environment, name)
        secret_id = self.secrets.get(key, (new_id("st"), {}))[0]
        self.secrets[key] = (secret_id, dict(env_dict or {"KEY": "value"}))
        return secret_id

    def deployed_app(self, name: str, environment: str = "") -> DeployedApp | None:
        """The currently deployed (published, not stopped) app of that name, if any."""
        env = environment or self.default_environment
        live = [
            a
            for a in self.apps.values()
            if a.name == name and a.environment == env and a.state == api_pb2.APP_STATE_DEPLOYED
        ]
        return live[-1] if live else None

    def created_functions(self) -> dict[str, list[api_pb2.Function]]:
        """Latest FunctionCreate definition per function name, as a list with one `Function`
        per GPU rank (a `gpu=[...]` fallback list arrives as `function_data.ranked_functions`)."""
        out: dict[str, list[api_pb2.Function]] = {}
        for req in self.calls("FunctionCreate"):
            if req.HasField("function"):
                out[req.function.function_name] = [req.function]
            else:
                ranked = sorted(req.function_data.ranked_functions, key=lambda r: r.rank)
                out[req.function_data.function_name] = [r.function for r in ranked]
        return out

    def web_url(self, label: str, environment: str = "") -> str:
        if self.web_url_base:
            return f"{self.web_url_base.rstrip('/')}/{label}"
        suffix = self.web_suffix(environment)
        host = f"{self.workspace}{'-' + suffix if suffix else ''}--{label}"
        if len(host) > 63:  # https://modal.com/docs/guide/webhook-urls#truncation
            host = host[:56] + "-" + hashlib.sha256(host.encode()).hexdigest()[:6]
        return f"https://{host}.modal.run"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = grpclib.server.Server([_Handlers(self)])
                loop.run_until_complete(self._server.start("127.0.0.1", 0))
                self.port = self._server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="modal-control-plane", daemon=True)
        self._thread.start()
        started.wait(10)
        if errors:
            raise errors[0]

    def stop(self) -> None:
        if self._loop and self._thread:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    # ------------------------------------------------------------------ dispatch
    def _check_failure(self, method: str) -> None:
        with self._lock:
            failure = self._failures.get(method)
            if failure is None:
                return
            if failure.times is not None:
                failure.times -= 1
                if failure.times <= 0:
                    del self._failures[method]
        raise GRPCError(failure.status, failure.message)

    # ------------------------------------------------------------------ RPC implementations
    # Each takes the decoded request and returns the reply (a list of replies for streams).

    def ClientHello(self, req: empty_pb2.Empty) -> api_pb2.ClientHelloResponse:
        return api_pb2.ClientHelloResponse(image_builder_version=BUILDER_VERSION)

    def EnvironmentGetOrCreate(self, req):
        name = req.deployment_name or self.default_environment
        if (
            self.environments is not None
            and name not in self.environments
            and req.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING
        ):
            self.add_environment(name)
        settings = api_pb2.EnvironmentSettings(
            image_builder_version=BUILDER_VERSION, webhook_suffix=self.web_suffix(name)
        )
        return api_pb2.EnvironmentGetOrCreateResponse(
            environment_id=_hashed_id("en", name.encode()),
            metadata=api_pb2.EnvironmentMetadata(name=name, settings=settings),
        )

    def EnvironmentList(self, req):
        names = self.environments or {self.default_environment: ""}
        return api_pb2.EnvironmentListResponse(
            items=[
                api_pb2.EnvironmentListItem(
                    name=name,
                    webhook_suffix=suffix,
                    default=name == self.default_environment,
                    environment_id=_hashed_id("en", name.encode()),
                )
                for name, suffix in names.items()
            ]
        )

    def WorkspaceNameLookup(self, req):
        return api_pb2.WorkspaceNameLookupResponse(workspace_name=self.workspace, username=self.workspace)

    def _env(self, name: str) -> str:
        env = name or self.default_environment
        self.web_suffix(env)  # NOT_FOUND for an environment that was never created
        return env

    def _lifecycle(self, app: DeployedApp) -> api_pb2.AppLifecycle:
        lc = api_pb2.AppLifecycle(app_state=app.state, version=app.version)
        if app.deployed_at:
            lc.deployed_at = app.deployed_at
        if app.stopped_at:
            lc.stopped_at, lc.stopped_by = app.stopped_at, app.stopped_by
        return lc

    def AppGetByDeploymentName(self, req):
        env = self._env(req.environment_name)
        app = self.deployed_app(req.name, env)
        if app is not None:
            return api_pb2.AppGetByDeploymentNameResponse(
                app_id=app.app_id, environment_name=env, lifecycle=self._lifecycle(app)
            )
        stopped = [a for a in self.apps.values() if a.name == req.name and a.environment == env]
        if stopped and stopped[-1].state == api_pb2.APP_STATE_STOPPED:
            return api_pb2.AppGetByDeploymentNameResponse(
                previous_app_id=stopped[-1].app_id,
                environment_name=env,
                lifecycle=self._lifecycle(stopped[-1]),
            )
        return api_pb2.AppGetByDeploymentNameResponse(environment_name=env)

    def AppLookup(self, req):
        app = self.deployed_app(req.app_name, self._env(req.environment_name))
        if app is None:
            raise GRPCError(grpclib.Status.NOT_FOUND, f"App '{req.app_name}' not found")
        return api_pb2.AppLookupResponse(app_id=app.app_id)

    def AppCreate(self, req):
        app = DeployedApp(new_id("ap"), req.description, self._env(req.environment_name), req.app_state)
        self.apps[app.app_id] = app
        page = f"https://modal.com/apps/{self.workspace}/{app.environment}/{app.app_id}"
        return api_pb2.AppCreateResponse(app_id=app.app_id, app_page_url=page, app_logs_url=page + "/logs")

    def _app(self, app_id: str) -> DeployedApp:
        if app_id not in self.apps:
            raise GRPCError(grpclib.Status.NOT_FOUND, f"App {app_id} not found")
        return self.apps[app_id]

    def AppGetLayout(self, req):
        app = self._app(req.app_id)
        layout = api_pb2.AppLayout(function_ids=app.function_ids, class_ids=app.class_ids)
        for object_id in [*app.function_ids.values(), *app.class_ids.values()]:
            handle = self._handles.get(object_id)
            obj = layout.objects.add(object_id=object_id)
            if isinstance(handle, api_pb2.FunctionHandleMetadata):
                obj.function_handle_metadata.CopyFrom(handle)
            elif isinstance(handle, api_pb2.ClassHandleMetadata):
                obj.class_handle_metadata.CopyFrom(handle)
        return api_pb2.AppGetLayoutResponse(app_layout=layout)

    def AppHeartbeat(self, req):
        self._app(req.app_id)
        return empty_pb2.Empty()

    def AppClientDisconnect(self, req):
        app = self._app(req.app_id)
        if app.state == api_pb2.APP_STATE_INITIALIZING:  # a failed first deploy leaves nothing behind
            app.state = api_pb2.APP_STATE_STOPPED
        return empty_pb2.Empty()

    def AppPublish(self, req):
        app = self._app(req.app_id)
        app.state = req.app_state or api_pb2.APP_STATE_DEPLOYED
        app.name = req.name or app.name
        app.function_ids = dict(req.function_ids)
        app.class_ids = dict(req.class_ids)
        app.deployment_tag = req.deployment_tag
        app.deployed_at = time.time()
        app.version += 1
        url = f"https://modal.com/apps/{self.workspace}/{app.environment}/deployed/{app.name}"
        return api_pb2.AppPublishResponse(url=url, deployed_at=app.deployed_at)

    def AppGetLifecycle(self, req):
        return api_pb2.AppGetLifecycleResponse(lifecycle=self._lifecycle(self._app(req.app_id)))

    def AppStop(self, req):
        app = self._app(req.app_id)
        app.state, app.stopped_at = api_pb2.APP_STATE_STOPPED, time.time()
        app.stopped_by = "controlplane-double"
        return empty_pb2.Empty()

    def TaskList(self, req):
        return api_pb2.TaskListResponse()

    def ImageGetOrCreate(self, req):
        key = req.image.SerializeToString(deterministic=True) + req.builder_version.encode()
        image_id = _hashed_id("im", key)
        if image_id in self.images and not req.force_build:  # cache hit: no build to wait for
            return api_pb2.ImageGetOrCreateResponse(
                image_id=image_id,
                result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS),
                metadata=self._image_metadata(req.builder_version),
            )
        self._pending_images[image_id] = req.image
        return api_pb2.ImageGetOrCreateResponse(image_id=image_id)

    @staticmethod
    def _image_metadata(builder_version: str) -> api_pb2.ImageMetadata:
        return api_pb2.ImageMetadata(
            python_version_info="Python 3.12.0 (controlplane double)",
            image_builder_version=builder_version or BUILDER_VERSION,
            workdir="/root",
        )

    def ImageJoinStreaming(self, req) -> list[api_pb2.ImageJoinStreamingResponse]:
        image = self._pending_images.get(req.image_id) or self.images.get(req.image_id)
        if image is None:
            raise GRPCError(grpclib.Status.NOT_FOUND, f"Image {req.image_id} not found")
        commands = "\n".join(image.dockerfile_commands)
        log = api_pb2.TaskLogs(data=f"[double] building {req.image_id}:\n{commands}\n", file_descriptor=1)
        replies = [api_pb2.ImageJoinStreamingResponse(task_logs=[log], entry_id="1")]
        failure, self._image_build_failure = self._image_build_failure, None
        if failure is not None:
            result = api_pb2.GenericResult(
                status=api_pb2.GenericResult.GENERIC_STATUS_FAILURE, exception=failure
            )
            replies.append(api_pb2.ImageJoinStreamingResponse(result=result, entry_id="2", eof=True))
            return replies
        self.images[req.image_id] = self._pending_images.pop(req.image_id, image)
        result = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
        replies.append(
            api_pb2.ImageJoinStreamingResponse(
                result=result, entry_id="2", eof=True, metadata=self._image_metadata(BUILDER_VERSION)
            )
        )
        return replies

    def VolumeGetOrCreate(self, req):
        key = (self._env(req.environment_name), req.deployment_name)
        if key not in self.volumes:
            if req.object_creation_type not in (
                api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
                api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS,
            ):
                raise GRPCError(grpclib.Status.NOT_FOUND, f"Volume '{req.deployment_name}' not found")
            self.volumes[key] = new_id("vo")
        elif req.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS:
            raise GRPCError(grpclib.Status.ALREADY_EXISTS, f"Volume '{req.deployment_name}' already exists")
        meta = api_pb2.VolumeMetadata(
            name=req.deployment_name, version=req.version or api_pb2.VOLUME_FS_VERSION_V1
        )
        return api_pb2.VolumeGetOrCreateResponse(
            volume_id=self.volumes[key], version=meta.version, metadata=meta
        )

    def SecretGetOrCreate(self, req):
        env = self._env(req.environment_name)
        if not req.deployment_name:  # Secret.from_dict / from_dotenv: anonymous, owned by the app
            return api_pb2.SecretGetOrCreateResponse(
                secret_id=new_id("st"), metadata=api_pb2.SecretMetadata(keys=list(req.env_dict))
            )
        key = (env, req.deployment_name)
        if req.object_creation_type in (
            api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
            api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS,
            api_pb2.OBJECT_CREATION_TYPE_CREATE_OVERWRITE_IF_EXISTS,
        ):
            if (
                key in self.secrets
                and req.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS
            ):
                raise GRPCError(
                    grpclib.Status.ALREADY_EXISTS, f"Secret '{req.deployment_name}' already exists"
                )
            self.add_secret(req.deployment_name, dict(req.env_dict), env)
        if key not in self.secrets:
            raise GRPCError(
                grpclib.Status.NOT_FOUND, f"Secret '{req.deployment_name}' not found in environment '{env}'"
            )
        secret_id, env_dict = self.secrets[key]
        missing = [k for k in req.required_keys if k not in env_dict]
        if missing:
            raise GRPCError(
                grpclib.Status.NOT_FOUND,
                f"Secret '{req.deployment_name}' is missing keys: {', '.join(missing)}",
            )
        meta = api_pb2.SecretMetadata(name=req.deployment_name, keys=sorted(env_dict), environment_name=env)
        return api_pb2.SecretGetOrCreateResponse(secret_id=secret_id, metadata=meta)

    def MountBatchedCheckExistence(self, req):
        missing = [h for h in req.sha256_hex_hashes if h not in self._blobs]
        return api_pb2.MountBatchedCheckExistenceResponse(missing_sha256_hex_hashes=missing)

    def MountPutFile(self, req):
        if req.WhichOneof("data_oneof") == "data":
            if hashlib.sha256(req.data).hexdigest() != req.sha256_hex:
                raise GRPCError(grpclib.Status.INVALID_ARGUMENT, "sha256 mismatch")
            self._blobs[req.sha256_hex] = req.data
        elif req.sha256_hex not in self._blobs:
            raise GRPCError(
                grpclib.Status.UNIMPLEMENTED, "blob uploads (BlobCreate) are not served by the double"
            )
        return api_pb2.MountPutFileResponse(exists=True)

    def MountGetOrCreate(self, req):
        files = {f.filename: self._blobs.get(f.sha256_hex, b"") for f in req.files}
        index = "".join(f"{f.filename}:{f.sha256_hex}\n" for f in sorted(req.files, key=lambda f: f.filename))
        digest = hashlib.sha256(index.encode()).hexdigest()
        mount_id = _hashed_id("mo", (req.deployment_name + req.app_id + index).encode())
        self.mounts[mount_id] = files
        return api_pb2.MountGetOrCreateResponse(
            mount_id=mount_id, handle_metadata=api_pb2.MountHandleMetadata(content_checksum_sha256_hex=digest)
        )

    def _label(self, app: DeployedApp, function_name: str, config: api_pb2.WebhookConfig) -> str:
        return config.requested_suffix or _slug(f"{app.name}-{function_name}")[:63]

    def _handle(self, app: DeployedApp, fn: Any, function_id: str) -> api_pb2.FunctionHandleMetadata:
        """Handle metadata for a Function / FunctionPrecreateRequest / FunctionData, with web URLs."""
        meta = api_pb2.FunctionHandleMetadata(
            function_name=fn.function_name,
            function_type=fn.function_type,
            app_id=app.app_id,
            definition_id=_hashed_id("de", function_id.encode()),
        )
        if fn.webhook_config.type:
            meta.web_url = self.web_url(
                self._label(app, fn.function_name, fn.webhook_config), app.environment
            )
        for name, method in fn.method_definitions.items():
            sub = meta.method_handle_metadata[name]
            sub.function_name, sub.function_type = method.function_name, method.function_type
            sub.is_method, sub.use_method_name, sub.app_id = True, name, app.app_id
            if method.webhook_config.type:
                sub.web_url = self.web_url(
                    self._label(app, method.function_name, method.webhook_config), app.environment
                )
        return meta

    def FunctionPrecreate(self, req):
        app = self._app(req.app_id)
        function_id = req.existing_function_id or new_id("fu")
        meta = self._handle(app, req, function_id)
        self._handles[function_id] = meta
        return api_pb2.FunctionPrecreateResponse(function_id=function_id, handle_metadata=meta)

    def FunctionCreate(self, req):
        app = self._app(req.app_id)
        function_id = req.existing_function_id or new_id("fu")
        # The reply always carries a FunctionData with every rank (the client reads it back).
        data = api_pb2.FunctionData()
        if req.HasField("function_data"):  # gpu=[...] fallback list: one ranked Function per GPU
            data.CopyFrom(req.function_data)
        elif req.HasField("function"):
            data.CopyFrom(_function_data_from(req.function))
            data.ranked_functions.add(rank=0, function=req.function)
        if not data.ranked_functions or not data.function_name:
            raise GRPCError(grpclib.Status.INVALID_ARGUMENT, "FunctionCreate without a function definition")
        meta = self._handle(app, data, function_id)
        for target in [data, *(r.function for r in data.ranked_functions)]:
            target.web_url = meta.web_url
            for name, method in target.method_definitions.items():
                method.web_url = meta.method_handle_metadata[name].web_url
        self.functions[function_id] = req
        self._function_data[function_id] = data
        self._handles[function_id] = meta
        return api_pb2.FunctionCreateResponse(
            function_id=function_id,
            function=data.ranked_functions[0].function,
            handle_metadata=meta,
            function_data=data,
        )

    def _deployed_object(self, req, ids: str) -> str:
        app = self.deployed_app(req.app_name, self._env(req.environment_name))
        if app is None:
            raise GRPCError(grpclib.Status.NOT_FOUND, f"App '{req.app_name}' not found")
        object_id = getattr(app, ids).get(req.object_tag)
        if object_id is None:
            raise GRPCError(grpclib.Status.NOT_FOUND, f"'{req.object_tag}' not found in app '{req.app_name}'")
        return object_id

    def ClassGet(self, req):
        class_id = self._deployed_object(req, "class_ids")
        return api_pb2.ClassGetResponse(class_id=class_id, handle_metadata=self._handles.get(class_id))

    def FunctionGet(self, req):
        function_id = self._deployed_object(req, "function_ids")
        return api_pb2.FunctionGetResponse(
            function_id=function_id,
            handle_metadata=self._handles.get(function_id),
            function=self._function_data.get(function_id),
        )

    def FunctionUpdateSchedulingParams(self, req):
        create = self.functions.get(req.function_id)
        if create is None:
            raise GRPCError(grpclib.Status.NOT_FOUND, f"Function {req.function_id} not found")
        override = self.autoscaler_overrides.setdefault(req.function_id, api_pb2.AutoscalerSettings())
        override.MergeFrom(req.settings)  # fields not sent keep their earlier value
        deployed = (create.function_data if create.HasField("function_data") else create.function).autoscaler_settings
        current = api_pb2.AutoscalerSettings()
        current.CopyFrom(deployed)
        current.MergeFrom(override)
        return api_pb2.FunctionUpdateSchedulingParamsResponse(current_settings=current)

    def ClassCreate(self, req):
        self._app(req.app_id)
        class_id = req.existing_class_id or new_id("cs")
        meta = api_pb2.ClassHandleMetadata()
        self._handles[class_id] = meta
        return api_pb2.ClassCreateResponse(class_id=class_id, handle_metadata=meta)


def _function_data_from(fn: api_pb2.Function) -> api_pb2.FunctionData:
    """The FunctionData fields that a Function shares (same name and type), as the server fills them."""
    src, dst = api_pb2.Function.DESCRIPTOR.fields_by_name, api_pb2.FunctionData.DESCRIPTOR.fields_by_name
    shared = {
        k: v
        for k, v in json_format.MessageToDict(fn, preserving_proto_field_name=True).items()
        if k in dst
        and (dst[k].type, dst[k].message_type, dst[k].enum_type)
        == (src[k].type, src[k].message_type, src[k].enum_type)
    }
    return json_format.ParseDict(shared, api_pb2.FunctionData())


@functools.cache
def rpc_handlers() -> dict[str, grpclib.const.Handler]:
    """Every RPC of modal.client.ModalClient: name -> Handler (cardinality, request/reply types)."""
    base = api_grpc.ModalClientBase
    concrete = type("_AllMethods", (base,), {name: None for name in base.__abstractmethods__})
    mapping = base.__mapping__(concrete())
    return {path.rsplit("/", 1)[1]: handler for path, handler in mapping.items()}


class _Handlers:
    """The grpclib handler object: routes every RPC through recording, failure injection and the
    implementation on ModalControlPlane (or UNIMPLEMENTED)."""

    def __init__(self, plane: ModalControlPlane):
        self.plane = plane

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            f"/modal.client.ModalClient/{name}": grpclib.const.Handler(
                self._make(name, h.cardinality), h.cardinality, h.request_type, h.reply_type
            )
            for name, h in rpc_handlers().items()
        }

    def _make(self, name: str, cardinality: grpclib.const.Cardinality) -> Callable:
        plane = self.plane

        async def handle(stream: grpclib.server.Stream) -> None:
            request = await stream.recv_message()
            plane.requests.append((name, request))
            with plane._lock:
                pause = plane._delays.get(name)
            if pause:
                await asyncio.sleep(pause)
            plane._check_failure(name)
            impl = getattr(plane, name, None) if name[:1].isupper() else None
            if impl is None:
                raise GRPCError(
                    grpclib.Status.UNIMPLEMENTED, f"{name} is not implemented by the control-plane double"
                )
            try:
                reply = impl(request)
            except GRPCError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug in the double: fail loudly with a status modal does not retry
                plane.errors.append((name, exc))
                raise GRPCError(grpclib.Status.DATA_LOSS, f"control-plane double crashed in {name}: {exc!r}") from exc
            if cardinality is grpclib.const.Cardinality.UNARY_STREAM:
                for item in reply:
                    await stream.send_message(item)
            else:
                await stream.send_message(reply)

        return handle
