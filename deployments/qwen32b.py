# Rendered by liftdeploy 0.1.0 from "deployments/qwen32b.toml"; edit the manifest, not this file.
# manifest sha256: 07d523f3b002641c8a0719972f06b62b985f84f543a5c7be01f379c9bbee9770
# re-render: liftdeploy render "deployments/qwen32b.toml"
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
import json
import math
import time
import uuid
from typing import Any, Literal

import modal
from pydantic import BaseModel, ConfigDict, Field, field_validator

MINUTES = 60  # seconds

# ## The model

APP_NAME = "lift-sys-inference"
MODEL_NAME = "Qwen/Qwen2.5-Coder-32B-Instruct"
MODEL_REVISION = "b47205940b83b5b484577359f71ee7b88472df67"  # avoid surprises when the repo updates
VLLM_VERSION = "0.9.2"
# Does the model think before it answers? A hybrid-thinking model (Qwen3) gets enable_thinking=THINKING
# in its chat template; when it thinks, vLLM's REASONING_PARSER keeps the schema off the thinking.
THINKING = False
REASONING_PARSER = None

# GPUs to try, in this order.
GPU = ["A100-80GB", "H100"]


# ## Container images

# The GPU image pins the whole serving stack, installed with uv.
vllm_image = (
    modal.Image.from_registry("nvidia/cuda:12.4.1-devel-ubuntu22.04", add_python="3.12")
    .entrypoint([])  # skip the base image's own entrypoint
    .uv_pip_install(
        "vllm==0.9.2",
        "transformers==4.53.0",
        "xgrammar==0.1.19",
        "hf-transfer==0.1.9",
        uv_version="0.13.9",
    )
    .env({
        "HF_HOME": "/models",
        "VLLM_CACHE_ROOT": "/root/.cache/vllm",
        "HF_XET_HIGH_PERFORMANCE": "1",
        "HF_HUB_ENABLE_HF_TRANSFER": "1",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "TOKENIZERS_PARALLELISM": "false",
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
# vLLM's compile cache: later cold starts skip torch.compile.
VLLM_CACHE_DIR = "/root/.cache/vllm"
vllm_cache_volume = modal.Volume.from_name("lift-sys-vllm-cache", create_if_missing=True)

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
# vLLM batches exactly that many (max_num_seqs). Past it, Modal queues requests for another container.
MAX_INPUTS = 20

# Each endpoint is its own URL, claimed for the whole Modal environment:
# https://<workspace>[-<web suffix>]--<label>.modal.run
ENDPOINTS = [
    {"kind": "health", "label": "lift-sys-inference-health", "auth": "none"},
    {"kind": "generate", "label": "lift-sys-inference-generate", "auth": "proxy"},
    {"kind": "warmup", "label": "lift-sys-inference-warmup", "auth": "proxy"},
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


# ## The engine
# vLLM "0.9.2" takes its structured-output request in the "guided_decoding" form.
# vllm is imported only inside the container, so this module imports anywhere.

ENGINE_ARGS = {
    "model": "Qwen/Qwen2.5-Coder-32B-Instruct",
    "revision": "b47205940b83b5b484577359f71ee7b88472df67",
    "dtype": "bfloat16",
    "max_model_len": 8192,
    "tensor_parallel_size": 1,
    "gpu_memory_utilization": 0.9,
    "trust_remote_code": False,
    "max_num_seqs": 20,
    "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 20]},
    "download_dir": "/models/hub",
    "guided_decoding_backend": "xgrammar",
}


def engine_args():
    """vLLM's AsyncEngineArgs for this deployment."""
    from vllm import AsyncEngineArgs
    from vllm.config import CompilationConfig

    args = dict(ENGINE_ARGS)
    # Some releases (0.9.x) cannot parse this config from a dict: pass the object.
    args["compilation_config"] = CompilationConfig(**args["compilation_config"])
    return AsyncEngineArgs(**args)


def sampling_params(schema: dict[str, Any] | None, *, max_tokens: int, temperature: float, top_p: float):
    """vLLM's SamplingParams for one request, constrained to `schema` when given."""
    from vllm import SamplingParams
    from vllm.sampling_params import GuidedDecodingParams

    guided = GuidedDecodingParams(json=schema) if schema is not None else None
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, guided_decoding=guided
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
# Every setting below is Modal's own, with Modal's meaning:
# https://modal.com/docs/guide/scale, https://modal.com/docs/guide/concurrent-inputs

app = modal.App(APP_NAME)


@app.function(
    image=web_image,
    timeout=1 * MINUTES,  # no GPU: answers in milliseconds, even while the model is cold
)
@modal.concurrent(max_inputs=100)
@modal.asgi_app(label="lift-sys-inference-health")
def web_lift_sys_inference_health():
    return create_app("health", auth="none")


@app.cls(
    image=vllm_image,
    gpu=GPU,
    volumes={MODELS_DIR: weights_volume, VLLM_CACHE_DIR: vllm_cache_volume},
    timeout=10 * MINUTES,  # how long may one request take?
    startup_timeout=15 * MINUTES,  # how long may loading the model take?
    scaledown_window=5 * MINUTES,  # how long should we stay up with no requests?
)
@modal.concurrent(max_inputs=MAX_INPUTS)  # how many requests can one replica handle?
class Inference:
    @modal.enter()
    def start_engine(self):
        self.engine = VLLMEngine()
        self.engine.start()

    @modal.method()
    def ping(self) -> dict[str, Any]:
        """Called by `modal run`: reports the loaded model."""
        return {"model": self.engine.name, "ready": self.engine.ready, "load_seconds": self.engine.load_seconds}

    @modal.asgi_app(label="lift-sys-inference-generate", requires_proxy_auth=True)
    def web_lift_sys_inference_generate(self):
        return create_app("generate", self.engine, auth="proxy")

    @modal.asgi_app(label="lift-sys-inference-warmup", requires_proxy_auth=True)
    def web_lift_sys_inference_warmup(self):
        return create_app("warmup", self.engine, auth="proxy")


@app.local_entrypoint()
def main():
    """`modal run` this file: start a container, load the model and report."""
    print(Inference().ping.remote())
