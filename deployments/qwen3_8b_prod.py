# Rendered by liftdeploy 0.1.0 from "deployments/qwen3-8b.toml", env "prod"; edit the manifest, not this file.
# manifest sha256: 9d155bbdc0c268c25e75f6217074fca060a1825a69be2b2432aa9ee6d0ea1363
# re-render: liftdeploy render "deployments/qwen3-8b.toml" --env "prod"
"""Schema-constrained JSON generation on Modal: vLLM serves the model, XGrammar
constrains every token to the JSON schema sent with each request.

Read it top to bottom in deploy order: image, weights, configuration, request
validation, engine, HTTP endpoints, Modal functions.
"""

# No `from __future__ import annotations`: FastAPI resolves a string annotation in the
# module's globals, and `Request` is imported inside create_app (fastapi is not needed to
# import this module), so `authorized(request: Request)` would become a required query field.
import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import math
import os
import time
import uuid
from typing import Any, Literal

import modal
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MINUTES = 60  # seconds

# ## The model

APP_NAME = "qwen3-structured"
MODEL_NAME = "Qwen/Qwen3-8B"
MODEL_REVISION = "b968826d9c46dd6066d109eabc6255188de91218"  # avoid surprises when the repo updates
VLLM_VERSION = "0.32.0"
# GPUs to try, in this order.
GPU = ["H100", "A100-80GB"]


# ## Container images

# The GPU image pins the whole serving stack, installed with uv.
vllm_image = (
    modal.Image.debian_slim(python_version="3.12")
    .uv_pip_install(
        "vllm==0.32.0",
        "transformers==5.19.0",
        "xgrammar==0.2.8",
        uv_version="0.13.9",
    )
    .env({"HF_HOME": "/models", "VLLM_CACHE_ROOT": "/root/.cache/vllm", "HF_XET_HIGH_PERFORMANCE": "1"})
)

# `health` answers from this small image, without a GPU or the model.
web_image = modal.Image.debian_slim(python_version="3.12").uv_pip_install(
    "fastapi[standard]==0.115.12",
    "pydantic==2.11.7",
    uv_version="0.13.9",
)

# ## Weights and caches

# Downloaded once into a Volume; later cold starts read them from there.
MODELS_DIR = "/models"
weights_volume = modal.Volume.from_name("qwen3-weights", create_if_missing=True)
# vLLM's compile cache: later cold starts skip torch.compile.
VLLM_CACHE_DIR = "/root/.cache/vllm"
vllm_cache_volume = modal.Volume.from_name("qwen3-vllm-cache", create_if_missing=True)

# ## Request limits

DEFAULT_MAX_TOKENS = 2048
MAX_TOKENS_LIMIT = 8192
DEFAULT_TEMPERATURE = 0.3
DEFAULT_TOP_P = 0.95
MAX_PROMPT_CHARS = 32000
MAX_SCHEMA_BYTES = 65536
MAX_SCHEMA_DEPTH = 32
MAX_BODY_BYTES = 1048576
SCHEMA_COMPILE_TIMEOUT = 10.0  # seconds
SCHEMA_COMPILERS = 4  # schemas compiled at once; one more is refused (503), not queued
MAX_INPUTS = 32  # requests one container serves at once
QUEUE = 32  # requests that may wait beyond MAX_INPUTS before a 503

# Each endpoint is its own URL: https://<workspace>--<label>.modal.run
ENDPOINTS = [
    {"kind": "health", "label": "health", "auth": "none"},
    {"kind": "warmup", "label": "warmup", "auth": "bearer"},
    {"kind": "generate", "label": "generate", "auth": "bearer"},
    {"kind": "openai", "label": "openai", "auth": "bearer"},
]
TOKEN_ENV = "LIFTDEPLOY_API_TOKEN"  # set by the Modal Secret "qwen3-api-token"


def bearer_ok(authorization: str) -> bool:
    """Whether an `Authorization` header carries this deployment's token (compared in constant time)."""
    expected = os.environ.get(TOKEN_ENV, "")
    scheme, _, token = authorization.partition(" ")
    return bool(expected) and scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected.encode())


# ## Request validation
# Missing or mistyped fields are answered with 422 naming each field, never a 500.


def _nests_deeper(node: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` levels deep. Iterative: the body parser
    accepts ~1000 levels, more than Python's stack has left for a recursive walk (a 500)."""
    stack = [(node, 0)]  # (value, containers above it)
    while stack:
        value, above = stack.pop()
        if isinstance(value, (dict, list)):
            if above >= limit:
                return True
            stack.extend((child, above + 1) for child in (value.values() if isinstance(value, dict) else value))
    return False


def _bounded_schema(schema: dict[str, Any]) -> dict[str, Any]:
    if _nests_deeper(schema, MAX_SCHEMA_DEPTH):  # first: json.dumps recurses too
        raise ValueError(f"schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"schema is larger than {MAX_SCHEMA_BYTES} bytes")
    return schema


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf, which JSON cannot carry back to the client
        raise ValueError(f"number out of range: {text[:40]}")
    return value


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    json_schema: dict[str, Any] = Field(alias="schema", description="JSON Schema the output must match.")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0)
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0)

    @field_validator("json_schema")
    @classmethod
    def _bounded(cls, schema: dict[str, Any]) -> dict[str, Any]:
        return _bounded_schema(schema)


class GenerateResponse(BaseModel):
    ir_json: Any = Field(description="The parsed JSON; null when the output is incomplete.")
    complete: bool = Field(description="False when max_tokens cut the output: the JSON is incomplete "
                                       "(or, rarely, holds a number out of range: see text).")
    text: str
    tokens_used: int
    generation_time_ms: float
    finish_reason: Literal["stop", "length"]
    model: str


# ## The engine
# vLLM "0.32.0" takes its structured-output request in the "structured_outputs" form.
# vllm is imported only inside the container, so this module imports anywhere.

ENGINE_ARGS = {
    "model": "Qwen/Qwen3-8B",
    "revision": "b968826d9c46dd6066d109eabc6255188de91218",
    "dtype": "bfloat16",
    "max_model_len": 16384,
    "tensor_parallel_size": 1,
    "gpu_memory_utilization": 0.9,
    "trust_remote_code": False,
    "enforce_eager": True,
    "download_dir": "/models/hub",
    "structured_outputs_config": {"backend": "xgrammar"},
}


def engine_args():
    """vLLM's AsyncEngineArgs for this deployment."""
    from vllm import AsyncEngineArgs
    from vllm.config import StructuredOutputsConfig

    # AsyncEngineArgs keeps a dict as it is: the config must be the object.
    structured = StructuredOutputsConfig(**ENGINE_ARGS["structured_outputs_config"])
    return AsyncEngineArgs(**{**ENGINE_ARGS, "structured_outputs_config": structured})


def sampling_params(schema: dict[str, Any] | None, *, max_tokens: int, temperature: float, top_p: float):
    """vLLM's SamplingParams for one request, constrained to `schema` when given."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    structured = StructuredOutputsParams(json=schema) if schema is not None else None
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, structured_outputs=structured
    )


class VLLMEngine:
    """vLLM's async engine: concurrent requests are batched on the GPU, not serialized."""

    name = MODEL_NAME
    is_smoke = False

    def __init__(self) -> None:
        self.ready = False
        self.load_seconds: float | None = None
        self._grammars: dict[str, Any] = {}

    def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncLLMEngine

        started = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(
            MODEL_NAME, revision=MODEL_REVISION, trust_remote_code=ENGINE_ARGS["trust_remote_code"]
        )
        self.engine = AsyncLLMEngine.from_engine_args(engine_args())
        self.load_seconds = time.monotonic() - started
        self.ready = True

    def check_schema(self, schema: dict[str, Any]) -> None:
        """Raise ValueError when XGrammar cannot compile `schema` (checked before the GPU sees it)."""
        import xgrammar

        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            try:
                self._grammars[key] = xgrammar.Grammar.from_json_schema(key)
            except Exception as exc:  # xgrammar raises RuntimeError / ValueError with the reason
                raise ValueError(str(exc).splitlines()[0][:500]) from None

    async def generate(self, messages: list[dict[str, str]], schema: dict[str, Any] | None, *,
                       max_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        params = sampling_params(schema, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        final = None
        async for output in self.engine.generate(prompt, params, uuid.uuid4().hex):
            final = output
        completion = final.outputs[0]
        return {
            "text": completion.text,
            "prompt_tokens": len(final.prompt_token_ids or []),
            "completion_tokens": len(completion.token_ids),
            "finish_reason": "length" if completion.finish_reason == "length" else "stop",
        }


# ## HTTP endpoints
# One FastAPI app per endpoint. Modal serves each at its own URL; `liftdeploy serve --local`
# serves these same apps on a CPU engine, under /<label>.


def schema_prompt(prompt: str, schema: dict[str, Any]) -> list[dict[str, str]]:
    """The chat for a `generate` request: the schema is also stated, so the model need not guess."""
    instruction = "Answer with JSON only, matching this JSON Schema:\n" + json.dumps(schema)
    return [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]




# ### The OpenAI-compatible route
# vLLM's own OpenAI server, built in this container on the engine that serves `generate`: one
# engine per container, and everything vLLM's server does (streaming, n, tools, logprobs,
# /v1/completions, /metrics) without a line of it written here. In front of it only what this
# deployment adds: its auth, its request limits (checked before vLLM sees a request), and
# errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}.

# How vLLM reads tool calls out of the model's text ("": none known, and vLLM refuses `tool_choice`).
TOOL_CALL_PARSER = "hermes"
# The routes this endpoint opens; vLLM's others (tokenizer, admin, SageMaker...) stay closed,
# since the limits below guard only these.
OPENAI_ROUTES = {
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/models": "GET",
    "/health": "GET",
    "/metrics": "GET",
}
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
# Request fields vLLM 0.32.0 accepts but does not act on: refused, never silently ignored.
IGNORED_BY_VLLM = frozenset(["user"])
MAX_CHOICES = 8  # n and best_of: each choice is a generation of its own
MAX_MESSAGES = 256
MAX_TOOLS = 128


def vllm_server_args(model: str):
    """vLLM's own options for its OpenAI server, parsed by its own parser (this release's defaults for the rest)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # tool_choice "auto" too, not only a named function
    tools = ["--tool-call-parser", TOOL_CALL_PARSER, "--enable-auto-tool-choice"] if TOOL_CALL_PARSER else []
    return make_arg_parser(FlexibleArgumentParser()).parse_args([
        "--model", model,
        "--served-model-name", MODEL_NAME,  # what clients pass as `model`, here as on any GPU
        "--disable-fastapi-docs",  # this endpoint opens OPENAI_ROUTES only
        *tools,
    ])


async def vllm_openai_app(engine_client):
    """vLLM 0.32.0's OpenAI-compatible FastAPI app, its state initialised on `engine_client`."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    args = vllm_server_args(engine_client.model_config.model)
    tasks = await engine_client.get_supported_tasks()
    app = build_app(args, tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, tasks)
    return app


def vllm_request_fields() -> dict[str, frozenset[str]]:
    """The fields (and aliases) of vLLM's own request models, per generation route."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    def names(model) -> frozenset[str]:
        return frozenset(name for key, field in model.model_fields.items() for name in (key, field.alias) if name)

    return {
        "/v1/chat/completions": names(ChatCompletionRequest) - IGNORED_BY_VLLM,
        "/v1/completions": names(CompletionRequest) - IGNORED_BY_VLLM,
    }


# What this deployment bounds in a chat or completions request. vLLM's own request models
# validate everything else, with its own messages.


def _bounded_or_none(schema: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
    if isinstance(schema, str) and len(schema) > MAX_SCHEMA_BYTES:
        raise ValueError(f"schema is larger than {MAX_SCHEMA_BYTES} bytes")
    return _bounded_schema(schema) if isinstance(schema, dict) else schema


def _text_chars(value: Any) -> int:
    """Characters of prompt text: a string, a list of strings, or content parts with `text`."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(part.get("text") if isinstance(part, dict) else part) for part in value)
    return 0


class OpenAIJsonSchema(BaseModel):
    model_config = ConfigDict(extra="allow")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    bounded = field_validator("schema_")(_bounded_or_none)


class OpenAIResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    json_schema: OpenAIJsonSchema | None = None


class OpenAIFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    parameters: dict[str, Any] | None = None
    bounded = field_validator("parameters")(_bounded_or_none)


class OpenAITool(BaseModel):
    model_config = ConfigDict(extra="allow")
    function: OpenAIFunction | None = None


class OpenAIStructuredOutputs(BaseModel):
    model_config = ConfigDict(extra="allow")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    bounded = field_validator("json_")(_bounded_or_none)


class OpenAILimits(BaseModel):
    """The limits of this deployment, on a chat or completions request body."""

    model_config = ConfigDict(extra="allow")

    messages: list[dict[str, Any]] | None = Field(None, max_length=MAX_MESSAGES)
    prompt: Any = None
    max_tokens: int | None = Field(None, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, le=MAX_TOKENS_LIMIT)
    n: int | None = Field(None, le=MAX_CHOICES)
    best_of: int | None = Field(None, le=MAX_CHOICES)
    response_format: OpenAIResponseFormat | None = None
    tools: list[OpenAITool] | None = Field(None, max_length=MAX_TOOLS)
    guided_json: dict[str, Any] | str | None = None
    structured_outputs: OpenAIStructuredOutputs | None = None
    bounded = field_validator("guided_json")(_bounded_or_none)

    @model_validator(mode="after")
    def _prompt_chars(self) -> "OpenAILimits":
        chars = _text_chars(self.prompt) + sum(_text_chars(message.get("content")) for message in self.messages or [])
        if chars > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt is {chars} characters; this deployment accepts {MAX_PROMPT_CHARS}")
        return self


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
    """An error as OpenAI answers it, so the SDK shows the message."""
    from starlette.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def openai_refusal(route: str, body: Any, fields: frozenset[str]):
    """Why this deployment refuses a generation request before vLLM sees it (an error response), or None."""
    from pydantic import ValidationError

    if not isinstance(body, dict):
        return openai_error(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:  # vLLM would log and ignore it: refused, as OpenAI refuses it
        return openai_error(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    try:
        OpenAILimits.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        message = error["msg"].removeprefix("Value error, ")
        return openai_error(400, f"{param}: {message}" if param else message, param=param)
    return None


class OpenAIServer:
    """vLLM's OpenAI app on `engine`, behind this endpoint's auth and request limits (an ASGI app).

    vLLM's app is built on the event loop that serves it, at startup or on the first request:
    vLLM's engine client belongs to the loop that first uses it.
    """

    def __init__(self, engine: Any, auth: str):
        self.engine = engine
        self.auth = auth
        self.app = None
        self.fields: dict[str, frozenset[str]] = {}
        self.building: asyncio.Lock | None = None
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http":  # vLLM's websocket routes stay closed
            await send({"type": "websocket.close", "code": 1008})
            return
        path = scope["path"]
        if scope.get("root_path") and path.startswith(scope["root_path"]):
            path = path[len(scope["root_path"]):]
        refusal = await self.refusal(scope, path)
        if refusal is None and path in GENERATION_ROUTES:
            body, refusal = _checked_body(path, await _read_body(receive), self.fields[path])
            refusal = refusal or self.too_busy()
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if path not in GENERATION_ROUTES:
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(*_replayed(scope, receive, _with_defaults(path, body)), send)
        finally:
            self.in_flight -= 1

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.engine is not None and getattr(self.engine, "ready", False) and hasattr(self.engine, "engine"):
                    with contextlib.suppress(Exception):  # a request meets the failure again, and says why
                        await self.vllm_app()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def vllm_app(self):
        self.building = self.building or asyncio.Lock()
        async with self.building:
            if self.app is None:
                self.app = await vllm_openai_app(self.engine.engine)
                self.fields = vllm_request_fields()
        return self.app

    async def refusal(self, scope, path: str):
        """The answer to a request refused before vLLM sees its body, or None."""
        if OPENAI_ROUTES.get(path) not in (scope["method"], None) and scope["method"] != "OPTIONS":
            return openai_error(405, f"{scope['method']} is not allowed on {path}; use {OPENAI_ROUTES[path]}")
        if path not in OPENAI_ROUTES:
            return openai_error(404, f"Invalid URL ({scope['method']} {path})", code="unknown_url")
        if self.auth == "bearer" and not bearer_ok(_header(scope, b"authorization")):
            return openai_error(401, "Incorrect API key provided", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        if self.engine is not None and not hasattr(self.engine, "engine"):  # `serve --local`'s transformers stand-in
            return openai_error(400, "the OpenAI-compatible route is vLLM's own server, and this engine is not "
                                     "vLLM: serve it with `liftdeploy serve --local --engine vllm`",
                                code="vllm_engine_required")
        if self.engine is None or not self.engine.ready or getattr(self.engine, "dead", False):
            return openai_error(503, "the model is not ready; retry shortly", headers={"Retry-After": "5"})
        declared = _header(scope, b"content-length")
        if declared and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            return openai_error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            await self.vllm_app()
        except Exception as exc:  # not the client's doing: said as it is
            return openai_error(500, f"vLLM's OpenAI server could not be built: {type(exc).__name__}: {exc}")
        return None

    def too_busy(self):
        if self.in_flight >= MAX_INPUTS + QUEUE:
            return openai_error(503, f"{self.in_flight} requests in flight; retry shortly",
                                headers={"Retry-After": "5"})
        return None


def _header(scope, name: bytes) -> str:
    return next((value.decode("latin-1") for key, value in scope["headers"] if key.lower() == name), "")


async def _read_body(receive) -> bytes | None:
    """The request body, or None once it passes MAX_BODY_BYTES (a chunked body declares no length)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY_BYTES:
            return None
        if not message.get("more_body"):
            return b"".join(chunks)


def _checked_body(route: str, body: bytes | None, fields: frozenset[str]):
    """The parsed body and None, or None and the answer refusing it."""
    if body is None:
        return None, openai_error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's stack
        return None, openai_error(400, "the request body is not valid JSON")
    return parsed, openai_refusal(route, parsed, fields)


def _with_defaults(route: str, body: dict[str, Any]) -> dict[str, Any]:
    """A chat request without a token limit gets this deployment's default, not the whole context."""
    if route == "/v1/chat/completions" and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        return {**body, "max_completion_tokens": DEFAULT_MAX_TOKENS}
    return body


def _replayed(scope, receive, body: dict[str, Any]):
    """The scope and receive channel that hand vLLM the (checked) body again."""
    raw = json.dumps(body).encode()
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length", b"transfer-encoding")]
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()  # then the client's disconnect, which ends a stream early

    return {**scope, "headers": [*headers, (b"content-length", str(len(raw)).encode())]}, receive_again


def create_app(kind: str, engine: Any = None, auth: str = "none"):
    """The FastAPI app for one endpoint `kind`, answering from `engine`."""
    if kind == "openai":  # vLLM's own server, behind this deployment's auth and limits
        return OpenAIServer(engine, auth)

    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    api = FastAPI(title=f"{APP_NAME} {kind}", docs_url=None, redoc_url=None)
    in_flight = 0
    # Schemas compile on threads of their own. A compile that overruns SCHEMA_COMPILE_TIMEOUT cannot
    # be stopped (it is C++): its request is answered, the compile keeps its thread until it ends.
    # While every compiler is busy a new schema is refused at once (503), so no request waits behind
    # another's schema, and generation, on the default executor, never does.
    compilers = concurrent.futures.ThreadPoolExecutor(SCHEMA_COMPILERS, thread_name_prefix="schema-compile")
    compiling: set[concurrent.futures.Future] = set()  # running, whether or not their request timed out

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422, except for what its encoder cannot echo (it would answer a 500): a body that
        # is not UTF-8 (sent as text/plain, say) gets replacement characters, NaN or Infinity (which
        # Python's JSON parser accepts, but JSON cannot carry) are echoed as strings, and an input too
        # deep for a recursive encoder is left out.
        encoders = {
            bytes: lambda raw: raw.decode("utf-8", "replace"),
            float: lambda x: x if math.isfinite(x) else str(x),
        }
        try:
            return JSONResponse({"detail": jsonable_encoder(exc.errors(), custom_encoder=encoders)}, status_code=422)
        except RecursionError:  # an input nested too deep to echo: the errors without it
            errors = [{k: v for k, v in error.items() if k != "input"} for error in exc.errors()]
            return JSONResponse({"detail": jsonable_encoder(errors, custom_encoder=encoders)}, status_code=422)

    @api.middleware("http")
    async def limit_body(request: Request, call_next):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body is larger than {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    def unavailable(reason: str) -> HTTPException:
        return HTTPException(503, detail=f"{reason}; retry shortly", headers={"Retry-After": "5"})

    async def authorized(request: Request) -> None:
        if auth != "bearer":
            return
        if not bearer_ok(request.headers.get("authorization", "")):
            raise HTTPException(401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def constrained(messages: list[dict[str, str]], schema: dict[str, Any] | None, *,
                          max_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        nonlocal in_flight
        if in_flight >= MAX_INPUTS + QUEUE:
            raise unavailable(f"{in_flight} requests in flight")
        if engine is None or not engine.ready:
            raise unavailable("the model is still loading")
        if schema is not None:
            if len(compiling) >= SCHEMA_COMPILERS:
                raise unavailable(f"{len(compiling)} schemas are compiling")
            job = compilers.submit(engine.check_schema, schema)
            compiling.add(job)
            job.add_done_callback(compiling.discard)
            try:
                await asyncio.wait_for(asyncio.wrap_future(job), SCHEMA_COMPILE_TIMEOUT)
            except ValueError as exc:
                raise HTTPException(400, detail=f"schema cannot be used for constrained decoding: {exc}") from None
            except asyncio.TimeoutError:
                raise HTTPException(400, detail=f"schema did not compile within {SCHEMA_COMPILE_TIMEOUT} s") from None
        in_flight += 1
        try:
            return await engine.generate(messages, schema, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        except ValueError as exc:  # the engine refused this request, e.g. a prompt longer than the context
            raise HTTPException(400, detail=f"request refused by the engine: {exc}") from None
        except Exception as exc:  # the engine failed: the client may retry, it did nothing wrong
            raise unavailable(f"engine error: {type(exc).__name__}") from None
        finally:
            in_flight -= 1

    if kind == "health":

        @api.get("/", dependencies=[Depends(authorized)])
        async def health() -> dict[str, Any]:
            return {
                "status": "healthy",
                "model": MODEL_NAME,
                "gpu": GPU,
                "backend": f"vLLM {VLLM_VERSION} with XGrammar",
                "smoke_model": bool(getattr(engine, "is_smoke", False)),
            }

    if kind == "warmup":

        @api.get("/", dependencies=[Depends(authorized)])
        async def warmup() -> dict[str, Any]:
            # Reaching this handler means the container started and `start_engine` loaded the model.
            return {
                "status": "warm" if engine is not None and engine.ready else "loading",
                "model_loaded": bool(engine is not None and engine.ready),
                "model": getattr(engine, "name", MODEL_NAME),
                "load_seconds": getattr(engine, "load_seconds", None),
                "smoke_model": bool(getattr(engine, "is_smoke", False)),
            }

    if kind == "generate":

        @api.post("/", response_model=GenerateResponse, dependencies=[Depends(authorized)])
        async def generate(request: GenerateRequest) -> GenerateResponse:
            started = time.perf_counter()
            result = await constrained(
                schema_prompt(request.prompt, request.json_schema),
                request.json_schema,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
            )
            complete = result["finish_reason"] == "stop"
            parsed = None
            if complete:
                try:
                    parsed = json.loads(result["text"], parse_float=_finite_float)
                except ValueError:  # not JSON, or a number Python cannot hold (1e999, 5000 digits)
                    complete = False
            return GenerateResponse(
                ir_json=parsed,
                complete=complete,
                text=result["text"],
                tokens_used=result["completion_tokens"],
                generation_time_ms=round((time.perf_counter() - started) * 1000, 1),
                finish_reason=result["finish_reason"],
                model=getattr(engine, "name", MODEL_NAME),
            )

    return api


# ## Modal functions

app = modal.App(APP_NAME)


@app.function(
    image=web_image,
    timeout=1 * MINUTES,  # no GPU: answers in milliseconds, even while the model is cold
)
@modal.concurrent(max_inputs=100)
@modal.asgi_app(label="health")
def web_health():
    return create_app("health", auth="none")


@app.cls(
    image=vllm_image,
    gpu=GPU,
    volumes={MODELS_DIR: weights_volume, VLLM_CACHE_DIR: vllm_cache_volume},
    secrets=[modal.Secret.from_name("huggingface"), modal.Secret.from_name("qwen3-api-token")],
    timeout=10 * MINUTES,  # how long may one request take?
    startup_timeout=20 * MINUTES,  # how long may loading the model take?
    scaledown_window=10 * MINUTES,  # how long should we stay up with no requests?
    min_containers=1,  # kept warm even when idle (billed)
    max_containers=8,
    buffer_containers=1,
)
@modal.concurrent(max_inputs=MAX_INPUTS, target_inputs=24)  # how many requests can one replica handle?
class Inference:
    @modal.enter()
    def start_engine(self):
        self.engine = VLLMEngine()
        self.engine.start()

    @modal.method()
    def ping(self) -> dict[str, Any]:
        """Called by the keep-warm schedule and `modal run`: reports the loaded model."""
        return {"model": self.engine.name, "ready": self.engine.ready, "load_seconds": self.engine.load_seconds}

    @modal.asgi_app(label="warmup")
    def web_warmup(self):
        return create_app("warmup", self.engine, auth="bearer")

    @modal.asgi_app(label="generate")
    def web_generate(self):
        return create_app("generate", self.engine, auth="bearer")

    @modal.asgi_app(label="openai")
    def web_openai(self):
        return create_app("openai", self.engine, auth="bearer")


@app.function(
    image=web_image,
    schedule=modal.Cron("*/10 8-18 * * 1-5"),
    timeout=21 * MINUTES,  # long enough to wait out a cold start
)
def keep_warm():
    """Keep one container loaded during the scheduled hours."""
    print(Inference().ping.remote())


@app.local_entrypoint()
def main():
    """`modal run` this file: start a container, load the model and report."""
    print(Inference().ping.remote())
