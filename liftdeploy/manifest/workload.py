"""The sections that say what runs where: `[app]`, `[model]` and `[compute]`."""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from .. import catalog, urls
from ._base import APP_NAME, LABEL, REASONING_PARSER, Choice, Section, did_you_mean, invalid

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
        description="Modal workspace, to predict endpoint URLs (`plan` asks Modal when it can).",
        examples=["rand"],
    )
    web_suffix: str | None = Field(
        None,
        description="The Modal environment's web suffix (`modal environment list`), to predict endpoint URLs; "
        "default: none for `main`, the environment's name for any other (`plan` asks Modal when it can). "
        'Write `""` for an environment without one.',
        examples=["", "dev"],
    )

    @field_validator("name", "environment")
    @classmethod
    def _name(cls, value: str) -> str:
        if not APP_NAME.match(value):
            raise invalid(
                f"`{value}` is not a valid Modal name",
                "use letters, digits, `-`, `_` and `.`, at most 64 characters",
            )
        return value

    @field_validator("workspace")
    @classmethod
    def _workspace(cls, value: str | None) -> str | None:
        if value is not None and not LABEL.match(value):
            raise invalid(f"`{value}` is not a Modal workspace name",
                          "lowercase letters, digits and `-`, as in its URLs")
        return value

    @field_validator("web_suffix")
    @classmethod
    def _web_suffix(cls, value: str | None) -> str | None:
        if value and not LABEL.match(value):
            raise invalid(f"`{value}` is not a web suffix", 'lowercase letters, digits and `-`, or `""` for none')
        return value

    @property
    def assumed_web_suffix(self) -> str:
        """The web suffix given, or the one to assume (none for `main`, else the env's name)."""
        return self.web_suffix if self.web_suffix is not None else urls.assumed_web_suffix(self.environment)


# ## [model]


class Dtype(Choice):
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
    thinking: bool = Field(
        False,
        description="Let a reasoning model think before its constrained answer. Off: hybrid-thinking models "
        "(Qwen3) get `enable_thinking = false` in their chat template, so the answer starts with the JSON. "
        "On: needs `reasoning_parser`, so vLLM constrains only the answer after the thinking.",
    )
    reasoning_parser: str | None = Field(
        None,
        description="vLLM's reasoning parser for `thinking = true` (`--reasoning-parser`); "
        "known for common models.",
        examples=["qwen3", "deepseek_r1"],
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

    @field_validator("reasoning_parser")
    @classmethod
    def _parser(cls, value: str | None) -> str | None:
        if value is not None and not REASONING_PARSER.match(value):
            raise invalid(f"`{value}` is not a vLLM reasoning parser name", "e.g. `qwen3` or `deepseek_r1`")
        return value

    @property
    def parser(self) -> str | None:
        """The reasoning parser: the manifest's, else the catalogue's for a known model."""
        return self.reasoning_parser or (self.known.reasoning_parser if self.known else None)

    @property
    def thinks(self) -> str | None:
        """How a known model thinks: "hybrid", "always", or None (not a reasoning model, or unknown)."""
        return self.known.thinking if self.known else None

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
            raise invalid(f"expected a GPU name like `\"A100-80GB\"` or `\"H100:2\"`, got {value!r}",
                          'write it as a string, e.g. `gpu = ["A100-80GB", "H100"]`')
        name, _, count = value.partition(":")
        if name.lower() == catalog.ANY_GPU:
            if count:
                raise invalid("`any` takes no count", 'write `"any"`')
            return {"type": catalog.ANY_GPU, "count": 1}
        gpu = catalog.find_gpu(name.strip())
        if gpu is None:
            raise invalid(f"unknown GPU `{name}`", did_you_mean(name.upper(), catalog.gpu_names())
                          or f"Modal offers: {', '.join(catalog.gpu_names())}, or `any`")
        if count and not (count.isdigit() and 1 <= int(count) <= gpu.max_count):
            raise invalid(f"bad GPU count `{count}` for {gpu.name}",
                          f"use 1 to {gpu.max_count}, e.g. `\"{gpu.name}:2\"`")
        return {"type": gpu.name, "count": int(count or 1)}

    @model_serializer
    def _write(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return self.type if self.count == 1 else f"{self.type}:{self.count}"

    @classmethod
    def of(cls, gpu: catalog.Gpu, count: int = 1) -> GpuSpec:
        """A concrete entry, as `any` expands to."""
        return cls.model_construct(type=gpu.name, count=count)

    @property
    def is_any(self) -> bool:
        return self.type == catalog.ANY_GPU

    @cached_property
    def gpu(self) -> catalog.Gpu:
        """The catalog entry: memory, price, FP8. `any` has none: use the expanded chain."""
        found = catalog.find_gpu(self.type)
        if found is None:
            raise ValueError(f"`{self.type}` names no GPU; read `Manifest.gpus`, the expanded chain")
        return found

    @property
    def memory_gib(self) -> float:
        return self.gpu.memory_gib * self.count

    @property
    def usd_per_hour(self) -> float:
        return self.gpu.usd_per_hour * self.count


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
            if spec.is_any and i != len(chain) - 1:
                raise invalid("`any` must be the last entry of the chain", "move `\"any\"` to the end", (i,))
            if names[i] in names[:i]:
                raise invalid(f"`{names[i]}` is listed twice", "list each GPU once, in the order to try them", (i,))
        return chain
