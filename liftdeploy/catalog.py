"""What liftdeploy knows about Modal's GPUs and common models, for validation and sizing.

GPU names follow Modal's `gpu=` strings (https://modal.com/docs/guide/gpu); prices are
Modal's list prices in USD per GPU-hour, read 2025-10, for estimates only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str  # Modal's spelling
    memory_gib: float
    usd_per_hour: float
    max_count: int = 8
    fp8: bool = False  # native FP8 tensor cores (Ada, Hopper, Blackwell)
    aliases: tuple[str, ...] = ()
    variant_of: str | None = None  # Modal's `H100!` (never upgraded) / `B200+` (may be upgraded)


GPUS: tuple[Gpu, ...] = (
    Gpu("T4", 16, 0.59),
    Gpu("L4", 24, 0.80, fp8=True),
    Gpu("A10G", 24, 1.10, max_count=4, aliases=("A10",)),
    Gpu("L40S", 48, 1.95, fp8=True),
    Gpu("A100-40GB", 40, 2.10, aliases=("A100",)),
    Gpu("A100-80GB", 80, 2.50),
    Gpu("RTX-PRO-6000", 96, 3.03, fp8=True),
    Gpu("H100", 80, 3.95, fp8=True),
    Gpu("H100!", 80, 3.95, fp8=True, variant_of="H100"),
    Gpu("H200", 141, 4.54, fp8=True),
    Gpu("B200", 192, 6.25, fp8=True),
    Gpu("B200+", 192, 6.25, fp8=True, variant_of="B200"),
)

# `"any"` at the end of a fallback chain: the cheapest few other GPUs that fit the model.
ANY_GPU = "any"
ANY_GPU_WIDTH = 3  # how many GPUs `any` adds: enough to ride out a shortage, not every GPU up to B200

# Modal's price multiplier for a Function pinned to a region
# (https://modal.com/docs/guide/region-selection#pricing, read 2026-11): broad regions 1.5x,
# narrow ones 1.75x; a list spanning both pays the smaller.
BROAD_REGIONS = frozenset({"us", "eu", "ap", "uk", "ca", "me", "sa", "af", "mx"})
BROAD_REGION_MULTIPLIER = 1.5
NARROW_REGION_MULTIPLIER = 1.75


def region_multiplier(region: str | list[str] | None) -> float:
    """What Modal multiplies the base price by for `region=` (1.0 when no region is set)."""
    if not region:
        return 1.0
    regions = [region] if isinstance(region, str) else region
    return min(BROAD_REGION_MULTIPLIER if r.lower() in BROAD_REGIONS else NARROW_REGION_MULTIPLIER
               for r in regions)


def gpu_names() -> list[str]:
    return [g.name for g in GPUS]


def find_gpu(name: str) -> Gpu | None:
    wanted = name.upper()
    for gpu in GPUS:
        if wanted == gpu.name.upper() or wanted in (a.upper() for a in gpu.aliases):
            return gpu
    return None


@dataclass(frozen=True)
class KnownModel:
    params_b: float  # parameters, in billions: all of them, every expert of a mixture of experts
    family: str  # architecture family (Hugging Face `model_type`)
    active_b: float | None = None  # a mixture of experts: parameters used per token
    # How the model thinks before it answers: "hybrid" (its chat template's `enable_thinking`
    # turns it on or off, e.g. Qwen3), "always" (it cannot be turned off), or None.
    thinking: str | None = None
    reasoning_parser: str | None = None  # vLLM's parser that splits the thinking from the answer


def moe_sizes(model_id: str) -> tuple[float, float] | None:
    """`(total, active)` billions from a mixture-of-experts name such as `Qwen3-Coder-30B-A3B`."""
    match = re.search(r"(\d+(?:\.\d+)?)B-A(\d+(?:\.\d+)?)B", model_id, re.IGNORECASE)
    return (float(match.group(1)), float(match.group(2))) if match else None


# A few common models so users need not state their size; anything else can set
# `model.params_b` in the manifest.
MODELS: dict[str, KnownModel] = {
    "Qwen/Qwen2.5-Coder-32B-Instruct": KnownModel(32.8, "qwen2"),
    "Qwen/Qwen2.5-Coder-14B-Instruct": KnownModel(14.8, "qwen2"),
    "Qwen/Qwen2.5-Coder-7B-Instruct": KnownModel(7.6, "qwen2"),
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": KnownModel(1.5, "qwen2"),
    "Qwen/Qwen2.5-7B-Instruct": KnownModel(7.6, "qwen2"),
    "Qwen/Qwen2.5-72B-Instruct": KnownModel(72.7, "qwen2"),
    "Qwen/Qwen3-8B": KnownModel(8.2, "qwen3", thinking="hybrid", reasoning_parser="qwen3"),
    "Qwen/Qwen3-32B": KnownModel(32.8, "qwen3", thinking="hybrid", reasoning_parser="qwen3"),
    "Qwen/Qwen3-4B-Thinking-2507": KnownModel(4.0, "qwen3", thinking="always", reasoning_parser="qwen3"),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": KnownModel(7.6, "qwen2", thinking="always",
                                                         reasoning_parser="deepseek_r1"),
    "Qwen/Qwen3-Coder-30B-A3B-Instruct": KnownModel(30.5, "qwen3_moe", active_b=3.3),
    "meta-llama/Llama-3.1-8B-Instruct": KnownModel(8.0, "llama"),
    "meta-llama/Llama-3.3-70B-Instruct": KnownModel(70.6, "llama"),
    "mistralai/Mistral-7B-Instruct-v0.3": KnownModel(7.2, "mistral"),
}

# Bytes per parameter of the weights, by dtype or quantization.
BYTES_PER_PARAM: dict[str, float] = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "float16": 2.0,
    "auto": 2.0,
    "fp8": 1.0,
    "awq": 0.5,
    "gptq": 0.5,
    "bitsandbytes": 0.5,
}
