# Rendered by liftdeploy 0.1.0 from "deployments/qwen3-coder-30b.toml"; edit the manifest, not this file.
# manifest sha256: 22fb39c06584658c7116cb98a0e012c556cb28716373469174da059301c6a977
# re-render: liftdeploy render "deployments/qwen3-coder-30b.toml"
"""Schema-constrained JSON generation on Modal with SGLang: SGLang's server runs in the
container, as in Modal's SGLang examples, and its grammar backend (llguidance)
constrains every token to the JSON schema sent with each request.

Read it top to bottom: first this deployment (model, images, weights, configuration and the Modal
functions), then the SGLang server, last the serving runtime every liftdeploy module shares (request
validation, schemas, one small FastAPI app per endpoint).
"""

# No `from __future__ import annotations`: FastAPI resolves a string annotation in the
# module's globals, and `Request` is imported inside the app builders (fastapi is not needed
# to import this module), so `authorized(request: Request)` would become a required query field.
import asyncio
import collections
import concurrent.futures
import contextlib
import json
import math
import threading
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
ENGINE_NAME = f"SGLang {SGLANG_VERSION}"
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

# ## Serving configuration

# The structured-output backend SGLang runs (one per server: its --grammar-backend in SERVER_ARGS).
BACKEND = "guidance"
COMPACT_JSON = False  # no free whitespace between JSON tokens (in SERVER_ARGS too)
JSON_LAYOUT = None  # fixed layouts (`spaced`) are for vLLM's guidance backend only
# Hybrid-thinking models (Qwen3) answer at once, no thinking first; other chat templates ignore it.
CHAT_TEMPLATE_KWARGS = {"enable_thinking": False}

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
        self.dead = False
        self.load_seconds: float | None = None
        self.process = None
        self.session = None
        self._running = 0
        self.schemas = SchemaGate(self.prepare)

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

    def prepare(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The schema to constrain with, rewritten for the backend; SGLang's grammar backend is the
        judge of the rest: a schema it refuses comes back as an abort (400) with its reason."""
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"invalid JSON Schema: {exc.message}") from None
        return guidance_schema(schema) if BACKEND == "guidance" else xgrammar_safe(schema)

    def running(self) -> int:
        """Requests sent to SGLang and not yet answered."""
        return self._running

    async def generate(self, messages: list[dict[str, str]], schema: dict[str, Any] | None, *,
                       max_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        import aiohttp

        if self.session is None:  # one connection pool, made on the serving event loop
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        prompt = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **CHAT_TEMPLATE_KWARGS
        )
        body = {
            "text": prompt,
            "sampling_params": sampling_params(schema, max_tokens=max_tokens, temperature=temperature, top_p=top_p),
        }
        self._running += 1
        try:  # a cancelled request closes its connection, and SGLang aborts it
            async with self.session.post(self.url + "/generate", json=body) as response:
                answer = await response.json(content_type=None)
        except aiohttp.ClientConnectionError:
            if self.process is not None and self.process.poll() is not None:
                self.dead, self.ready = True, False
            raise Busy("the SGLang server did not answer") from None
        finally:
            self._running -= 1
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


def base_app(kind: str, auth: str):
    """A FastAPI app with what every endpoint shares: body limit, 422s that never fail, auth."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def authorized(request: Request) -> None:
        return  # proxy auth is enforced by Modal in front of the app

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
# Chat completions in OpenAI's shape, on the same engine and limits as `generate` (SGLang's own
# OpenAI server runs in this container too, but behind none of this deployment's limits).


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


def openai_app(engine: Any, auth: str):
    from fastapi import HTTPException, Request

    api = base_app("openai", auth)

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": APP_NAME}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
        fmt = body.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise HTTPException(422, detail="response_format.json_schema is required for type json_schema")
        schema = None
        if fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.schema_
        elif fmt is not None and fmt.type == "json_object":
            schema = {"type": "object"}
        result = await until_disconnected(request, constrained(
            engine, [message.model_dump() for message in body.messages], schema,
            max_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=body.temperature, top_p=body.top_p,
        ))
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


APPS = {
    "generate": generate_app,
    "health": health_app,
    "openai": openai_app,
    "warmup": warmup_app,
}


def create_app(kind: str, engine: Any = None, auth: str = "none"):
    """The FastAPI app for one endpoint `kind`, answering from `engine`."""
    return APPS[kind](engine, auth)
