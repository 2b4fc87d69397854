"""Python client for a liftdeploy app: sync and async, cold-start aware.

    from liftdeploy.client import Client
    client = Client.for_manifest("deployments/qwen32b.toml", token=...)
    client.warmup()                       # polls until the model is loaded (600 s default)
    result = client.generate("Create a function add(a, b)", schema)
    result.ir_json                        # parsed JSON; None when `complete` is False

The first request may meet a cold start (the seeds measured 7 minutes for a 32B), so
until one request has succeeded reads wait `Timeouts.cold_read`; afterwards
`Timeouts.read`. Timeouts, connection errors and 502/503/504 are retried with
exponential backoff (honouring Retry-After); 4xx never is. `LIFTDEPLOY_RECORD=record`
saves every response under `LIFTDEPLOY_RECORDINGS` (default `tests/recordings`) and
`LIFTDEPLOY_RECORD=replay` answers from those files without a network.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from . import urls
from .errors import LiftdeployError

RETRY_STATUSES = frozenset({502, 503, 504})
COLD_START_TIMEOUT = 600.0  # seconds: the seeds' 32B took 7 minutes to load


class ClientError(LiftdeployError):
    """A request the server refused (4xx) or that kept failing after retries."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None, hint: str | None = None):
        super().__init__(message, hint)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0
    read: float = 120.0
    cold_read: float = COLD_START_TIMEOUT


@dataclass(frozen=True)
class Generation:
    """The `generate` endpoint's answer."""

    ir_json: Any
    complete: bool  # False when max_tokens cut the output: then ir_json is None
    text: str
    tokens_used: int
    generation_time_ms: float
    finish_reason: str
    model: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Generation:
        return cls(**{name: body[name] for name in cls.__dataclass_fields__})


class EndpointLike(Protocol):
    """An endpoint as the client needs it: the manifest's `Endpoint`, or a `Route`."""

    @property
    def kind(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def auth(self) -> str: ...


@dataclass(frozen=True)
class Route:
    """An endpoint known without a manifest: from a server's index, or the default labels."""

    kind: str
    label: str
    auth: str = "none"


@dataclass(frozen=True)
class Endpoints:
    """Where each endpoint label answers."""

    urls: dict[str, str]
    auth: dict[str, str] = field(default_factory=dict)

    @classmethod
    def at(cls, urls: dict[str, str], endpoints: Iterable[EndpointLike]) -> Endpoints:
        return cls(urls, {ep.label: str(ep.auth) for ep in endpoints})

    @classmethod
    def local(cls, base_url: str, endpoints: Iterable[EndpointLike]) -> Endpoints:
        base = base_url.rstrip("/")
        endpoints = list(endpoints)
        return cls.at({ep.label: f"{base}/{ep.label}" for ep in endpoints}, endpoints)

    @classmethod
    def modal(cls, workspace: str, web_suffix: str, endpoints: Iterable[EndpointLike]) -> Endpoints:
        """Modal's URLs (`urls.modal_urls`) for a deployed app."""
        endpoints = list(endpoints)
        return cls.at(urls.modal_urls(workspace, web_suffix, endpoints), endpoints)

    @staticmethod
    def kinds(endpoints: Iterable[EndpointLike]) -> dict[str, str]:
        """label -> kind, as the clients take it."""
        return {ep.label: str(ep.kind) for ep in endpoints}

    def label(self, kind: str, kinds: dict[str, str]) -> str:
        for label, k in kinds.items():
            if k == kind:
                return label
        raise ClientError(f"this app has no `{kind}` endpoint", hint=f"its endpoints: {', '.join(self.urls)}")


@dataclass
class Recorder:
    """Record responses to fixture files keyed by the request, or replay them offline."""

    directory: Path
    mode: str = "off"  # off | record | replay

    @classmethod
    def from_env(cls) -> Recorder:
        mode = os.environ.get("LIFTDEPLOY_RECORD", "off").lower()
        if mode not in ("off", "record", "replay"):
            raise ClientError(f"LIFTDEPLOY_RECORD is `{mode}`", hint="use `record`, `replay` or `off`")
        return cls(Path(os.environ.get("LIFTDEPLOY_RECORDINGS", "tests/recordings")), mode)

    def path(self, method: str, label: str, body: Any) -> Path:
        key = json.dumps([method, label, body], sort_keys=True, separators=(",", ":"))
        name = label.strip("/").replace("/", "_")  # a label with the path below it: `...-openai/v1/models`
        return self.directory / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def replay(self, method: str, label: str, body: Any) -> tuple[int, Any] | None:
        if self.mode != "replay":
            return None
        path = self.path(method, label, body)
        if not path.exists():
            raise ClientError(f"no recording for this {label} request ({path})",
                              hint="run once with LIFTDEPLOY_RECORD=record against a live endpoint")
        saved = json.loads(path.read_text())
        return saved["status"], saved["response"]

    def record(self, method: str, label: str, body: Any, status: int, response: Any) -> None:
        if self.mode != "record":
            return
        from .render import write_atomic

        saved = {"request": {"method": method, "label": label, "body": body}, "status": status, "response": response}
        write_atomic(self.path(method, label, body), json.dumps(saved, indent=2, sort_keys=True) + "\n")


class _Base:
    """What the sync and async clients share: addresses, auth, timeouts and the retry policy."""

    def __init__(self, endpoints: Endpoints, kinds: dict[str, str], *, token: str | None = None,
                 proxy_auth: tuple[str, str] | None = None, timeouts: Timeouts = Timeouts(),
                 retries: int = 4, backoff: float = 1.0, recorder: Recorder | None = None):
        self.endpoints = endpoints
        self.kinds = kinds  # label -> kind
        self.token = token if token is not None else os.environ.get("LIFTDEPLOY_API_TOKEN")
        env_proxy = (os.environ.get("LIFTDEPLOY_PROXY_KEY"), os.environ.get("LIFTDEPLOY_PROXY_SECRET"))
        self.proxy_auth = proxy_auth or (env_proxy if all(env_proxy) else None)
        self.timeouts = timeouts
        self.retries = retries
        self.backoff = backoff
        self.recorder = recorder or Recorder.from_env()
        self.warm = False
        self.guessed_at: str | None = None  # for_url's base URL while its endpoints are guessed

    @classmethod
    def for_manifest(cls, manifest: str | Path, env: str | None = None, *, base_url: str | None = None,
                     **kwargs: Any):
        """Addresses from a manifest: Modal's URLs (needs `app.workspace`), or `base_url` for a local server."""
        from .manifest import load

        m = load(manifest, env).manifest
        kinds = Endpoints.kinds(m.endpoints)
        if base_url:
            return cls(Endpoints.local(base_url, m.endpoints), kinds, **kwargs)
        if not m.app.workspace:
            raise ClientError("the manifest has no `app.workspace`, so its URLs are unknown",
                              hint="set `app.workspace` or pass a base URL")
        return cls(Endpoints.modal(m.app.workspace, m.app.assumed_web_suffix, m.endpoints), kinds, **kwargs)

    @classmethod
    def for_url(cls, base_url: str, endpoints: list[dict[str, str]] | None = None, *, auth: str = "auto",
                **kwargs: Any):
        """A server with every endpoint under `<base_url>/<label>`, as `serve --local` runs them.

        The endpoints and the auth each one requires are read from the server's index (`GET /`).
        A server that lists none (not up yet, or not liftdeploy's) gets the default labels, and
        `auth` for each: `none`, `proxy`, `bearer`, or `auto` (the default) for whichever
        credentials are configured."""
        listed = [Route(ep["kind"], ep["label"], ep["auth"]) for ep in endpoints] if endpoints \
            else listed_routes(base_url)
        routes = listed or [Route(k, k, auth) for k in ("health", "warmup", "generate")]
        client = cls(Endpoints.local(base_url, routes), Endpoints.kinds(routes), **kwargs)
        if not listed:  # a guess: labels are `<app name>-<kind>` unless set, so adopt the server's list
            client.guessed_at = base_url  # when it first answers (`_adopt_listing`)
        return client

    def _adopt_listing(self, response: httpx.Response) -> bool:
        """While the endpoints are guessed, a liftdeploy server's 404 lists the real ones: take them."""
        if self.guessed_at is None or response.status_code != 404:
            return False
        try:
            routes = routes_of(response.json().get("endpoints"))
        except (ValueError, AttributeError):
            return False
        if not routes:
            return False
        self.endpoints, self.kinds = Endpoints.local(self.guessed_at, routes), Endpoints.kinds(routes)
        self.guessed_at = None
        return True

    def _exchange(self, kind: str, method: str, body: Any, read_timeout: float | None, path: str = ""):
        """The request policy as a generator, driven by both clients: it yields a request to send
        (httpx keyword arguments) or a float (seconds to sleep), is sent each request's outcome (a
        response or a transport error), and returns the answer's body. `path` goes below the
        endpoint's URL (`/v1/models` of the `openai` endpoint)."""
        req = self._request(kind, method, body, read_timeout, path)
        replayed = self.recorder.replay(method, req["label"], body)
        if replayed:
            return self._checked(req, *replayed)
        last = ""
        for attempt in range(self.retries + 1):
            outcome = yield {"method": method, "url": req["url"], "headers": req["headers"], "json": body,
                             "timeout": req["timeout"]}
            response = outcome if isinstance(outcome, httpx.Response) else None
            if response is not None and self._adopt_listing(response):
                req = self._request(kind, method, body, read_timeout, path)  # the same kind, at its real label
                last = f"HTTP {response.status_code}"
                continue
            if response is not None:
                result = self._outcome(req, response)
                if result is not None:
                    return result
                last = f"HTTP {response.status_code}"
            else:
                last = f"{type(outcome).__name__}: {outcome}"
            if attempt < self.retries:
                yield float(self._delay(attempt, response))
        raise self._gave_up(req, last)

    def address(self, kind: str) -> tuple[str, dict[str, str]]:
        """The base URL of the endpoint of `kind`, and the headers its auth wants."""
        label = self.endpoints.label(kind, self.kinds)
        headers = {"Accept": "application/json"}
        auth = self.endpoints.auth.get(label, "none")
        if auth in ("bearer", "auto") and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if auth in ("proxy", "auto") and self.proxy_auth:
            headers["Modal-Key"], headers["Modal-Secret"] = self.proxy_auth
        return self.endpoints.urls[label], headers

    def timeout(self, read_timeout: float | None = None) -> httpx.Timeout:
        read = read_timeout or (self.timeouts.read if self.warm else self.timeouts.cold_read)
        return httpx.Timeout(read, connect=self.timeouts.connect)

    def _request(self, kind: str, method: str, body: Any, read_timeout: float | None,
                 path: str = "") -> dict[str, Any]:
        url, headers = self.address(kind)
        label = self.endpoints.label(kind, self.kinds)
        return {"label": label + path, "method": method, "url": url + path, "headers": headers,
                "json": body, "timeout": self.timeout(read_timeout)}

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        after = response.headers.get("retry-after") if response is not None else None
        if after and after.isdigit():
            return min(float(after), 60.0)
        return min(self.backoff * 2**attempt, 30.0)

    def _outcome(self, req: dict[str, Any], response: httpx.Response) -> dict[str, Any] | None:
        """The body of a success, None for a retryable answer; raises on a refusal."""
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text[:500]}
        if response.status_code in RETRY_STATUSES:
            return None
        self.recorder.record(req["method"], req["label"], req["json"], response.status_code, body)
        return self._checked(req, response.status_code, body)

    def _checked(self, req: dict[str, Any], status: int, body: Any) -> dict[str, Any]:
        if status >= 400:
            detail = body.get("detail") if isinstance(body, dict) else body
            if detail is None and isinstance(body, dict) and isinstance(body.get("error"), dict):
                detail = body["error"].get("message")  # OpenAI's error shape (the openai route)
            hint = {401: auth_hint(self.endpoints.auth.get(req["label"], "auto"), detail),
                    413: "send a smaller request", 422: "fix the fields named in the detail"}.get(status)
            raise ClientError(f"{req['label']} answered {status}: {_short(detail)}", status, detail, hint)
        self.warm = True
        return body

    def _gave_up(self, req: dict[str, Any], last: str) -> ClientError:
        return ClientError(f"{req['label']} did not answer after {self.retries + 1} attempts: {last}",
                           hint="the model may still be loading; try `liftdeploy warmup` first")


def auth_hint(auth: str, detail: Any) -> str:
    """What a 401 asks for: the credentials of the endpoint's auth (from its manifest or the server's
    listing), or, when that is unknown, those the refusal names."""
    if auth not in ("bearer", "proxy"):
        text = str(detail).lower()
        auth = "proxy" if "modal-key" in text or "proxy" in text else "bearer" if "bearer" in text else auth
    if auth == "proxy":
        return ("this endpoint uses Modal proxy auth: set LIFTDEPLOY_PROXY_KEY and LIFTDEPLOY_PROXY_SECRET to a "
                "proxy auth token's wk-… ID and ws-… secret (`serve --local` prints a local pair)")
    if auth == "bearer":
        return ("this endpoint wants a bearer token: set LIFTDEPLOY_API_TOKEN to the deployment's token "
                "(`serve --local` prints it)")
    return "set LIFTDEPLOY_API_TOKEN (bearer auth), or LIFTDEPLOY_PROXY_KEY and LIFTDEPLOY_PROXY_SECRET (proxy auth)"


def listed_routes(base_url: str) -> list[Route] | None:
    """The endpoints a local server lists at its root; None if it lists none."""
    try:
        index = httpx.get(base_url.rstrip("/") + "/", timeout=5.0).json().get("endpoints")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return routes_of(index)


def routes_of(index: Any) -> list[Route] | None:
    """Routes from a local server's listing (`{label: {kind, auth, path}}`); None if it is not one."""
    if not isinstance(index, dict):
        return None
    try:
        return [Route(ep["kind"], label, ep["auth"]) for label, ep in index.items()]
    except (KeyError, TypeError):
        return None


def _short(detail: Any) -> str:
    if isinstance(detail, list):
        fields = [".".join(str(p) for p in d.get("loc", [])[1:]) + ": " + d.get("msg", "") for d in detail[:3]
                  if isinstance(d, dict)]
        return "; ".join(fields) or json.dumps(detail)[:300]
    return str(detail)[:300]


def _generate_body(prompt: str, schema: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {"prompt": prompt, "schema": schema, **{k: v for k, v in options.items() if v is not None}}


class Client(_Base):
    """Blocking client."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.http = httpx.Client(follow_redirects=True)  # Modal answers long requests with a 303 to poll

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def call(self, kind: str, method: str = "GET", body: Any = None, read_timeout: float | None = None,
             path: str = "") -> Any:
        steps = self._exchange(kind, method, body, read_timeout, path)
        try:
            step = next(steps)
            while True:
                if isinstance(step, float):
                    time.sleep(step)
                    step = next(steps)
                    continue
                try:
                    outcome: Any = self.http.request(**step)
                except httpx.TransportError as exc:
                    outcome = exc
                step = steps.send(outcome)
        except StopIteration as done:
            return done.value

    def health(self) -> dict[str, Any]:
        return self.call("health", read_timeout=self.timeouts.read)

    def warmup(self) -> dict[str, Any]:
        return self.call("warmup", read_timeout=self.timeouts.cold_read)

    def generate(self, prompt: str, schema: dict[str, Any], *, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None) -> Generation:
        body = _generate_body(prompt, schema, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        return Generation.from_json(self.call("generate", "POST", body))


class AsyncClient(_Base):
    """asyncio client; the same policy as `Client`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.http = httpx.AsyncClient(follow_redirects=True)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def call(self, kind: str, method: str = "GET", body: Any = None, read_timeout: float | None = None,
                   path: str = "") -> Any:
        steps = self._exchange(kind, method, body, read_timeout, path)
        try:
            step = next(steps)
            while True:
                if isinstance(step, float):
                    await asyncio.sleep(step)
                    step = next(steps)
                    continue
                try:
                    outcome: Any = await self.http.request(**step)
                except httpx.TransportError as exc:
                    outcome = exc
                step = steps.send(outcome)
        except StopIteration as done:
            return done.value

    async def health(self) -> dict[str, Any]:
        return await self.call("health", read_timeout=self.timeouts.read)

    async def warmup(self) -> dict[str, Any]:
        return await self.call("warmup", read_timeout=self.timeouts.cold_read)

    async def generate(self, prompt: str, schema: dict[str, Any], *, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None) -> Generation:
        body = _generate_body(prompt, schema, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        return Generation.from_json(await self.call("generate", "POST", body))
