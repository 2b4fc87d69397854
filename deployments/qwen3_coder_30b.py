# Rendered by liftdeploy 0.1.0 from "deployments/qwen3-coder-30b.toml"; edit the manifest, not this file.
# manifest sha256: 22fb39c06584658c7116cb98a0e012c556cb28716373469174da059301c6a977
# re-render: liftdeploy render "deployments/qwen3-coder-30b.toml"
"""Schema-constrained JSON generation on Modal with SGLang: SGLang's server runs in the
container, as in Modal's SGLang examples, and its grammar backend (llguidance)
constrains every token to the JSON schema sent with each request.

Read it top to bottom in deploy order: image, weights, configuration, request
validation, the SGLang server, HTTP endpoints, Modal functions.
"""

# No `from __future__ import annotations`: FastAPI resolves a string annotation in the
# module's globals, and `Request` is imported inside create_app (fastapi is not needed to
# import this module), so `authorized(request: Request)` would become a required query field.
import asyncio
import concurrent.futures
import json
import math
import time
import uuid
from typing import Any, Literal

import modal
from pydantic import BaseModel, ConfigDict, Field, field_validator

MINUTES = 60  # seconds

# ## The model

APP_NAME = "lift-sys-coder"
MODEL_NAME = "Qwen/Qwen3-Coder-30B-A3B-Instruct"
MODEL_REVISION = "b2cff646eb4bb1d68355c01b18ae02e7cf42d120"  # avoid surprises when the repo updates
SGLANG_VERSION = "0.5.4.post3"
GRAMMAR_BACKEND = "llguidance"  # SGLang's --grammar-backend
# GPUs to try, in this order.
GPU = ["A100-80GB", "H100"]


# ## Container images

# The GPU image pins the whole serving stack, SGLang included, installed with uv.
sglang_image = (
    modal.Image.debian_slim(python_version="3.12")
    .uv_pip_install(
        "sglang==0.5.4.post3",
        "transformers==4.57.1",
        "xgrammar==0.1.25",
        "flashinfer-python==0.5.0",
        uv_version="0.13.9",
    )
    .env({
        "HF_HOME": "/models",
        "HF_XET_HIGH_PERFORMANCE": "1",
        "SGLANG_GRAMMAR_TIMEOUT": "10.0",
        "FLASHINFER_WORKSPACE_BASE": "/root/.cache/sglang-jit/flashinfer",
        "SGLANG_DG_CACHE_DIR": "/root/.cache/sglang-jit/deep_gemm",
        "TRITON_CACHE_DIR": "/root/.cache/sglang-jit/triton",
        "TORCHINDUCTOR_CACHE_DIR": "/root/.cache/sglang-jit/inductor",
        "SGLANG_CACHE_DIR": "/root/.cache/sglang-jit/sglang",
    })
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
weights_volume = modal.Volume.from_name("lift-sys-models", create_if_missing=True)
# SGLang's JIT caches (flashinfer, DeepGEMM, Triton, torch.compile): later cold starts skip compiling.
CACHE_DIR = "/root/.cache/sglang-jit"
cache_volume = modal.Volume.from_name("lift-sys-sglang-cache", create_if_missing=True)

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
# Requests one container serves at once: Modal sends a container no more (@modal.concurrent) and
# SGLang runs exactly that many (--max-running-requests). Past it, Modal queues requests for
# another container.
MAX_INPUTS = 20

# Each endpoint is its own URL, claimed for the whole Modal environment:
# https://<workspace>[-<web suffix>]--<label>.modal.run
ENDPOINTS = [
    {"kind": "health", "label": "lift-sys-coder-health", "auth": "none"},
    {"kind": "warmup", "label": "lift-sys-coder-warmup", "auth": "proxy"},
    {"kind": "generate", "label": "lift-sys-coder-generate", "auth": "proxy"},
    {"kind": "openai", "label": "lift-sys-coder-openai", "auth": "proxy"},
]


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


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class JsonSchemaFormat(BaseModel):
    name: str = Field("output", max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, schema: dict[str, Any]) -> dict[str, Any]:
        return _bounded_schema(schema)


class ResponseFormat(BaseModel):
    type: Literal["json_schema", "json_object", "text"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0)
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0)
    response_format: ResponseFormat | None = None
    stream: Literal[False] = False
    n: Literal[1] = 1



# ## The SGLang server
# SGLang runs as its own process in the container, as in Modal's SGLang examples, listening on
# 127.0.0.1 only: every request reaches it through the endpoints below, after their checks.
# A request goes to SGLang's native /generate with the schema as `json_schema` in its sampling
# parameters; SGLang's grammar backend compiles it (a schema it refuses is a 400 with its reason).
# sglang is imported only inside its own process, so this module imports anywhere.

SGLANG_PORT = 30000
SERVER_ARGS = [
    "--model-path",
    "Qwen/Qwen3-Coder-30B-A3B-Instruct",
    "--revision",
    "b2cff646eb4bb1d68355c01b18ae02e7cf42d120",
    "--served-model-name",
    "Qwen/Qwen3-Coder-30B-A3B-Instruct",
    "--dtype",
    "bfloat16",
    "--context-length",
    "32768",
    "--tp-size",
    "1",
    "--mem-fraction-static",
    "0.88",
    "--grammar-backend",
    "llguidance",
    "--max-running-requests",
    "20",
    "--cuda-graph-max-bs",
    "20",
]


def launch_command() -> list[str]:
    """`python -m sglang.launch_server` with this deployment's server arguments."""
    import sys

    return [sys.executable, "-m", "sglang.launch_server", *SERVER_ARGS,
            "--host", "127.0.0.1", "--port", str(SGLANG_PORT)]


def sampling_params(schema: dict[str, Any] | None, *, max_tokens: int, temperature: float,
                    top_p: float) -> dict[str, Any]:
    """SGLang's sampling parameters for one request, constrained to `schema` when given."""
    params: dict[str, Any] = {"max_new_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    if schema is not None:
        params["json_schema"] = json.dumps(schema)  # SGLang takes the schema as a JSON string
    return params


def finish_reason(meta_info: dict[str, Any]) -> str:
    """`stop` or `length` from SGLang's `meta_info`; an aborted request (a schema the grammar
    backend refused, a prompt too long) raises ValueError with SGLang's reason."""
    reason = meta_info.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    if kind == "abort":
        raise ValueError(str(reason.get("message") or "aborted by SGLang")[:500])
    return "length" if kind == "length" else "stop"


class SGLangEngine:
    """SGLang's server, started once per container; concurrent requests are batched on the GPU."""

    name = MODEL_NAME
    is_smoke = False
    url = f"http://127.0.0.1:{SGLANG_PORT}"

    def __init__(self) -> None:
        self.ready = False
        self.load_seconds: float | None = None
        self.process = None
        self.session = None

    def start(self, timeout: float = 15 * MINUTES) -> None:
        import subprocess

        from transformers import AutoTokenizer

        started = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(
            MODEL_NAME, revision=MODEL_REVISION, trust_remote_code=False
        )
        self.process = subprocess.Popen(launch_command())
        while not self._get("/health"):
            if self.process.poll() is not None:
                raise RuntimeError(f"the SGLang server exited with code {self.process.returncode}")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"the SGLang server was not ready within {timeout:.0f} s")
            time.sleep(2)
        self.load_seconds = time.monotonic() - started
        self.ready = True

    def _get(self, path: str) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _post(self, path: str, body: dict[str, Any]) -> None:
        import urllib.request

        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=5 * MINUTES) as response:
            response.read()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def check_schema(self, schema: dict[str, Any]) -> None:
        """SGLang's grammar backend is the judge: a schema it refuses comes back as an abort (400)."""
        return None

    async def generate(self, messages: list[dict[str, str]], schema: dict[str, Any] | None, *,
                       max_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        import aiohttp

        if self.session is None:  # one connection pool, made on the serving event loop
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        body = {
            "text": prompt,
            "sampling_params": sampling_params(schema, max_tokens=max_tokens, temperature=temperature, top_p=top_p),
        }
        async with self.session.post(self.url + "/generate", json=body) as response:
            answer = await response.json(content_type=None)
        if response.status == 400:  # SGLang refused the request: the client's to fix
            raise ValueError(str((answer.get("error") or {}).get("message") or answer)[:500])
        if response.status != 200:
            raise RuntimeError(f"SGLang answered {response.status}")
        meta = answer["meta_info"]
        return {
            "text": answer["text"],
            "prompt_tokens": int(meta.get("prompt_tokens", 0)),
            "completion_tokens": int(meta.get("completion_tokens", 0)),
            "finish_reason": finish_reason(meta),
        }


# ## HTTP endpoints
# One FastAPI app per endpoint. Modal serves each at its own URL; `liftdeploy serve --local`
# serves these same apps on a CPU engine, under /<label>.


def schema_prompt(prompt: str, schema: dict[str, Any]) -> list[dict[str, str]]:
    """The chat for a `generate` request: the schema is also stated, so the model need not guess."""
    instruction = "Answer with JSON only, matching this JSON Schema:\n" + json.dumps(schema)
    return [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]


def create_app(kind: str, engine: Any = None, auth: str = "none"):
    """The FastAPI app for one endpoint `kind`, answering from `engine`."""
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
        return  # proxy auth is enforced by Modal in front of the app

    async def constrained(messages: list[dict[str, str]], schema: dict[str, Any] | None, *,
                          max_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        nonlocal in_flight
        if in_flight >= MAX_INPUTS:  # only `serve --local`: on Modal no container gets more than MAX_INPUTS
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
                "backend": f"SGLang {SGLANG_VERSION} with {GRAMMAR_BACKEND}",
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

    if kind == "openai":

        @api.get("/v1/models", dependencies=[Depends(authorized)])
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": APP_NAME}]}

        @api.post("/v1/chat/completions", dependencies=[Depends(authorized)])
        async def chat_completions(request: ChatCompletionRequest) -> dict[str, Any]:
            fmt = request.response_format
            if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
                raise HTTPException(422, detail="response_format.json_schema is required for type json_schema")
            schema = None
            if fmt is not None and fmt.type == "json_schema":
                schema = fmt.json_schema.schema_
            elif fmt is not None and fmt.type == "json_object":
                schema = {"type": "object"}
            result = await constrained(
                [message.model_dump() for message in request.messages],
                schema,
                max_tokens=request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS,
                temperature=request.temperature,
                top_p=request.top_p,
            )
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": MODEL_NAME,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result["text"]},
                        "finish_reason": result["finish_reason"],
                    }
                ],
                "usage": {
                    "prompt_tokens": result["prompt_tokens"],
                    "completion_tokens": result["completion_tokens"],
                    "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
                },
            }

    return api


# ## Modal functions

app = modal.App(APP_NAME)


@app.function(
    image=web_image,
    timeout=1 * MINUTES,  # no GPU: answers in milliseconds, even while the model is cold
)
@modal.concurrent(max_inputs=100)
@modal.asgi_app(label="lift-sys-coder-health")
def web_lift_sys_coder_health():
    return create_app("health", auth="none")


@app.cls(
    image=sglang_image,
    gpu=GPU,
    volumes={MODELS_DIR: weights_volume, CACHE_DIR: cache_volume},
    timeout=10 * MINUTES,  # how long may one request take?
    startup_timeout=15 * MINUTES,  # how long may starting SGLang take?
    scaledown_window=5 * MINUTES,  # how long should we stay up with no requests?
)
@modal.concurrent(max_inputs=MAX_INPUTS)  # SGLang's --max-running-requests
class Inference:
    @modal.enter()
    def start_engine(self):
        self.engine = SGLangEngine()
        self.engine.start()

    @modal.exit()
    def stop_engine(self):
        self.engine.stop()

    @modal.method()
    def ping(self) -> dict[str, Any]:
        """Called by `modal run`: reports the loaded model."""
        return {"model": self.engine.name, "ready": self.engine.ready, "load_seconds": self.engine.load_seconds}

    @modal.asgi_app(label="lift-sys-coder-warmup", requires_proxy_auth=True)
    def web_lift_sys_coder_warmup(self):
        return create_app("warmup", self.engine, auth="proxy")

    @modal.asgi_app(label="lift-sys-coder-generate", requires_proxy_auth=True)
    def web_lift_sys_coder_generate(self):
        return create_app("generate", self.engine, auth="proxy")

    @modal.asgi_app(label="lift-sys-coder-openai", requires_proxy_auth=True)
    def web_lift_sys_coder_openai(self):
        return create_app("openai", self.engine, auth="proxy")


@app.local_entrypoint()
def main():
    """`modal run` this file: start a container, start SGLang and report."""
    print(Inference().ping.remote())
