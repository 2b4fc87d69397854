# Rendered by liftdeploy 0.1.0 from "deployments/qwen3-8b.toml"; edit the manifest, not this file.
# manifest sha256: 63ba49a7330a846b84d14465ae72b7e2415769ffebd79a2702a2ce89c0117980
# re-render: liftdeploy render "deployments/qwen3-8b.toml"
"""Schema-constrained JSON generation on Modal: vLLM serves the model and its structured-output
backend (guidance) constrains every token to the JSON schema sent with each request.

Read it top to bottom: first this deployment (model, images, weights, configuration and the Modal
functions), then the vLLM engine, last the serving runtime every liftdeploy module shares (request
validation, schemas, one small FastAPI app per endpoint).
"""

# No `from __future__ import annotations`: FastAPI resolves a string annotation in the
# module's globals, and `Request` is imported inside the app builders (fastapi is not needed
# to import this module), so `authorized(request: Request)` would become a required query field.
import asyncio
import collections
import concurrent.futures
import contextlib
import hmac
import json
import math
import os
import threading
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
ENGINE_NAME = f"vLLM {VLLM_VERSION}"
# Does the model think before it answers? A hybrid-thinking model (Qwen3) gets enable_thinking=THINKING
# in its chat template; when it thinks, vLLM's REASONING_PARSER keeps the schema off the thinking.
THINKING = False
REASONING_PARSER = "qwen3"

# GPUs to try, in this order (`any` expanded to the cheapest few others that fit the model).
GPU = ["L40S", "A100-80GB", "L4", "A10G", "A100-40GB"]


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
    .env({
        "HF_HOME": "/models",
        "VLLM_CACHE_ROOT": "/root/.cache/vllm",
        "HF_XET_HIGH_PERFORMANCE": "1",
        "VLLM_SERVER_DEV_MODE": "1",
        "TORCH_CPP_LOG_LEVEL": "FATAL",
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
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
weights_volume = modal.Volume.from_name("qwen3-weights", create_if_missing=True)
# vLLM's compile cache: later cold starts skip torch.compile.
VLLM_CACHE_DIR = "/root/.cache/vllm"
vllm_cache_volume = modal.Volume.from_name("qwen3-vllm-cache", create_if_missing=True)

# ## Serving configuration

# vLLM "0.32.0" takes its structured-output request in the "structured_outputs" form.
ENGINE_ARGS = {
    "model": "Qwen/Qwen3-8B",
    "revision": "b968826d9c46dd6066d109eabc6255188de91218",
    "dtype": "bfloat16",
    "max_model_len": 16384,
    "tensor_parallel_size": 1,
    "gpu_memory_utilization": 0.9,
    "trust_remote_code": False,
    "max_num_seqs": 32,
    "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 24, 32]},
    "enable_sleep_mode": True,
    "download_dir": "/models/hub",
    "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
}
# The structured-output backend the engine runs (one per engine: vLLM compiles every grammar with it).
BACKEND = "guidance"
COMPACT_JSON = True  # no free whitespace between JSON tokens (in ENGINE_ARGS too)
# A fixed layout (decoding.whitespace = "spaced") as llguidance's options, which every schema
# carries (`guidance_schema`); None: the engine's whitespace setting alone.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CHAT_TEMPLATE_KWARGS = {"enable_thinking": THINKING}  # chat templates without the switch ignore it

# Request limits
DEFAULT_MAX_TOKENS = 2048
MAX_TOKENS_LIMIT = 8192
DEFAULT_TEMPERATURE = 0.3
DEFAULT_TOP_P = 0.95
MAX_PROMPT_CHARS = 32000
MAX_SCHEMA_BYTES = 65536
MAX_SCHEMA_DEPTH = 32
MAX_BODY_BYTES = 1048576
SCHEMA_COMPILE_TIMEOUT = 10.0  # seconds
RETRIES_ON_INVALID = 2  # samples again when a finished output breaks its schema
# Requests one container serves at once: Modal sends a container no more (@modal.concurrent) and
# vLLM batches exactly that many (max_num_seqs). Past it, Modal queues requests for another container.
MAX_INPUTS = 32

# Each endpoint is its own URL, claimed for the whole Modal environment:
# https://<workspace>[-<web suffix>]--<label>.modal.run
ENDPOINTS = [
    {"kind": "health", "label": "qwen3-structured-health", "auth": "none"},
    {"kind": "warmup", "label": "qwen3-structured-warmup", "auth": "bearer"},
    {"kind": "generate", "label": "qwen3-structured-generate", "auth": "bearer"},
    {"kind": "openai", "label": "qwen3-structured-openai", "auth": "bearer"},
]
TOKEN_ENV = "LIFTDEPLOY_API_TOKEN"  # set by the Modal Secret "qwen3-api-token"


# ## Modal functions
# Every setting below is Modal's own, with Modal's meaning:
# https://modal.com/docs/guide/scale, https://modal.com/docs/guide/concurrent-inputs

app = modal.App(APP_NAME)


@app.function(
    image=web_image,
    timeout=1 * MINUTES,  # no GPU: answers in milliseconds, even while the model is cold
)
@modal.concurrent(max_inputs=100)
@modal.asgi_app(label="qwen3-structured-health")
def web_qwen3_structured_health():
    return create_app("health", auth="none")


def gpu_attached() -> bool:
    """Whether this container has a GPU, asked without touching CUDA: CUDA initialised without a
    GPU stays without one. Before a GPU memory snapshot it has; before a CPU-only one it has not."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*"))


@app.cls(
    image=vllm_image,
    gpu=GPU,
    volumes={MODELS_DIR: weights_volume, VLLM_CACHE_DIR: vllm_cache_volume},
    secrets=[  # Modal refuses the deploy when a Secret lacks a required key
        modal.Secret.from_name("huggingface", required_keys=["HF_TOKEN"]),
        modal.Secret.from_name("qwen3-api-token", required_keys=["LIFTDEPLOY_API_TOKEN"]),
    ],
    memory=32768,  # MiB
    timeout=10 * MINUTES,  # how long may one request take?
    startup_timeout=20 * MINUTES,  # how long may loading the model take?
    scaledown_window=10 * MINUTES,  # how long should we stay up with no requests?
    max_containers=4,  # past this, requests wait in Modal's queue
    buffer_containers=1,  # idle extras while busy, so bursts skip cold starts
    enable_memory_snapshot=True,  # restore the loaded, warmed-up engine instead of loading it again
    experimental_options={"enable_gpu_snapshot": True},  # GPU memory too (Modal: alpha)
)
@modal.concurrent(max_inputs=MAX_INPUTS, target_inputs=24)  # how many requests can one replica handle?
class Inference:
    @modal.enter(snap=True)
    async def start_and_sleep(self):
        """Before the snapshot: load the model, warm it up, put it to sleep. Without a GPU here
        (no GPU snapshot: Modal took a CPU-only one) the engine starts after the restore instead."""
        self.engine = VLLMEngine()
        if gpu_attached():
            self.engine.start()
            await self.engine.warm_up()
            await self.engine.sleep()
            self.asleep = True
        else:
            self.asleep = False

    @modal.enter(snap=False)
    async def wake(self):
        """After the restore (and after creating the snapshot): wake the engine, or start it plainly."""
        if self.asleep:
            await self.engine.wake()
        else:
            self.engine.start()

    @modal.exit()
    def stop_engine(self):
        """The container is shutting down: stop vLLM's engine core and its workers with it."""
        self.engine.stop()

    @modal.method()
    def ping(self) -> dict[str, Any]:
        """Called by `modal run`: reports the loaded model."""
        return {"model": self.engine.name, "ready": self.engine.ready, "load_seconds": self.engine.load_seconds}

    @modal.asgi_app(label="qwen3-structured-warmup")
    def web_qwen3_structured_warmup(self):
        return create_app("warmup", self.engine, auth="bearer")

    @modal.asgi_app(label="qwen3-structured-generate")
    def web_qwen3_structured_generate(self):
        return create_app("generate", self.engine, auth="bearer")

    @modal.asgi_app(label="qwen3-structured-openai")
    def web_qwen3_structured_openai(self):
        return create_app("openai", self.engine, auth="bearer")


# ## Business hours: Modal's autoscaler keeps containers warm on a schedule
# On BUSINESS_DAYS at WARM_FROM (in TIMEZONE) the warm pool grows; at WARM_UNTIL it returns to the
# settings above. A deploy resets the autoscaler to the settings above until the next WARM_FROM.
# https://modal.com/docs/guide/scale#dynamic-autoscaler-updates

BUSINESS_DAYS = "1-5"  # cron's day-of-week field (0 or 7 is Sunday)
WARM_FROM = "08:00"
WARM_UNTIL = "18:00"
TIMEZONE = "Europe/Berlin"


def at(time_of_day: str) -> modal.Cron:
    """A schedule at `time_of_day` (HH:MM) on BUSINESS_DAYS, in TIMEZONE."""
    hour, minute = time_of_day.split(":")
    return modal.Cron(f"{int(minute)} {int(hour)} * * {BUSINESS_DAYS}", timezone=TIMEZONE)


@app.function(image=web_image, schedule=at(WARM_FROM), timeout=1 * MINUTES)
def business_hours_start():
    Inference().update_autoscaler(min_containers=1)


@app.function(image=web_image, schedule=at(WARM_UNTIL), timeout=1 * MINUTES)
def business_hours_end():
    Inference().update_autoscaler(min_containers=0)


@app.local_entrypoint()
def main():
    """`modal run` this file: start a container, load the model and report."""
    print(Inference().ping.remote())



# ## The engine
# vllm is imported only inside the container, so this module imports anywhere.


def engine_args(**overrides: Any):
    """vLLM's AsyncEngineArgs for this deployment (`overrides` replace ENGINE_ARGS entries)."""
    from vllm import AsyncEngineArgs
    from vllm.config import CompilationConfig, StructuredOutputsConfig

    args = {**ENGINE_ARGS, **overrides}
    # Some releases (0.9.x) cannot parse this config from a dict: pass the object.
    args["compilation_config"] = CompilationConfig(**args["compilation_config"])
    # AsyncEngineArgs keeps a dict as it is: the config must be the object.
    args["structured_outputs_config"] = StructuredOutputsConfig(**args["structured_outputs_config"])
    return AsyncEngineArgs(**args)


def sampling_params(schema: dict[str, Any] | None, *, max_tokens: int, temperature: float, top_p: float):
    """vLLM's SamplingParams for one request, constrained to `schema` when given."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    structured = StructuredOutputsParams(json=schema) if schema is not None else None
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, structured_outputs=structured
    )


def vllm_constrained(schema: dict[str, Any], ll_tokenizer: Any = None) -> dict[str, Any]:
    """The schema this deployment's backend is given for `schema`, as vLLM's own request validators
    take it; ValueError with their whole reason when they refuse it. Needs vLLM's classes only, not
    an engine (`ll_tokenizer`: llguidance's tokenizer, for the guidance backend), so the local
    stand-in refuses exactly what the engine refuses.

    One backend serves every request, so the pre-check decides what it is given: a schema that
    only XGrammar's validator accepts is served by llguidance leniently (`guidance_schema`);
    with XGrammar, bounded strings are rewritten (`xgrammar_safe`)."""
    import jsonschema
    from vllm.v1.structured_output.backend_guidance import validate_guidance_grammar
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"invalid JSON Schema: {exc.message}") from None
    except RecursionError:
        raise ValueError("the schema nests too deeply to be checked") from None

    def refused(check, constrained: dict[str, Any], **kwargs: Any) -> str | None:
        params = sampling_params(constrained, max_tokens=1, temperature=1.0, top_p=1.0)
        try:
            check(params, **kwargs)
        except Exception as exc:  # ValueError, or VLLMValidationError in newer releases
            return whole_reason(str(exc)) or type(exc).__name__
        return None

    if BACKEND == "guidance":
        constrained = guidance_schema(schema)
        why = refused(validate_guidance_grammar, constrained, tokenizer=ll_tokenizer)
        if why is not None and refused(validate_xgrammar_grammar, schema) is None:
            constrained = guidance_schema(schema, lenient=True)
            why = refused(validate_guidance_grammar, constrained, tokenizer=ll_tokenizer)
    else:
        constrained = xgrammar_safe(schema)
        why = refused(validate_xgrammar_grammar, constrained)
    if why is not None:
        raise ValueError(why)
    return constrained


class VLLMEngine:
    """vLLM's async engine: concurrent requests are batched on the GPU, not serialized."""

    is_smoke = False

    def __init__(self, **overrides: Any) -> None:
        self.overrides = overrides  # `liftdeploy serve --local --engine vllm` runs a local model
        self.name = overrides.get("model", MODEL_NAME)
        self.ready = False
        self.dead = False
        self.load_seconds: float | None = None
        self.schemas = SchemaGate(self.prepare)

    def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncLLMEngine

        started = time.monotonic()
        args = engine_args(**self.overrides)
        self.tokenizer = AutoTokenizer.from_pretrained(
            args.model, revision=args.revision, trust_remote_code=args.trust_remote_code
        )
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self._backend = None  # vLLM's own grammar backend, built at the first schema
        self.load_seconds = time.monotonic() - started
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        if getattr(self, "engine", None) is not None:  # started (a failed start leaves none)
            self.engine.shutdown()

    async def warm_up(self) -> None:
        """A few constrained requests through the whole path before the snapshot, so the first
        real one after a restore pays for nothing (Modal's snapshot guide advises it)."""
        schema = await self.schemas.prepare(
            {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
        for _ in range(3):
            await self.generate([{"role": "user", "content": "Answer ok."}], schema, max_tokens=16,
                                temperature=0.0, top_p=1.0)

    async def sleep(self) -> None:
        """vLLM sleep mode, level 1: weights to CPU memory, KV cache dropped; snapshot-ready."""
        await self.engine.sleep(level=1)
        self.ready = False

    async def wake(self) -> None:
        """After a restore: weights back on the GPU, the KV cache re-allocated."""
        await self.engine.wake_up()
        self.ready = True

    def _grammar_backend(self):
        """The structured-output backend class vLLM's engine core compiles every grammar with."""
        if self._backend is None:
            if BACKEND == "guidance":
                from vllm.v1.structured_output.backend_guidance import GuidanceBackend as Backend
            else:
                from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend as Backend
            config = self.engine.vllm_config
            self._backend = Backend(config, tokenizer=self.tokenizer, vocab_size=config.model_config.get_vocab_size())
        return self._backend

    def prepare(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The schema to constrain with, checked by vLLM's own validators (`vllm_constrained`) and
        compiled by the engine's backend; ValueError with the backend's reason when it cannot take it."""
        from vllm.v1.structured_output.backend_types import StructuredOutputOptions

        backend = self._grammar_backend()
        constrained = vllm_constrained(schema, backend.ll_tokenizer if BACKEND == "guidance" else None)
        try:
            grammar = backend.compile_grammar(StructuredOutputOptions.JSON, json.dumps(constrained))
        except Exception as exc:
            raise ValueError(f"{BACKEND} cannot compile the schema: {whole_reason(str(exc))}") from None
        first = backend.allocate_token_bitmask(1)  # the engine's first step: which tokens may start
        grammar.fill_bitmask(first, 0)
        matcher = getattr(grammar, "ll_matcher", None)  # llguidance reports errors instead of raising
        error = matcher.get_error() if matcher is not None else ""
        if error or not first.any():
            why = f" ({whole_reason(error)})" if error else ""
            raise ValueError(f"the schema admits no JSON value{why}")
        return constrained

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **CHAT_TEMPLATE_KWARGS
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def generate(self, messages: list[dict[str, str]], schema: dict[str, Any] | None, *,
                       max_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        """One generation; cancelling the caller aborts it in the engine. ValueError when vLLM
        refuses the request, Busy when the engine has died (the container should be replaced)."""
        ids = self.prompt_ids(messages)
        params = sampling_params(schema, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        final = None
        try:
            async for output in self.engine.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
                final = output
        except ValueError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "EngineDeadError" or self.engine.errored:
                await asyncio.to_thread(self._died)
                raise Busy("the engine has stopped") from None
            if any(cls.__name__ == "VLLMClientError" for cls in type(exc).__mro__):
                raise ValueError(whole_reason(str(exc))) from None
            raise
        completion = final.outputs[0]
        if completion.finish_reason == "error":  # vLLM's grammar rejected a token its own mask allowed
            raise ValueError("the grammar rejected a token its own mask allowed: the schema cannot be followed")
        if completion.finish_reason not in ("stop", "length"):  # "abort": vLLM ended it, not the model
            raise Busy(f"generation ended with {completion.finish_reason!r}")
        return {
            "text": completion.text,
            "prompt_tokens": len(final.prompt_token_ids or []),
            "completion_tokens": len(completion.token_ids),
            "finish_reason": completion.finish_reason,
        }

    def _died(self) -> None:
        """The engine process is gone: answer 503s, and on Modal let this container be replaced."""
        if self.dead:
            return
        self.dead, self.ready = True, False
        if not modal.is_local():
            try:
                modal.experimental.stop_fetching_inputs()  # Modal starts a fresh container
            except Exception as exc:
                print(f"could not stop fetching inputs: {exc!r}")

    def running(self) -> int:
        """Requests in the engine right now."""
        return self.engine.get_num_unfinished_requests() if self.ready else 0


# ----------------------------------------------------------------------------------------------
# The serving runtime: the same in every module liftdeploy renders, below this line; it calls the
# engine above through start / prepare / generate / running.
# ----------------------------------------------------------------------------------------------

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
    ir_json: Any = Field(description="The parsed JSON; null unless the output is complete.")
    complete: bool = Field(description="True only when the output finished and is valid against the schema.")
    incomplete_reason: str | None = Field(None, description="Why `complete` is false: cut by max_tokens, "
                                                            "not JSON, or where it breaks the schema.")
    text: str
    tokens_used: int = Field(description="Tokens generated, over every attempt.")
    attempts: int = Field(1, description="Generations run: more than one when a finished output broke the schema.")
    generation_time_ms: float
    finish_reason: Literal["stop", "length", "invalid"]
    model: str


# ## Schemas: what the engine is given, and what counts as complete


SUBSCHEMA = ("items", "additionalItems", "additionalProperties", "unevaluatedItems", "unevaluatedProperties",
             "not", "if", "then", "else", "contains", "propertyNames")
SUBSCHEMAS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")


def each_subschema(schema: Any, rewrite: Any) -> Any:
    """`schema` with `rewrite` applied to every subschema, innermost first. Values (`enum`,
    `const`, `default`, `examples`) are never touched."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in SUBSCHEMA and isinstance(value, dict):
            out[key] = each_subschema(value, rewrite)
        elif key in SUBSCHEMAS and isinstance(value, list):
            out[key] = [each_subschema(item, rewrite) for item in value]
        elif key in SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: each_subschema(item, rewrite) for name, item in value.items()}
    return rewrite(out)


def xgrammar_safe(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with each length-bounded string rewritten as an equivalent `pattern`, for XGrammar.

    XGrammar (every release checked, 0.1.19 to 0.2.9) compiles `minLength`/`maxLength` strings to
    `[^"\\\r\n]{m,n}`, which lets raw control characters through: invalid JSON
    (https://github.com/mlc-ai/xgrammar/issues/800). The pattern admits the same lengths without
    them; like XGrammar's own rule, it has no escapes. Strings with a `pattern` or `format` are left
    alone: vLLM refuses those together with length bounds anyway.
    """

    def bounded_as_pattern(node: dict[str, Any]) -> dict[str, Any]:
        if node.get("type") not in ("string", ["string"]) or "pattern" in node or "format" in node:
            return node
        if "minLength" not in node and "maxLength" not in node:
            return node
        low, high = node.pop("minLength", 0), node.pop("maxLength", "")
        return {**node, "pattern": '^[^\\u0000-\\u001f"\\\\]{' + f"{low},{high}" + "}$"}

    return each_subschema(schema, bounded_as_pattern)


def closed_objects(schema: Any, closable: bool = True, defs_closable: bool | None = None) -> Any:
    """`schema` with each `"type": "object"` that lists its properties closed (`additionalProperties:
    false`), as XGrammar's strict mode closes them. Never an object that other parts add properties
    to: an `allOf` part (or a definition, when the schema has an `allOf`), an `anyOf`/`oneOf` part of
    an object with properties of its own, an object combined with others, nor one requiring a name
    it does not list; nothing under `not` or `if`, whose meaning closing would invert."""
    if not isinstance(schema, dict):
        return schema
    if defs_closable is None:  # the root: a definition may be one part of an `allOf` anywhere
        defs_closable = '"allOf"' not in json.dumps(schema)
    own = "properties" in schema or "patternProperties" in schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in SUBSCHEMA and isinstance(value, dict):
            out[key] = closed_objects(value, key not in ("not", "if"), defs_closable)
        elif key in SUBSCHEMAS and isinstance(value, list):
            out[key] = [closed_objects(item, key != "allOf" and not own, defs_closable) for item in value]
        elif key in SUBSCHEMA_MAPS and isinstance(value, dict):
            part = defs_closable if key in ("$defs", "definitions") else key in ("properties", "patternProperties")
            out[key] = {name: closed_objects(item, part, defs_closable) for name, item in value.items()}
        else:
            out[key] = value
    listed = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    combined = any(key in schema for key in ("allOf", "anyOf", "oneOf", "$ref", "if", "dependentSchemas",
                                             "dependencies"))
    unlisted = "patternProperties" not in schema and any(
        isinstance(name, str) and name not in listed for name in schema.get("required", []))
    kind = schema.get("type")
    shape = "object" in (kind if isinstance(kind, list) else [kind])  # untyped: a fragment of a combination
    if closable and own and shape and not combined and not unlisted and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def guidance_schema(schema: dict[str, Any], *, lenient: bool = False) -> dict[str, Any]:
    """`schema` for llguidance. Objects that list their properties are closed (no properties they
    do not declare), as XGrammar's strict mode closes them: the same output whichever backend runs.
    A fixed JSON_LAYOUT goes in as the schema's `x-guidance` options, which llguidance reads after
    the engine's whitespace default (and in place of the request's own).

    `lenient` is for a schema only vLLM's XGrammar validator takes as it is: property dependencies
    become the `anyOf` they mean, `{"not": {}}` becomes `false`, and llguidance then ignores what it
    still cannot enforce (as XGrammar would) and reads `oneOf` as `anyOf`. Every finished output is
    validated against the schema itself (`schema_problem`), and sampled again if it breaks it."""

    def rewrite(node: dict[str, Any]) -> Any:
        if lenient and node.get("not") == {}:
            return False  # nothing matches it
        clauses = []
        for key in ("dependencies", "dependentRequired", "dependentSchemas") if lenient else ():
            for name, needs in (node.pop(key) if isinstance(node.get(key), dict) else {}).items():
                required = {"required": [name, *needs]} if isinstance(needs, list) else None
                then = required or {"allOf": [{"required": [name]}, needs]}
                clauses.append({"anyOf": [{"properties": {name: False}}, then]})
        if clauses:
            node["allOf"] = [*node.get("allOf", []), *clauses]
        return node

    rewritten = closed_objects(each_subschema(schema, rewrite))
    if rewritten is False:
        raise ValueError("the schema admits no JSON value (`not: {}`)")
    options = {**(JSON_LAYOUT or {}), **({"lenient": True, "coerce_one_of": True} if lenient else {})}
    return {**rewritten, "x-guidance": options} if options else rewritten


CHARS_PER_TOKEN = 64  # more than the longest token of any real vocabulary


def within_budget(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` as the engine is given it: a size no output of MAX_TOKENS_LIMIT tokens can reach is
    refused when it is a minimum (ValueError) and capped when it is a maximum. Neither changes what
    an output can be, and a backend would otherwise build it out: llguidance runs out of memory on
    `minItems: 1e9`, taking the container down with it."""
    limits = {"Items": MAX_TOKENS_LIMIT, "Properties": MAX_TOKENS_LIMIT, "Contains": MAX_TOKENS_LIMIT,
              "Length": MAX_TOKENS_LIMIT * CHARS_PER_TOKEN}

    def fit(node: dict[str, Any]) -> dict[str, Any]:
        for noun, limit in limits.items():
            low, high = node.get("min" + noun), node.get("max" + noun)
            if isinstance(low, (int, float)) and not isinstance(low, bool) and low > limit:
                raise ValueError(f"min{noun} {low} cannot be reached within {MAX_TOKENS_LIMIT} tokens "
                                 "(decoding.max_tokens_limit)")
            if isinstance(high, (int, float)) and not isinstance(high, bool) and high > limit:
                node["max" + noun] = limit
        return node

    return each_subschema(schema, fit)


# The formats each backend enforces: vLLM's XGrammar validator's list, and llguidance's own. Any other
# `format` (`byte`, `binary`, `base64url`...) is the annotation JSON Schema 2020-12 makes it: dropped
# from the schema the backend is given (vLLM refuses a format its backend does not know), kept in the
# schema outputs are validated against (jsonschema ignores formats it does not know too).
ENFORCED_FORMATS = {
    "xgrammar": frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
                           "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"}),
    "guidance": frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
                           "uri"}),
}


def without_unknown_formats(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` without the formats this deployment's backend does not enforce."""
    known = ENFORCED_FORMATS.get(BACKEND)

    def drop(node: dict[str, Any]) -> dict[str, Any]:
        if known is not None and isinstance(node.get("format"), str) and node["format"] not in known:
            del node["format"]
        return node

    return each_subschema(schema, drop)


def served_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` as every route hands it to the engine: within the token budget, unknown formats dropped."""
    return without_unknown_formats(within_budget(schema))


MAX_REASON_CHARS = 1000


def whole_reason(text: str) -> str:
    """A backend's reason as a client is told it: every line of it, on one line, bounded in length."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:MAX_REASON_CHARS]


def schema_problem(output: Any, schema: dict[str, Any]) -> str | None:
    """Where `output` breaks `schema` (jsonschema), or None when it is valid."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)
    errors = validator(schema, format_checker=validator.FORMAT_CHECKER).iter_errors(output)
    error = jsonschema.exceptions.best_match(errors)
    if error is None:
        return None
    return f"does not match the schema at {error.json_path}: {error.message[:300]}"


class SchemaGate:
    """The pre-check before the engine: each schema is compiled once, exactly as the engine will
    (same backend, same tokenizer), on threads of its own, in a bounded time; results are kept in a
    bounded LRU, and requests for a schema already compiling wait for that compile. A compile that
    overruns cannot be stopped (it is C++): its requests are answered at the timeout while it keeps
    its thread until it ends; a request that finds every thread taken for as long as a compile may
    take is refused (503), so no request waits long behind another's schema."""

    THREADS = 4
    CACHED = 256

    def __init__(self, prepare: Any) -> None:
        self._prepare = prepare  # schema -> what the engine constrains to; raises ValueError
        self._threads = concurrent.futures.ThreadPoolExecutor(self.THREADS, thread_name_prefix="schema-compile")
        self._slots: asyncio.Semaphore | None = None  # one per thread, held until its compile ends
        self._compiling: dict[str, concurrent.futures.Future] = {}
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _prepared(self, key: str, schema: dict[str, Any]) -> Any:
        try:
            try:
                prepared = self._prepare(served_schema(schema))
            except ValueError as exc:  # a refusal is remembered too: the same schema is refused again
                prepared = exc
            with self._lock:
                self._cache[key] = prepared
                while len(self._cache) > self.CACHED:
                    self._cache.popitem(last=False)
        finally:
            with self._lock:
                del self._compiling[key]
        if isinstance(prepared, ValueError):
            raise prepared
        return prepared

    def _cached(self, key: str) -> Any:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            return self._compiling.get(key)

    async def prepare(self, schema: dict[str, Any]) -> Any:
        """What the engine constrains to; ValueError when it cannot (a 400), Busy when full (a 503)."""
        key = json.dumps(schema, sort_keys=True)
        found = self._cached(key)
        if isinstance(found, ValueError):
            raise found
        if found is not None and not isinstance(found, concurrent.futures.Future):
            return found
        job = found
        if job is None:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.THREADS)
            try:
                await asyncio.wait_for(self._slots.acquire(), SCHEMA_COMPILE_TIMEOUT)
            except asyncio.TimeoutError:
                raise Busy(f"{self.THREADS} schemas are compiling") from None
            loop = asyncio.get_running_loop()
            with self._lock:
                job = self._compiling.get(key)
                if job is None:
                    job = self._compiling[key] = self._threads.submit(self._prepared, key, schema)
                    job.add_done_callback(lambda _: _call_soon(loop, self._slots.release))
                else:
                    self._slots.release()
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job)), SCHEMA_COMPILE_TIMEOUT)
        except asyncio.TimeoutError:
            raise SchemaTimeout(f"schema did not compile within {SCHEMA_COMPILE_TIMEOUT} s") from None


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any) -> None:
    """`callback` on `loop`, from another thread; nothing once the loop is closed (the server stopped)."""
    with contextlib.suppress(RuntimeError):  # the loop is closed
        loop.call_soon_threadsafe(callback)


class SchemaTimeout(ValueError):
    """A schema whose compile overran SCHEMA_COMPILE_TIMEOUT (a 400)."""


class Busy(Exception):
    """The container cannot take this request now; the client may retry (503)."""


# ## HTTP endpoints
# One FastAPI app per endpoint. Modal serves each at its own URL; `liftdeploy serve --local`
# serves these same apps on a local engine, under /<label>.


class Limiter:
    """Requests in this container, across every endpoint: at most MAX_INPUTS run at once, the
    rest wait their turn. Modal caps a container at the same max_inputs, so on Modal no request
    ever waits here; locally it stands in for Modal's cap."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._slots: asyncio.Semaphore | None = None

    async def __aenter__(self) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        await self._slots.acquire()
        self.active += 1

    async def __aexit__(self, *exc: object) -> None:
        self.active -= 1
        self._slots.release()


LIMITER = Limiter(MAX_INPUTS)


async def until_disconnected(request: Any, work: Any) -> Any:
    """Await `work`, cancelling it when the client goes away: the engine then aborts the request."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()


def schema_prompt(prompt: str, schema: dict[str, Any]) -> list[dict[str, str]]:
    """The chat for a `generate` request: the schema is also stated, so the model need not guess."""
    instruction = "Answer with JSON only, matching this JSON Schema:\n" + json.dumps(schema)
    return [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]


def bearer_ok(authorization: str) -> bool:
    """Whether an `Authorization` header carries this deployment's token (compared in constant time)."""
    expected = os.environ.get(TOKEN_ENV, "")
    scheme, _, token = authorization.partition(" ")
    return bool(expected) and scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected.encode())


def base_app(kind: str, auth: str):
    """A FastAPI app with what every endpoint shares: body limit, 422s that never fail, auth."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def authorized(request: Request) -> None:
        if auth != "bearer":
            return
        if not bearer_ok(request.headers.get("authorization", "")):
            raise HTTPException(401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    api = FastAPI(title=f"{APP_NAME} {kind}", docs_url=None, redoc_url=None, dependencies=[Depends(authorized)])

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

    @api.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return JSONResponse({"detail": f"{exc}; retry shortly"}, status_code=503, headers={"Retry-After": "5"})

    @api.middleware("http")
    async def limit_body(request: Request, call_next):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body is larger than {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    return api


async def constrained(engine: Any, messages: list[dict[str, str]], schema: dict[str, Any] | None, **sampling: Any):
    """Run one generation on `engine` in this container's turn: 400 for what the engine refuses,
    503 while it cannot serve."""
    from fastapi import HTTPException

    async with LIMITER:
        if engine is None or not engine.ready:
            raise Busy("the engine has stopped" if getattr(engine, "dead", False) else "the model is still loading")
        try:
            prepared = await engine.schemas.prepare(schema) if schema is not None else None
        except SchemaTimeout as exc:
            raise HTTPException(400, detail=str(exc)) from None
        except ValueError as exc:
            raise HTTPException(400, detail=f"schema cannot be used for constrained decoding: {exc}") from None
        try:
            return await engine.generate(messages, prepared, **sampling)
        except ValueError as exc:  # the engine refused this request, e.g. a prompt longer than the context
            raise HTTPException(400, detail=f"request refused by the engine: {exc}") from None
        except (Busy, asyncio.CancelledError):
            raise
        except Exception as exc:  # the engine failed: the client may retry, it did nothing wrong
            raise Busy(f"engine error: {type(exc).__name__}") from None


def health_app(engine: Any, auth: str):
    api = base_app("health", auth)

    @api.get("/")
    async def health() -> dict[str, Any]:
        return {
            "status": "healthy",
            "model": MODEL_NAME,
            "gpu": GPU,
            "backend": f"{ENGINE_NAME} with {BACKEND}",
            "smoke_model": bool(getattr(engine, "is_smoke", False)),
        }

    return api


def warmup_app(engine: Any, auth: str):
    api = base_app("warmup", auth)

    @api.get("/")
    async def warmup() -> dict[str, Any]:
        # Reaching this handler means the container started and `start_engine` loaded the model.
        ready = bool(engine is not None and engine.ready)
        return {
            "status": "warm" if ready else ("failed" if getattr(engine, "dead", False) else "loading"),
            "model_loaded": ready,
            "model": getattr(engine, "name", MODEL_NAME),
            "load_seconds": getattr(engine, "load_seconds", None),
            "smoke_model": bool(getattr(engine, "is_smoke", False)),
            "requests_running": engine.running() if ready else 0,
        }

    return api


def verdict(result: dict[str, Any], schema: dict[str, Any], max_tokens: int) -> tuple[Any, str | None]:
    """(the parsed output, None) when it is complete; (None or the value, why not) otherwise."""
    from fastapi import HTTPException

    if result["finish_reason"] == "length":
        return None, f"cut by max_tokens ({max_tokens}) before the JSON was finished"
    try:
        parsed = json.loads(result["text"], parse_float=_finite_float)
    except json.JSONDecodeError:  # the grammar let the model stop mid-document: a dead end of the schema
        raise HTTPException(400, detail="schema cannot be used for constrained decoding: it admits no complete "
                                        f"JSON value after {result['text'][-80:]!r}") from None
    except ValueError as exc:  # valid JSON, but a number Python cannot hold (1e999, 5000 digits)
        return None, f"not a JSON value this API can return: {str(exc)[:200]}"
    return parsed, schema_problem(parsed, schema)


def generate_app(engine: Any, auth: str):
    from fastapi import Request

    api = base_app("generate", auth)

    @api.post("/", response_model=GenerateResponse)
    async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
        started = time.perf_counter()
        schema, tokens, attempt = body.json_schema, 0, 0
        while True:
            attempt += 1
            result = await until_disconnected(request, constrained(
                engine, schema_prompt(body.prompt, schema), schema,
                max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
            ))
            tokens += result["completion_tokens"]
            parsed, why = verdict(result, schema, body.max_tokens)
            # done when valid, or out of retries; or when another sample would be cut the same way,
            # or be the same greedy output
            if why is None or attempt > RETRIES_ON_INVALID or result["finish_reason"] == "length" \
                    or body.temperature < 1e-5:
                break
        return GenerateResponse(
            ir_json=parsed if why is None else None,
            complete=why is None,
            incomplete_reason=why if attempt == 1 or why is None else f"{why} (after {attempt} attempts)",
            text=result["text"],
            tokens_used=tokens,
            attempts=attempt,
            generation_time_ms=round((time.perf_counter() - started) * 1000, 1),
            # "invalid": the model finished every attempt, and the last one still breaks the schema
            finish_reason="invalid" if why is not None and result["finish_reason"] == "stop"
            else result["finish_reason"],
            model=getattr(engine, "name", MODEL_NAME),
        )

    return api



# ### The OpenAI-compatible route
# vLLM's own OpenAI server, built in this container on the engine that serves `generate`: one
# engine per container, and everything vLLM's server does (streaming, n, tools, logprobs,
# /v1/completions, /metrics) without a line of it written here. In front of it only what this
# deployment adds: its auth, its request limits (checked before vLLM sees a request), and
# errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}.

# How vLLM reads tool calls out of the model's text ("": none known, and vLLM refuses `tool_choice`).
TOOL_CALL_PARSER = "hermes"
if BACKEND == "guidance":
    # vLLM's tool parsers constrain a named, required or strict tool call with an XGrammar
    # structural tag, which the guidance backend cannot compile (a 400, "Invalid grammar
    # specification: 'triggers'"); switched off, they constrain it with a JSON schema, which it
    # can. Set before vLLM is imported: its parsers read it when their classes are defined.
    os.environ.setdefault("VLLM_ENFORCE_STRICT_TOOL_CALLING", "0")
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


def openai_app(engine: Any, auth: str):
    """The `openai` endpoint: vLLM's own server on `engine`, behind this deployment's auth and limits."""
    return OpenAIServer(engine, auth)


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
        if refusal is None and path in GENERATION_ROUTES:
            body, refusal = await self.schemas_served(body)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if path not in GENERATION_ROUTES:
            await self.app(scope, receive, send)
            return
        respond = send
        if _schema_places(body) or body.get("structured_outputs") is not None:  # constrained by a grammar
            respond = _dead_ends_refused(respond)
        async with LIMITER:  # this container's turn, shared with `generate`
            await self.app(*_replayed(scope, receive, _with_defaults(path, body)), respond)

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

    async def schemas_served(self, body: dict[str, Any]):
        """The body with each schema it constrains to as `generate` serves it (`served_schema`), and
        None; or None and the answer refusing it. Each is pre-checked as `generate` checks it (the
        token budget, then the engine's own compile), before vLLM builds any grammar from it."""
        for place in _schema_places(body):
            param = ".".join(str(part) for part in place)
            try:
                schema = _bounded_schema(_schema_at(body, place))  # again: a schema sent as JSON text
                await self.engine.schemas.prepare(schema)
            except SchemaTimeout as exc:
                return None, openai_error(400, f"{param}: {exc}", param=param)
            except ValueError as exc:
                return None, openai_error(400, f"{param}: schema cannot be used for constrained decoding: {exc}",
                                          param=param)
            except Busy as exc:
                return None, openai_error(503, f"{exc}; retry shortly", headers={"Retry-After": "5"})
            body = _with_schema(body, place, served_schema(schema))
        return body, None

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


def _schema_places(body: dict[str, Any]) -> list[tuple[str | int, ...]]:
    """Where a chat or completions request carries a JSON Schema that vLLM compiles into a grammar:
    `response_format`, `structured_outputs` (and `guided_json` where the release has it), and the
    parameters of its tools unless `tool_choice` is "none" (a forced call is constrained to them,
    and strict tool calling builds them into a structural tag)."""
    places: list[tuple[str | int, ...]] = [("response_format", "json_schema", "schema"), ("structured_outputs", "json"),
                                           ("guided_json",)]
    if body.get("tool_choice") != "none" and isinstance(body.get("tools"), list):
        places += [("tools", index, "function", "parameters") for index in range(len(body["tools"]))]
    return [place for place in places if _schema_at(body, place) is not None]


def _schema_at(body: Any, place: tuple[str | int, ...]) -> dict[str, Any] | None:
    """The schema at `place` in `body` (a JSON text parsed), or None when there is none."""
    for part in place:
        if isinstance(part, int) and isinstance(body, list) and part < len(body):
            body = body[part]
        elif isinstance(part, str) and isinstance(body, dict):
            body = body.get(part)
        else:
            return None
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):
            return None  # vLLM's own validation answers it
    return body if isinstance(body, dict) else None


def _with_schema(body: Any, place: tuple[str | int, ...], schema: dict[str, Any]) -> Any:
    """A copy of `body` with `schema` at `place`."""
    if not place:
        return schema
    head, rest = place[0], place[1:]
    if isinstance(body, list):
        return [_with_schema(item, rest, schema) if index == head else item for index, item in enumerate(body)]
    return {**body, head: _with_schema(body[head], rest, schema)}


def _dead_ends_refused(send):
    """vLLM ends a request whose grammar rejects a token its own mask allowed (a schema or pattern
    that cannot be followed, found while generating; llguidance gives up on some) with finish_reason
    "error", and its server answers that with a bare 500 "Internal server error": answered as
    `generate` answers it, a 400 saying why."""
    start, body = None, b""

    async def send_refused(message):
        nonlocal start, body
        if message["type"] == "http.response.start" and message["status"] == 500:
            start = message
        elif start is None:
            await send(message)
        else:
            body += message.get("body", b"")
            if message.get("more_body"):
                return
            if b'"Internal server error"' in body:  # vLLM's GenerationError, and nothing else
                await openai_error(400, "request refused by the engine: the grammar rejected a token its own mask "
                                        "allowed: the constraint cannot be followed")(
                    {"type": "http"}, None, send)
                return
            await send(start)
            await send({"type": "http.response.body", "body": body})

    return send_refused


def _with_defaults(route: str, body: dict[str, Any]) -> dict[str, Any]:
    """A chat request without a token limit gets this deployment's default, not the whole context;
    with a fixed JSON_LAYOUT, its schemas get it as `generate` gives it."""
    if route == "/v1/chat/completions" and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body = {**body, "max_completion_tokens": DEFAULT_MAX_TOKENS}
    return _laid_out(body) if JSON_LAYOUT else body


def _laid_out(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with JSON_LAYOUT in each schema it constrains the answer with (`x-guidance`). Tool
    calls and `json_object` are constrained by vLLM alone: compact (ENGINE_ARGS)."""

    def lay_out(schema: Any) -> Any:
        if isinstance(schema, str):  # vLLM takes a schema as JSON text too
            with contextlib.suppress(ValueError, RecursionError):
                parsed = json.loads(schema)
                return json.dumps(lay_out(parsed)) if isinstance(parsed, dict) else schema
        return {**schema, "x-guidance": JSON_LAYOUT} if isinstance(schema, dict) else schema

    body = dict(body)
    if "guided_json" in body:
        body["guided_json"] = lay_out(body["guided_json"])
    outputs = body.get("structured_outputs")
    if isinstance(outputs, dict) and "json" in outputs:
        body["structured_outputs"] = {**outputs, "json": lay_out(outputs["json"])}
    fmt = body.get("response_format")
    spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
    if isinstance(spec, dict) and "schema" in spec:
        body["response_format"] = {**fmt, "json_schema": {**spec, "schema": lay_out(spec["schema"])}}
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


APPS = {
    "generate": generate_app,
    "health": health_app,
    "openai": openai_app,
    "warmup": warmup_app,
}


def create_app(kind: str, engine: Any = None, auth: str = "none"):
    """The FastAPI app for one endpoint `kind`, answering from `engine`."""
    return APPS[kind](engine, auth)
