"""The manifest: one TOML file that declares a deployment, and its env overlays.

`load(path, env=None)` reads the file, deep-merges `[env.<name>]` over the base, and
validates the result into a `Manifest`; every mistake becomes a `Problem` with the file,
the line where it can be found, the key path and a hint.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from . import catalog
from ._toml_lines import locate
from .compat import api_family
from .errors import ManifestError, Problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# ## Named defaults

DEFAULT_PYTHON = "3.12"
DEFAULT_UV = "0.13.9"  # the uv that `check --resolve` resolves with, installing in the image
DEFAULT_SCALEDOWN_WINDOW = 300  # seconds: the seeds' 5-minute keep-warm period
DEFAULT_TIMEOUT = 600  # seconds: the seeds' measured worst case for one request
DEFAULT_STARTUP_TIMEOUT = 1200  # seconds: a 32B model took 7 minutes to load cold
DEFAULT_MAX_INPUTS = 20
MODAL_SCALEDOWN_RANGE = (2, 3600)  # Modal rejects scaledown_window outside this range
MODAL_MAX_TIMEOUT = 24 * 3600
KV_RESERVE_FRACTION = 0.10  # of the weights: the least KV cache worth serving with
KV_RESERVE_MIN_GIB = 1.0

# Every pattern ends in `\Z`, not `$`: `$` also matches before a trailing newline, and a value
# such as "generate\n" would pass (a label becomes a function name in the rendered module).
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")  # a DNS label: Modal URLs use it
_APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_SECRET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?\Z")
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!-]*\Z")
_ENV_VAR = re.compile(r"^[A-Z_][A-Z0-9_]*\Z")
_POSIX_PATH = re.compile(r"^/[A-Za-z0-9._/-]*\Z")
# Credentials that are also valid Secret names: Hugging Face, OpenAI, GitHub, Modal, AWS keys.
_TOKEN_LIKE = re.compile(
    r"^(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|a[ks]-[A-Za-z0-9]{16,}|AKIA[A-Z0-9]{16})\Z"
)


def invalid(message: str, hint: str | None = None, at: tuple[str | int, ...] = ()) -> PydanticCustomError:
    """A validation error with a hint, raised from inside the models.

    `at` is the key path below the validated value that the mistake is in (e.g. the entry
    of a list, or the field a whole-section check blames), so errors name the exact key.
    """
    return PydanticCustomError("liftdeploy", "{message}", {"message": message, "hint": hint, "at": at})


def _did_you_mean(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.upper().startswith(word.upper()[:3])][:1]
    return f"did you mean `{close[0]}`?" if close else None


class Section(BaseModel):
    """Base of every manifest section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ## [app]


class AppSection(Section):
    name: str = Field(
        description="Modal app name; endpoints and `modal app` commands use it.",
        examples=["lift-sys-inference"],
    )
    environment: str = Field(
        "main",
        description="Modal environment to deploy into (`modal environment list`).",
        examples=["main", "dev"],
    )
    workspace: str | None = Field(
        None,
        description="Modal workspace, used only to predict endpoint URLs in `plan`.",
        examples=["rand"],
    )

    @field_validator("name", "environment")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _APP_NAME.match(value):
            raise invalid(
                f"`{value}` is not a valid Modal name",
                "use letters, digits, `-`, `_` and `.`, at most 64 characters",
            )
        return value


# ## [model]


class Dtype(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class ModelSection(Section):
    id: str = Field(
        description="Hugging Face model id.",
        examples=["Qwen/Qwen2.5-Coder-32B-Instruct"],
    )
    revision: str | None = Field(
        None,
        description="Commit or tag of the model repo; pin it to avoid surprises when the repo updates.",
        examples=["main", "b47205940b83b5b484577359f71ee7b88472df67"],
    )
    dtype: Dtype = Field(Dtype.auto, description="Weights dtype passed to vLLM.")
    max_model_len: int | None = Field(
        None, ge=256, le=1_048_576, description="Context length; smaller leaves more room for KV cache.",
        examples=[8192],
    )
    quantization: Literal["fp8", "awq", "gptq", "bitsandbytes"] | None = Field(
        None, description="vLLM quantization method, if any."
    )
    tensor_parallel_size: int = Field(1, ge=1, le=8, description="GPUs to shard the model over.")
    trust_remote_code: bool = Field(False, description="Run the model repo's own Python code.")
    gpu_memory_utilization: float = Field(
        0.90, gt=0.1, le=0.98, description="Fraction of GPU memory vLLM may take."
    )
    params_b: float | None = Field(
        None, gt=0, le=2000,
        description="Parameter count in billions, for sizing; known for common models.",
        examples=[32.8],
    )

    @field_validator("id")
    @classmethod
    def _model_id(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?\Z", value):
            raise invalid(f"`{value}` is not a Hugging Face model id", "write it as `org/name`")
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}\Z", value):
            raise invalid(f"`{value}` is not a git revision", "use a commit hash, tag or branch name")
        return value

    @property
    def known(self) -> catalog.KnownModel | None:
        return catalog.MODELS.get(self.id)

    @property
    def size_b(self) -> float | None:
        """Parameters in billions, from the manifest or the catalogue."""
        return self.params_b or (self.known.params_b if self.known else None)

    @property
    def family(self) -> str:
        return self.known.family if self.known else "qwen2"

    def weights_gib(self) -> float | None:
        if self.size_b is None:
            return None
        per_param = catalog.BYTES_PER_PARAM[self.quantization or self.dtype.value]
        return self.size_b * 1e9 * per_param / 2**30

    def needed_gib(self) -> float | None:
        """GPU memory to serve: the weights plus the least KV cache worth serving with."""
        weights = self.weights_gib()
        if weights is None:
            return None
        return weights + max(weights * KV_RESERVE_FRACTION, KV_RESERVE_MIN_GIB)


# ## [compute]


class GpuSpec(BaseModel):
    """One entry of the GPU fallback chain, written `"H100"` or `"H100:2"`."""

    model_config = ConfigDict(frozen=True)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        # Written as a string in TOML (parsed by `_parse`), not as the object it becomes.
        return {
            "type": "string",
            "title": "GPU",
            "description": cls.__doc__,
            "pattern": r"^[A-Za-z0-9][A-Za-z0-9!+-]*(:[0-9]+)?$",
            "examples": [*catalog.gpu_names(), "H100:2", catalog.ANY_GPU],
        }

    type: str
    count: int = 1

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise invalid(f"expected a GPU name like `\"A100-80GB\"` or `\"H100:2\"`, got {value!r}")
        name, _, count = value.partition(":")
        if name.lower() == catalog.ANY_GPU:
            if count:
                raise invalid("`any` takes no count", 'write `"any"`')
            return {"type": catalog.ANY_GPU, "count": 1}
        gpu = catalog.find_gpu(name.strip())
        if gpu is None:
            raise invalid(f"unknown GPU `{name}`", _did_you_mean(name.upper(), catalog.gpu_names())
                          or f"Modal offers: {', '.join(catalog.gpu_names())}, or `any`")
        if count and not (count.isdigit() and 1 <= int(count) <= gpu.max_count):
            raise invalid(f"bad GPU count `{count}` for {gpu.name}", f"use 1 to {gpu.max_count}, e.g. `\"{gpu.name}:2\"`")
        return {"type": gpu.name, "count": int(count or 1)}

    @model_serializer
    def _write(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return self.type if self.count == 1 else f"{self.type}:{self.count}"

    @property
    def gpu(self) -> catalog.Gpu:
        found = catalog.find_gpu(self.type)
        assert found is not None, self.type
        return found


class ComputeSection(Section):
    gpu: list[GpuSpec] = Field(
        description="GPU types to try, in order (Modal's fallback chain). "
        '`"any"` as the last entry adds every other GPU that fits the model, cheapest first.',
        examples=[["A100-80GB", "H100"], ["H100:2"], ["L40S", "any"]],
        min_length=1,
    )
    cpu: float | None = Field(None, gt=0, le=64, description="CPU cores to reserve.", examples=[4.0])
    memory: int | None = Field(None, ge=128, le=1_048_576, description="Memory to reserve, in MiB.",
                               examples=[32768])
    region: str | list[str] | None = Field(None, description="Modal region(s) to run in.",
                                            examples=["us-east", ["us-east", "us-west"]])

    @field_validator("gpu", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("gpu")
    @classmethod
    def _chain(cls, chain: list[GpuSpec]) -> list[GpuSpec]:
        names = [str(g) for g in chain]
        for i, spec in enumerate(chain):
            if spec.type == catalog.ANY_GPU and i != len(chain) - 1:
                raise invalid("`any` must be the last entry of the chain", "move `\"any\"` to the end", (i,))
            if names[i] in names[:i]:
                raise invalid(f"`{names[i]}` is listed twice", "list each GPU once, in the order to try them", (i,))
        return chain


# ## [image]


class ImageSection(Section):
    python: Literal["3.10", "3.11", "3.12", "3.13"] = Field(
        DEFAULT_PYTHON, description="Python version in the container image."
    )
    base: str | None = Field(
        None,
        description="Registry image to build on (e.g. a CUDA devel image); default: Modal's debian_slim.",
        examples=["nvidia/cuda:12.4.1-devel-ubuntu22.04"],
    )
    pins: dict[str, str] = Field(
        description="Exact versions of the serving stack, installed with uv; `vllm` is required.",
        examples=[{"vllm": "0.9.2", "transformers": "4.53.0", "xgrammar": "0.1.19"}],
    )
    packages: list[str] = Field(
        [],
        description="Further requirements for the image, each pinned with `==`.",
        examples=[["hf-transfer==0.1.9"]],
    )
    uv: str = Field(
        DEFAULT_UV,
        description="uv release that installs the packages in the image (a tag of ghcr.io/astral-sh/uv).",
        examples=[DEFAULT_UV],
    )
    web_pins: dict[str, str] = Field(
        {"fastapi[standard]": "0.115.12", "pydantic": "2.11.7"},
        description="Exact versions for the light image that serves `health` without a GPU.",
    )
    env: dict[str, str] = Field(
        {}, description="Environment variables set in the image.",
        examples=[{"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}],
    )

    @field_validator("base")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*\Z", value):
            raise invalid(f"`{value}` is not an image reference", "e.g. `nvidia/cuda:12.4.1-devel-ubuntu22.04`")
        return value

    @field_validator("uv")
    @classmethod
    def _uv(cls, value: str) -> str:
        if not re.match(r"^[0-9]+\.[0-9]+\.[0-9]+$", value):
            raise invalid(f"`{value}` is not a uv release", f'pin an exact release, e.g. `uv = "{DEFAULT_UV}"`')
        return value

    @field_validator("pins", "web_pins")
    @classmethod
    def _pins(cls, pins: dict[str, str]) -> dict[str, str]:
        for name, version in pins.items():
            if not _PACKAGE.match(name):
                raise invalid(f"`{name}` is not a package name", at=(name,))
            if not _VERSION.match(version):
                raise invalid(
                    f"`{name}` must be pinned to an exact version, got `{version}`",
                    f'write `"{name}" = "1.2.3"` (no operators: the image is reproducible)',
                    (name,),
                )
        return pins

    @field_validator("pins")
    @classmethod
    def _needs_vllm(cls, pins: dict[str, str]) -> dict[str, str]:
        if "vllm" not in pins:
            raise invalid("`vllm` must be pinned", 'add `vllm = "0.9.2"` (or the release you test with)')
        try:
            api_family(pins["vllm"])  # the renderer picks the structured-output API by release
        except ValueError as exc:  # packaging's InvalidVersion is a ValueError
            raise invalid(f"`vllm = \"{pins['vllm']}\"` cannot be rendered: {exc}",
                          'pin a vLLM release, e.g. `vllm = "0.9.2"`') from None
        return pins

    @field_validator("packages")
    @classmethod
    def _packages(cls, packages: list[str]) -> list[str]:
        for i, req in enumerate(packages):
            name, sep, version = req.partition("==")
            if not sep or not _PACKAGE.match(name) or not _VERSION.match(version):
                raise invalid(f"`{req}` is not pinned with `==`", f"write e.g. `{name.split('>')[0].split('<')[0]}==1.2.3`",
                              (i,))
        return packages

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not _ENV_VAR.match(key):
                raise invalid(f"`{key}` is not an environment variable name", "use UPPER_SNAKE_CASE", (key,))
            if any(char in env[key] for char in "\n\r\0"):
                # Modal writes each variable as a Dockerfile `ENV` line: a line break would end it
                raise invalid(f"the value of `{key}` is not one line",
                              "image environment values cannot hold line breaks", (key,))
        return env

    @property
    def vllm(self) -> str:
        return self.pins["vllm"]

    def requirements(self) -> list[str]:
        return [f"{name}=={version}" for name, version in self.pins.items()] + list(self.packages)


# ## [volumes]


class VolumeSpec(Section):
    name: str = Field(description="Modal Volume name (kebab-case).", examples=["lift-sys-models"])
    mount: str = Field(description="Absolute path in the container.", examples=["/models"])
    create_if_missing: bool = Field(True, description="Create the volume on first deploy.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _APP_NAME.match(value):
            raise invalid(f"`{value}` is not a valid Modal volume name", "use letters, digits, `-`, `_` and `.`")
        return value

    @field_validator("mount")
    @classmethod
    def _mount(cls, value: str) -> str:
        path = value.rstrip("/")
        if not _POSIX_PATH.match(value) or not path or {".", ".."} & set(path.split("/")):
            raise invalid(f"`{value}` is not an absolute container path", "e.g. `/models`")
        return path


class VolumesSection(Section):
    weights: VolumeSpec | None = Field(
        None, description="Cache of model weights (HF_HOME), so cold starts skip the download."
    )
    compile_cache: VolumeSpec | None = Field(
        None, description="vLLM's torch.compile cache, so cold starts skip recompiling."
    )

    @model_validator(mode="after")
    def _distinct(self) -> VolumesSection:
        if self.weights and self.compile_cache and self.weights.mount == self.compile_cache.mount:
            raise invalid("`weights` and `compile_cache` are mounted at the same path", "give each its own mount",
                          ("compile_cache", "mount"))
        return self


# ## [scaling] and [concurrency]


class ScalingSection(Section):
    scaledown_window: int = Field(
        DEFAULT_SCALEDOWN_WINDOW, description="Seconds an idle container stays up (Modal allows 2 to 3600)."
    )
    min_containers: int = Field(0, ge=0, le=100, description="Containers kept warm even when idle (billed).")
    max_containers: int | None = Field(None, ge=1, le=1000, description="Upper bound on containers.")
    buffer_containers: int | None = Field(None, ge=0, le=100, description="Extra idle containers under load.")
    timeout: int = Field(DEFAULT_TIMEOUT, ge=1, le=MODAL_MAX_TIMEOUT, description="Seconds one request may take.")
    startup_timeout: int = Field(
        DEFAULT_STARTUP_TIMEOUT, ge=1, le=MODAL_MAX_TIMEOUT,
        description="Seconds a container may take to start (model load included).",
    )

    @field_validator("scaledown_window")
    @classmethod
    def _window(cls, value: int) -> int:
        low, high = MODAL_SCALEDOWN_RANGE
        if not low <= value <= high:
            raise invalid(f"scaledown_window must be between {low} and {high} seconds, got {value}",
                          "Modal's limit; 300 keeps a container warm for 5 minutes")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> ScalingSection:
        if self.max_containers is not None and self.min_containers > self.max_containers:
            raise invalid(
                f"min_containers ({self.min_containers}) is above max_containers ({self.max_containers})",
                "raise max_containers or lower min_containers",
                ("min_containers",),
            )
        return self


class ConcurrencySection(Section):
    max_inputs: int = Field(DEFAULT_MAX_INPUTS, ge=1, le=1000,
                            description="Requests one container serves at once (vLLM batches them).")
    target_inputs: int | None = Field(None, ge=1, le=1000,
                                      description="Autoscaler target per container; at most max_inputs.")
    queue: int = Field(0, ge=0, le=10_000,
                       description="Requests that may wait per container beyond max_inputs before 503.")

    @model_validator(mode="after")
    def _target(self) -> ConcurrencySection:
        if self.target_inputs is not None and self.target_inputs > self.max_inputs:
            raise invalid(
                f"target_inputs ({self.target_inputs}) is above max_inputs ({self.max_inputs})",
                "Modal requires target_inputs <= max_inputs",
                ("target_inputs",),
            )
        return self


# ## [cold_start]


class ColdStartSection(Section):
    fast_download: bool = Field(True, description="High-throughput weight downloads (hf-xet / hf_transfer).")
    compile_cache: bool = Field(True, description="Keep vLLM's compile cache on `volumes.compile_cache`.")
    fast_boot: bool = Field(False, description="Skip CUDA graph capture and torch.compile (enforce_eager): "
                                               "faster start, slower tokens.")
    snapshot: bool = Field(False, description="Modal memory + GPU snapshot of the loaded engine (experimental).")
    keep_warm_schedule: str | None = Field(
        None, description="Cron schedule that pings the model so it stays loaded.",
        examples=["*/10 8-18 * * 1-5"],
    )

    @field_validator("keep_warm_schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^([0-9*/,-]+\s+){4}[0-9*/,-]+\Z", value.strip()):
            raise invalid(f"`{value}` is not a cron schedule", 'five fields, e.g. `"*/10 8-18 * * 1-5"`')
        return value


# ## [decoding]


class DecodingSection(Section):
    backend: Literal["guidance", "xgrammar"] | None = Field(
        None, description="Structured-output backend inside vLLM; default: guidance where the pinned vLLM "
        "has it (0.9 and later), else xgrammar.",
    )
    retries_on_invalid: int = Field(
        2, ge=0, le=5, description="Times `generate` samples again when a finished output breaks its schema: "
        "for keywords the backend cannot enforce (e.g. `dependencies`, `not`); each attempt's tokens count.",
    )
    whitespace: Literal["compact", "any"] = Field(
        "compact", description="`compact`: no free whitespace between JSON tokens (fewer tokens, needs vLLM 0.9 "
        "or later); `any`: the backend's default, which lets the model spend tokens on whitespace.",
    )
    max_tokens: int = Field(2048, ge=1, description="Default `max_tokens` of a request.")
    max_tokens_limit: int = Field(8192, ge=1, description="Largest `max_tokens` a request may ask for.")
    temperature: float = Field(0.3, ge=0, le=2, description="Default sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Default nucleus sampling top_p.")
    max_prompt_chars: int = Field(32_000, ge=1, description="Longest prompt accepted, in characters.")
    max_schema_bytes: int = Field(65_536, ge=64, description="Largest JSON schema accepted, in bytes.")
    max_schema_depth: int = Field(32, ge=2, le=256, description="Deepest nesting accepted in a schema.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted.")
    schema_compile_timeout: float = Field(10.0, gt=0, le=300,
                                          description="Seconds a schema may take to compile to a grammar.")

    @model_validator(mode="after")
    def _bounds(self) -> DecodingSection:
        if self.max_tokens > self.max_tokens_limit:
            raise invalid(
                f"max_tokens ({self.max_tokens}) is above max_tokens_limit ({self.max_tokens_limit})",
                "lower max_tokens or raise max_tokens_limit",
                ("max_tokens",),
            )
        return self


# ## [[endpoints]]


class EndpointKind(str, Enum):
    health = "health"
    warmup = "warmup"
    generate = "generate"
    openai = "openai"


class Auth(str, Enum):
    proxy = "proxy"  # Modal proxy auth: Modal-Key / Modal-Secret headers
    bearer = "bearer"  # Authorization: Bearer <token from the Modal Secret in secrets.bearer>
    none = "none"


class Endpoint(Section):
    kind: EndpointKind = Field(description="What the endpoint serves.")
    label: str = Field(None, description="URL label: <workspace>--<label>.modal.run; default: the kind.",  # type: ignore[assignment]
                       examples=["generate"])
    auth: Auth = Field(Auth.proxy, description="How callers authenticate; `none` must be explicit.")

    @model_validator(mode="before")
    @classmethod
    def _default_label(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("label") is None and isinstance(data.get("kind"), str):
            data = {**data, "label": data["kind"]}
        return data

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        if not _LABEL.match(value):
            raise invalid(f"`{value}` is not a valid endpoint label",
                          "lowercase letters, digits and `-`, at most 63 characters")
        return value

    @property
    def on_gpu(self) -> bool:
        return self.kind is not EndpointKind.health


# ## [secrets]


class SecretsSection(Section):
    names: list[str] = Field([], description="Modal Secrets injected into the GPU containers (by name).",
                             examples=[["huggingface"]])
    bearer: str | None = Field(
        None, description="Modal Secret holding `LIFTDEPLOY_API_TOKEN`, for endpoints with auth = \"bearer\".",
        examples=["lift-sys-api-token"],
    )

    @field_validator("names")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for i, name in enumerate(names):
            try:
                cls._name(name)
            except PydanticCustomError as error:
                raise invalid(error.context["message"], error.context["hint"], (i,)) from None
        return names

    @field_validator("bearer")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _SECRET_NAME.match(value):
            raise invalid(f"`{value}` is not a Modal Secret name",
                          "name the Secret (`modal secret create NAME KEY=...`), never its value")
        if value is not None and _TOKEN_LIKE.match(value):
            raise invalid(f"`{value[:3]}...` looks like a token, not a Modal Secret name",
                          "put the token in a Modal Secret (`modal secret create NAME KEY=...`), "
                          "write the Secret's name here, and revoke the token: it may have been shared")
        return value


# ## The manifest


class Manifest(Section):
    """A deployment: the model, where it runs, how it scales and what it serves."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="liftdeploy manifest")

    app: AppSection
    model: ModelSection
    compute: ComputeSection
    image: ImageSection
    volumes: VolumesSection = VolumesSection()
    scaling: ScalingSection = ScalingSection()
    concurrency: ConcurrencySection = ConcurrencySection()
    cold_start: ColdStartSection = ColdStartSection()
    decoding: DecodingSection = DecodingSection()
    endpoints: list[Endpoint] = Field(
        default_factory=lambda: [Endpoint(kind=k) for k in ("health", "warmup", "generate")],
        description="What the app serves; each label is its own URL.",
    )
    secrets: SecretsSection = SecretsSection()
    env: dict[str, dict[str, Any]] = Field(
        {}, description="Overlays deep-merged over the base by `--env NAME` (e.g. dev, prod).",
    )

    @field_validator("endpoints")
    @classmethod
    def _unique_labels(cls, endpoints: list[Endpoint]) -> list[Endpoint]:
        seen: dict[str, int] = {}
        for i, ep in enumerate(endpoints):
            if ep.label in seen:
                raise invalid(f"label `{ep.label}` is used by endpoints[{seen[ep.label]}] and endpoints[{i}]",
                              "each endpoint needs its own label (its own URL)", (i, "label"))
            seen[ep.label] = i
        if not endpoints:
            raise invalid("no endpoints", 'add `[[endpoints]]` with `kind = "generate"`')
        return endpoints

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in env:
            if not _LABEL.match(name):
                raise invalid(f"`{name}` is not a valid env name", "lowercase letters, digits and `-`", (name,))
        return env

    @model_validator(mode="after")
    def _across_sections(self) -> Manifest:
        bearer = [(i, ep.label) for i, ep in enumerate(self.endpoints) if ep.auth is Auth.bearer]
        if bearer and not self.secrets.bearer:
            raise invalid(f"endpoint `{bearer[0][1]}` uses bearer auth but no secret holds the token",
                          'set `secrets.bearer = "NAME"` of a Modal Secret with LIFTDEPLOY_API_TOKEN',
                          ("endpoints", bearer[0][0], "auth"))
        if self.cold_start.compile_cache and self.volumes.compile_cache is None:
            raise invalid("cold_start.compile_cache needs a volume",
                          'add `[volumes.compile_cache]` with `name` and `mount = "/root/.cache/vllm"`,'
                          " or set `cold_start.compile_cache = false`", ("cold_start", "compile_cache"))
        if any(ep.kind is EndpointKind.generate or ep.kind is EndpointKind.openai for ep in self.endpoints) is False:
            raise invalid("nothing serves the model", 'add an endpoint with `kind = "generate"` or `"openai"`',
                          ("endpoints",))
        count = self.model.tensor_parallel_size
        for i, spec in enumerate(self.compute.gpu):
            if spec.type != catalog.ANY_GPU and spec.count < count:
                raise invalid(f"tensor_parallel_size is {count} but `{spec}` has {spec.count} GPU(s)",
                              f'write `"{spec.type}:{count}"`', ("compute", "gpu", i))
        return self

    # ## Derived values used by checks, plan and render

    @property
    def backend(self) -> str:
        """The structured-output backend the engine runs: the manifest's, or the pinned vLLM's default."""
        from .compat import default_backend

        return self.decoding.backend or default_backend(self.image.vllm)

    @property
    def generates(self) -> bool:
        return any(ep.on_gpu for ep in self.endpoints)

    def gpu_chain(self) -> list[str]:
        """The fallback chain with `any` expanded: every other GPU that fits, cheapest first."""
        chain = [str(g) for g in self.compute.gpu if g.type != catalog.ANY_GPU]
        if len(chain) == len(self.compute.gpu):
            return chain
        need = self.model.needed_gib()
        count = self.model.tensor_parallel_size
        named = {g.type for g in self.compute.gpu}
        for gpu in sorted(catalog.GPUS, key=lambda g: g.usd_per_hour):
            fits = need is None or gpu.memory_gib * count * self.model.gpu_memory_utilization >= need
            if gpu.name not in named and gpu.variant_of is None and fits and count <= gpu.max_count:
                chain.append(gpu.name if count == 1 else f"{gpu.name}:{count}")
        return chain


# ## Loading


class Loaded(BaseModel):
    """A validated manifest with where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    manifest: Manifest
    path: Path
    env: str | None
    sha256: str  # of the file's bytes: the render header and apply state name it

    @property
    def label(self) -> str:
        return f"{self.path}" + (f" (env {self.env})" if self.env else "")


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (lists included) is replaced by the overlay."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read(path: Path | str) -> tuple[dict[str, Any], str, bytes]:
    """Parse a manifest file; a missing file or bad TOML is a ManifestError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError.single(path, "no such file", "check the path; example manifests live in deployments/") from None
    except IsADirectoryError:
        raise ManifestError.single(path, "is a directory, not a manifest", "pass a .toml file") from None
    except OSError as exc:
        raise ManifestError.single(path, f"cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError.single(path, "is not UTF-8 text", "save the manifest as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        line = int(match.group(1)) if match else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        raise ManifestError.single(path, f"invalid TOML: {message[:1].lower() + message[1:]}",
                                   "see https://toml.io for the syntax", line=line) from None
    except RecursionError:
        raise ManifestError.single(path, "invalid TOML: arrays or tables nested too deeply",
                                   "a manifest nests a few levels at most; is this the right file?") from None
    return data, text, raw


def load(path: Path | str, env: str | None = None) -> Loaded:
    """Read, merge the env overlay and validate; raises ManifestError listing every problem."""
    path = Path(path)
    data, text, raw = read(path)
    overlays = data.get("env", {})
    merged = data
    if env is not None:
        if not isinstance(overlays, dict) or env not in overlays:
            names = sorted(overlays) if isinstance(overlays, dict) else []
            hint = (_did_you_mean(env, names) or f"this manifest defines: {', '.join(names)}") if names \
                else "this manifest has no `[env.<name>]` tables"
            raise ManifestError.single(path, f"no env `{env}`", hint, path="env")
        if not isinstance(overlays[env], dict):
            raise ManifestError.single(path, f"`env.{env}` must be a table", f"write `[env.{env}]` and the keys it changes",
                                       path=f"env.{env}", line=locate(text, ["env", env]))
        merged = deep_merge({k: v for k, v in data.items() if k != "env"}, overlays[env])
        merged["env"] = overlays
    try:
        # Strict, as JSON: TOML's types map onto JSON's, and `max_inputs = true` or
        # `trust_remote_code = "yes"` are mistakes to report, not values to coerce.
        manifest = Manifest.model_validate_json(json.dumps(merged, default=str), strict=True)
    except ValidationError as exc:
        raise ManifestError(_problems(exc, path, text, env)) from None
    if env is None:
        _validate_overlay_keys(path, text, overlays)
    return Loaded(manifest=manifest, path=path, env=env, sha256=hashlib.sha256(raw).hexdigest())


def _validate_overlay_keys(path: Path, text: str, overlays: Any) -> None:
    """Catch typos inside `[env.*]` even when no env is selected (each overlay must validate)."""
    if not isinstance(overlays, dict):
        return
    problems: list[Problem] = []
    for name in overlays:
        try:
            load(path, env=name)
        except ManifestError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ManifestError(problems)


def _problems(exc: ValidationError, path: Path, text: str, env: str | None) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        loc += (error.get("ctx") or {}).get("at", ())
        key = _key_path(loc)
        hint = (error.get("ctx") or {}).get("hint")
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"unknown key `{loc[-1]}`"
            hint = _did_you_mean(str(loc[-1]), _fields_at(loc[:-1])) or f"allowed here: {', '.join(_fields_at(loc[:-1]))}"
        elif error["type"] == "missing":
            message = "is required"
            hint = hint or _missing_hint(loc)
        elif error["type"] in ("enum", "literal_error") and isinstance(error.get("input"), str):
            message = _plain(message, error)
            choices = re.findall(r"'([^']*)'", (error.get("ctx") or {}).get("expected", ""))
            hint = _did_you_mean(error["input"], choices) or hint
        elif error["type"] != "liftdeploy":
            message = _plain(message, error)
        line = locate(text, loc, env)
        if env is not None and line is None:
            line = locate(text, loc, None)
        problems.append(Problem(str(path) + (f" [env {env}]" if env else ""), key, message, hint, line))
    return problems


def _key_path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(loc: list[Any]) -> list[str]:
    model: Any = Manifest
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args] + [a for arg in args for a in getattr(arg, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _missing_hint(loc: list[Any]) -> str | None:
    return {
        ("app",): "add an `[app]` table with `name = \"my-app\"`",
        ("model",): "add a `[model]` table with `id = \"org/name\"`",
        ("compute",): "add `[compute]` with `gpu = [\"A100-80GB\"]`",
        ("image",): "add `[image]` with `pins = { vllm = \"0.9.2\" }`",
    }.get(tuple(loc))


def _plain(message: str, error: Any) -> str:
    """pydantic's wording, lowercased and without its `Value error,` prefix."""
    message = re.sub(r"^(Value|Assertion) error, ", "", message)
    message = message.replace("an object", "a table")  # TOML's word for it
    return message[:1].lower() + message[1:] + (f", got {error['input']!r}" if error["type"].endswith(("_type", "_parsing", "literal_error", "enum")) and not isinstance(error.get("input"), (dict, list)) else "")


def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema, for editors (Taplo / Even Better TOML)."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
