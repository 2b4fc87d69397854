"""The sections that say what the container holds: `[engine]`, `[image]` and `[volumes]`."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..knowledge import parse_pins
from ._base import (
    APP_NAME,
    DEFAULT_PYTHON,
    DEFAULT_UV,
    ENV_VAR,
    PACKAGE,
    POSIX_PATH,
    VERSION,
    Choice,
    Section,
    invalid,
)

# ## [engine]


class EngineKind(Choice):
    vllm = "vllm"
    sglang = "sglang"


class EngineSection(Section):
    kind: EngineKind = Field(
        EngineKind.vllm,
        description="The serving engine: `vllm`, or `sglang` (SGLang's server, in the style of Modal's SGLang "
        "examples). Its package is pinned in `image.pins`.",
        examples=["vllm", "sglang"],
    )


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
        description="Exact versions of the serving stack, installed with uv; the engine's package "
        "(`vllm`, or `sglang`, extras allowed: `\"sglang[all]\"`) is required.",
        examples=[{"vllm": "0.9.2", "transformers": "4.53.0", "xgrammar": "0.1.19"}, {"sglang": "0.5.4.post3"}],
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
        if not re.match(r"^[0-9]+\.[0-9]+\.[0-9]+\Z", value):
            raise invalid(f"`{value}` is not a uv release", f'pin an exact release, e.g. `uv = "{DEFAULT_UV}"`')
        return value

    @field_validator("pins", "web_pins")
    @classmethod
    def _pins(cls, pins: dict[str, str]) -> dict[str, str]:
        for name, version in pins.items():
            if not PACKAGE.match(name):
                raise invalid(f"`{name}` is not a package name", "write the name as published, e.g. `transformers`",
                              (name,))
            if not VERSION.match(version):
                raise invalid(
                    f"`{name}` must be pinned to an exact version, got `{version}`",
                    f'write `"{name}" = "1.2.3"` (no operators: the image is reproducible)',
                    (name,),
                )
        return pins

    @field_validator("packages")
    @classmethod
    def _packages(cls, packages: list[str]) -> list[str]:
        for i, req in enumerate(packages):
            name, sep, version = req.partition("==")
            if not sep or not PACKAGE.match(name) or not VERSION.match(version):
                bare = name.split(">")[0].split("<")[0]
                raise invalid(f"`{req}` is not pinned with `==`", f"write e.g. `{bare}==1.2.3`", (i,))
        return packages

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not ENV_VAR.match(key):
                raise invalid(f"`{key}` is not an environment variable name", "use UPPER_SNAKE_CASE", (key,))
            if any(char in env[key] for char in "\n\r\0"):
                # Modal writes each variable as a Dockerfile `ENV` line: a line break would end it
                raise invalid(f"the value of `{key}` is not one line",
                              "image environment values cannot hold line breaks", (key,))
        return env

    def pin(self, package: str) -> str | None:
        """The pinned version of `package` (names normalized, extras ignored), or None."""
        return parse_pins(self.pins).get(package)

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
        if not APP_NAME.match(value):
            raise invalid(f"`{value}` is not a valid Modal volume name", "use letters, digits, `-`, `_` and `.`")
        return value

    @field_validator("mount")
    @classmethod
    def _mount(cls, value: str) -> str:
        path = value.rstrip("/")
        if not POSIX_PATH.match(value) or not path or {".", ".."} & set(path.split("/")):
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
