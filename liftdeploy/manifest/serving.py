"""The sections that say how the app serves: `[scaling]`, `[concurrency]`, `[cold_start]`,
`[decoding]`, `[[endpoints]]` and `[secrets]`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .._tokens import is_token
from ._base import (
    DEFAULT_MAX_INPUTS,
    DEFAULT_SCALEDOWN_WINDOW,
    DEFAULT_STARTUP_TIMEOUT,
    DEFAULT_TIMEOUT,
    LABEL,
    MODAL_MAX_TIMEOUT,
    MODAL_SCALEDOWN_RANGE,
    SECRET_NAME,
    Choice,
    Section,
    invalid,
)

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
    whitespace: Literal["compact", "any"] | None = Field(
        None, description="`compact`: no free whitespace between JSON tokens (fewer tokens; vLLM 0.9 or later, "
        "SGLang 0.5.3.post2 or later); `any`: the backend's default, which lets the model spend tokens on "
        "whitespace. Default: compact where the pinned engine can, else any.", examples=["compact"],
    )
    retries_on_invalid: int = Field(
        2, ge=0, le=5, description="Times `generate` samples again when a finished output breaks its schema: "
        "for keywords the backend cannot enforce (e.g. `if`/`then`, `not`); each attempt's tokens count.",
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


class EndpointKind(Choice):
    health = "health"
    warmup = "warmup"
    generate = "generate"
    openai = "openai"


class Auth(Choice):
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
        if not LABEL.match(value):
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
                context = error.context or {}
                raise invalid(context["message"], context["hint"], (i,)) from None
        return names

    @field_validator("bearer")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not SECRET_NAME.match(value):
            raise invalid(f"`{value}` is not a Modal Secret name",
                          "name the Secret (`modal secret create NAME KEY=...`), never its value")
        if value is not None and is_token(value):
            raise invalid(f"`{value[:3]}...` looks like a token, not a Modal Secret name",
                          "put the token in a Modal Secret (`modal secret create NAME KEY=...`), "
                          "write the Secret's name here, and revoke the token: it may have been shared")
        return value
