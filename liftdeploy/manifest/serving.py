"""The sections that say how the app serves: `[scaling]`, `[concurrency]`, `[cold_start]`,
`[decoding]`, `[[endpoints]]` and `[secrets]`."""

from __future__ import annotations

import zoneinfo
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .._tokens import is_token
from ._base import (
    CRON_DAYS,
    DEFAULT_MAX_INPUTS,
    DEFAULT_SCALEDOWN_WINDOW,
    DEFAULT_STARTUP_TIMEOUT,
    DEFAULT_TIMEOUT,
    ENV_VAR,
    LABEL,
    MODAL_MAX_TIMEOUT,
    MODAL_SCALEDOWN_RANGE,
    SECRET_NAME,
    TIME_OF_DAY,
    TIME_ZONE,
    Choice,
    Section,
    invalid,
)

# ## [scaling] and [concurrency]
# Each key is the Modal setting of the same name, with Modal's meaning:
# https://modal.com/docs/guide/scale and https://modal.com/docs/guide/concurrent-inputs


class BusinessHours(Section):
    """A bigger warm pool during working hours, set by Modal's autoscaler: at `start` a scheduled
    function calls `update_autoscaler(min_containers=...)`, at `end` another restores [scaling]'s."""

    days: str = Field("1-5", description="Days of the week, as cron writes them (0 or 7 is Sunday).",
                      examples=["1-5", "1-6", "*"])
    start: str = Field(description="When the warm pool grows, HH:MM in `timezone`.", examples=["08:00"])
    end: str = Field(description="When it shrinks back, HH:MM in `timezone`.", examples=["18:00"])
    timezone: str = Field(description="IANA time zone of `start` and `end` (no default: say which).",
                          examples=["Europe/Berlin", "America/New_York", "UTC"])
    min_containers: int = Field(1, ge=1, le=100, description="Containers kept warm during the hours (billed).")
    buffer_containers: int | None = Field(None, ge=0, le=100,
                                          description="Extra idle containers under load during the hours.")

    @field_validator("days")
    @classmethod
    def _days(cls, value: str) -> str:
        if not CRON_DAYS.match(value):
            raise invalid(f"`{value}` is not a cron day-of-week field", 'e.g. `"1-5"` (Monday to Friday) or `"*"`')
        return value

    @field_validator("start", "end")
    @classmethod
    def _time(cls, value: str) -> str:
        if not TIME_OF_DAY.match(value):
            raise invalid(f"`{value}` is not a time of day", 'write HH:MM on a 24-hour clock, e.g. `"08:00"`')
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            if not TIME_ZONE.match(value):
                raise ValueError(value)
            zoneinfo.ZoneInfo(value)
        except (ValueError, OSError, zoneinfo.ZoneInfoNotFoundError):  # OSError: a name no file can have
            raise invalid(f"`{value}` is not an IANA time zone", 'e.g. `"Europe/Berlin"` or `"UTC"`') from None
        return value

    @model_validator(mode="after")
    def _order(self) -> BusinessHours:
        if self.start == self.end:
            raise invalid("`start` and `end` are the same time", "give the hours a length", ("end",))
        return self

    def cron(self, at: str) -> str:
        """The cron string for `at` (HH:MM) on these days."""
        hour, minute = at.split(":")
        return f"{int(minute)} {int(hour)} * * {self.days}"


class ScalingSection(Section):
    scaledown_window: int = Field(
        DEFAULT_SCALEDOWN_WINDOW, description="Seconds an idle container stays up (Modal allows 2 to 3600)."
    )
    min_containers: int = Field(0, ge=0, le=100, description="Containers kept warm even when idle (billed).")
    max_containers: int | None = Field(None, ge=1, le=1000, description="Upper bound on containers.")
    buffer_containers: int | None = Field(None, ge=0, le=100,
                                          description="Extra idle containers kept while the app is busy.")
    business_hours: BusinessHours | None = Field(
        None, description="A bigger warm pool on a schedule, through Modal's autoscaler (`update_autoscaler`)."
    )
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
        hours = self.business_hours
        if hours and self.max_containers is not None and hours.min_containers > self.max_containers:
            raise invalid(
                f"business_hours.min_containers ({hours.min_containers}) is above max_containers "
                f"({self.max_containers})", "raise max_containers or lower business_hours.min_containers",
                ("business_hours", "min_containers"),
            )
        return self


class ConcurrencySection(Section):
    max_inputs: int = Field(DEFAULT_MAX_INPUTS, ge=1, le=1000,
                            description="Requests one container serves at once (`@modal.concurrent(max_inputs=...)`); "
                            "vLLM batches them (`max_num_seqs`). Past it, Modal queues requests for another container.")
    target_inputs: int | None = Field(None, ge=1, le=1000,
                                      description="What Modal's autoscaler aims for per container; "
                                      "containers burst up to max_inputs while new ones start.")

    @model_validator(mode="before")
    @classmethod
    def _no_queue(cls, data: Any) -> Any:
        if isinstance(data, dict) and "queue" in data:
            raise invalid("`queue` is gone: on Modal a container never receives more than max_inputs requests, "
                          "so a queue inside it never fills; the rest wait in Modal's input queue",
                          "delete `queue`; raise `scaling.max_containers` or `buffer_containers` to serve more",
                          ("queue",))
        return data

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
    compile_cache: bool | None = Field(
        None, description="Keep vLLM's compile cache on `volumes.compile_cache`; default: on when that volume exists."
    )
    fast_boot: bool = Field(False, description="Skip CUDA graph capture and torch.compile (enforce_eager): "
                                               "faster start, slower tokens.")
    snapshot: bool = Field(
        False, description="Start from a Modal memory + GPU snapshot of the loaded, warmed-up engine, put to sleep "
                           "(vLLM sleep mode); without a GPU snapshot the container starts the engine plainly.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_ping(cls, data: Any) -> Any:
        if isinstance(data, dict) and "keep_warm_schedule" in data:
            raise invalid("`keep_warm_schedule` is gone: a cron ping keeps a container only until scaledown_window "
                          "runs out, and races it",
                          'use `[scaling.business_hours]` (start, end, timezone, min_containers): Modal\'s '
                          "autoscaler then keeps the containers warm", ("keep_warm_schedule",))
        return data


# ## [decoding]


class DecodingSection(Section):
    backend: Literal["guidance", "xgrammar"] | None = Field(
        None, description="Structured-output backend inside vLLM; default: guidance where the pinned vLLM "
        "has it (0.9 and later), else xgrammar.",
    )
    whitespace: Literal["compact", "spaced", "any"] | None = Field(
        None, description="`compact`: no free whitespace between JSON tokens (fewer tokens; vLLM 0.9 or later, "
        "SGLang 0.5.3.post2 or later); `spaced`: no free whitespace either, but json.dumps's one-line layout, "
        '`", "` between items and `": "` after keys, the spacing models saw most (vLLM 0.9 or later with '
        "`backend = \"guidance\"`); `any`: the backend's default, which lets the model spend tokens on "
        "whitespace. Default (chosen on measured answers, docs/answers.md): spaced with vLLM's guidance backend, "
        "else any.", examples=["spaced"],
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
    # Filled in by the manifest when not written (`root.default_label`): never None once loaded.
    label: str = Field(  # type: ignore[assignment]
        None,
        description="URL label: https://<workspace>[-<web suffix>]--<label>.modal.run, one per Modal environment; "
        "default: `<app name>-<kind>`.",
        examples=["lift-sys-generate"],
    )
    auth: Auth = Field(Auth.proxy, description="How callers authenticate; `none` must be explicit.")

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


TOKEN_KEY = "LIFTDEPLOY_API_TOKEN"  # the key of `secrets.bearer` that bearer auth compares against


class SecretsSection(Section):
    names: list[str] = Field([], description="Modal Secrets injected into the GPU containers (by name).",
                             examples=[["huggingface"]])
    bearer: str | None = Field(
        None, description="Modal Secret holding `LIFTDEPLOY_API_TOKEN`, for endpoints with auth = \"bearer\". "
        "The deploy fails if the Secret lacks that key (`required_keys`).",
        examples=["lift-sys-api-token"],
    )
    keys: dict[str, list[str]] = Field(
        {}, description="Keys each Secret of `names` must hold; Modal refuses the deploy when one is missing "
        "(`Secret.from_name(..., required_keys=...)`).",
        examples=[{"huggingface": ["HF_TOKEN"]}],
    )

    @field_validator("keys")
    @classmethod
    def _keys(cls, keys: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, required in keys.items():
            for i, key in enumerate(required):
                if not ENV_VAR.match(key):
                    raise invalid(f"`{key}` is not an environment variable name", "use UPPER_SNAKE_CASE", (name, i))
        return keys

    @model_validator(mode="after")
    def _known_names(self) -> SecretsSection:
        for name in self.keys:
            if name not in self.names and name != self.bearer:
                raise invalid(f"`keys` names `{name}`, which is not a Secret of `names`",
                              f"add `{name}` to `secrets.names`, or remove it from `keys`", ("keys", name))
        return self

    def required_keys(self, name: str) -> list[str]:
        """What Modal must find in Secret `name` before it deploys."""
        keys = list(self.keys.get(name, []))
        if name == self.bearer and TOKEN_KEY not in keys:
            keys.append(TOKEN_KEY)
        return keys

    @property
    def all_names(self) -> list[str]:
        """Every Secret the GPU containers get: `names`, then the bearer Secret."""
        return [*self.names, *([self.bearer] if self.bearer and self.bearer not in self.names else [])]

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
