"""The manifest: every section, and the rules across sections."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from .. import catalog, compat_sglang, sglang_args, sizing, urls
from ..compat import api_family, default_backend
from ._base import LABEL, Section, invalid
from .image import EngineKind, EngineSection, ImageSection, VolumesSection
from .serving import (
    Auth,
    ColdStartSection,
    ConcurrencySection,
    DecodingSection,
    Endpoint,
    EndpointKind,
    ScalingSection,
    SecretsSection,
)
from .workload import AppSection, ComputeSection, GpuSpec, ModelSection

# ## The manifest

DEFAULT_KINDS = ("health", "warmup", "generate")


def default_label(app_name: str, kind: str) -> str:
    """An endpoint's label when the manifest gives none: `<app name>-<kind>`, as Modal labels
    its own (`<app>-<function>`), so two apps in one environment never claim the same URL."""
    return f"{urls.slug(app_name)}-{kind}"


class Manifest(Section):
    """A deployment: the model, where it runs, how it scales and what it serves."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="liftdeploy manifest")

    app: AppSection
    engine: EngineSection = EngineSection()
    model: ModelSection
    compute: ComputeSection
    image: ImageSection
    volumes: VolumesSection = VolumesSection()
    scaling: ScalingSection = ScalingSection()
    concurrency: ConcurrencySection = ConcurrencySection()
    cold_start: ColdStartSection = ColdStartSection()
    decoding: DecodingSection = DecodingSection()
    endpoints: list[Endpoint] = Field(
        default_factory=lambda: [Endpoint(kind=k, label=k) for k in DEFAULT_KINDS],
        description="What the app serves; each label is its own URL, claimed for the whole Modal environment. "
        "Default: health, warmup and generate, labelled `<app name>-<kind>`.",
    )
    secrets: SecretsSection = SecretsSection()
    env: dict[str, dict[str, Any]] = Field(
        {}, description="Overlays deep-merged over the base by `--env NAME` (e.g. dev, prod).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_labels(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        app = data.get("app")
        name = app.get("name") if isinstance(app, dict) else None
        prefix = (lambda kind: default_label(name, kind)) if isinstance(name, str) and urls.slug(name) else str
        endpoints = data.get("endpoints", [{"kind": kind} for kind in DEFAULT_KINDS])
        if isinstance(endpoints, list):  # (no app name: that is its own error; the kind stands in)
            endpoints = [
                {**ep, "label": prefix(ep["kind"])}
                if isinstance(ep, dict) and ep.get("label") is None and isinstance(ep.get("kind"), str) else ep
                for ep in endpoints
            ]
        return {**data, "endpoints": endpoints}

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
            if not LABEL.match(name):
                raise invalid(f"`{name}` is not a valid env name", "lowercase letters, digits and `-`", (name,))
        return env

    @model_validator(mode="after")
    def _engine_pinned(self) -> Manifest:
        """The engine's package is pinned (the renderer picks its API by release), the other one is not,
        and every setting maps onto the pinned engine."""
        kind = self.engine.kind
        other = EngineKind.sglang if kind is EngineKind.vllm else EngineKind.vllm
        version = self.image.pin(str(kind))
        example = {EngineKind.vllm: "0.9.2", EngineKind.sglang: "0.5.4.post3"}[kind]
        if version is None:
            why = " (`engine.kind` is sglang)" if kind is EngineKind.sglang else ""
            raise invalid(f"`{kind}` must be pinned{why}", f'add `{kind} = "{example}"` (or the release you test with)',
                          ("image", "pins"))
        if self.image.pin(str(other)) is not None:
            raise invalid(f"`{other}` is pinned but `engine.kind` is {kind}",
                          f'set `[engine] kind = "{other}"`, or drop the `{other}` pin', ("image", "pins"))
        try:  # the renderer picks the structured-output API by release
            api_family(version) if kind is EngineKind.vllm else compat_sglang.era(version)
        except ValueError as exc:  # packaging's InvalidVersion is a ValueError
            raise invalid(f"`{kind} = \"{version}\"` cannot be rendered: {exc}",
                          f'pin a {kind} release, e.g. `{kind} = "{example}"`', ("image", "pins", str(kind))) from None
        if kind is EngineKind.sglang:
            for at, message, hint in sglang_args.refusals(self):
                raise invalid(message, hint, at)
        return self

    @model_validator(mode="after")
    def _across_sections(self) -> Manifest:
        bearer = [(i, ep.label) for i, ep in enumerate(self.endpoints) if ep.auth is Auth.bearer]
        if bearer and not self.secrets.bearer:
            raise invalid(f"endpoint `{bearer[0][1]}` uses bearer auth but no secret holds the token",
                          'set `secrets.bearer = "NAME"` of a Modal Secret with LIFTDEPLOY_API_TOKEN',
                          ("endpoints", bearer[0][0], "auth"))
        if self.cold_start.compile_cache is True and self.volumes.compile_cache is None:
            raise invalid("cold_start.compile_cache needs a volume",
                          'add `[volumes.compile_cache]` with `name` and `mount = "/root/.cache/vllm"`,'
                          " or set `cold_start.compile_cache = false`", ("cold_start", "compile_cache"))
        if any(ep.kind is EndpointKind.generate or ep.kind is EndpointKind.openai for ep in self.endpoints) is False:
            raise invalid("nothing serves the model", 'add an endpoint with `kind = "generate"` or `"openai"`',
                          ("endpoints",))
        count = self.model.tensor_parallel_size
        for i, spec in enumerate(self.compute.gpu):
            if not spec.is_any and spec.count < count:
                raise invalid(f"tensor_parallel_size is {count} but `{spec}` has {spec.count} GPU(s)",
                              f'write `"{spec.type}:{count}"`', ("compute", "gpu", i))
        return self

    # ## Derived values used by checks, plan and render

    @property
    def engine_version(self) -> str:
        """The pinned release of the engine (`engine.kind`)."""
        version = self.image.pin(str(self.engine.kind))
        assert version is not None  # validated
        return version

    @property
    def compile_cached(self) -> bool:
        """Whether vLLM's compile cache is kept: only on a volume, on unless switched off."""
        return self.volumes.compile_cache is not None and self.cold_start.compile_cache is not False

    @cached_property
    def gpus(self) -> tuple[GpuSpec, ...]:
        """The fallback chain with `any` expanded to the cheapest few other GPUs that fit
        (`catalog.ANY_GPU_WIDTH`); each entry carries its catalog entry. Computed once."""
        named = tuple(g for g in self.compute.gpu if not g.is_any)
        if len(named) == len(self.compute.gpu):
            return named
        count = self.model.tensor_parallel_size
        others = sizing.gpus_that_fit(self.model, count, exclude={g.type for g in named})
        return named + tuple(GpuSpec.of(gpu, count) for gpu in others[: catalog.ANY_GPU_WIDTH])

    def gpu_chain(self) -> list[str]:
        """The expanded chain as Modal's `gpu=` strings."""
        return [str(g) for g in self.gpus]

    @property
    def whitespace(self) -> str:
        """`compact`, `spaced` or `any`: the manifest's, else the default the eval matrix chose (README,
        docs/answers.md): `spaced` where vLLM runs guidance, whose layouts only it can fix; `any` elsewhere
        (XGrammar and SGLang take only an on/off switch, and free whitespace answered better than none)."""
        if self.decoding.whitespace:
            return self.decoding.whitespace
        return "spaced" if self.engine.kind is EngineKind.vllm and self.backend == "guidance" else "any"

    @property
    def backend(self) -> str:
        """The structured-output backend the engine runs: the manifest's, else guidance where the pinned
        engine has it (it compiles length-bounded strings correctly, see the README), else xgrammar."""
        if self.decoding.backend:
            return self.decoding.backend
        if self.engine.kind is EngineKind.sglang:
            llguidance = compat_sglang.supports(self.engine_version, "grammar-backend-llguidance")
            return "guidance" if llguidance else "xgrammar"
        return default_backend(self.engine_version)


def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema, for editors (Taplo / Even Better TOML)."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
