"""Back-of-the-envelope sizing: does the model fit each GPU, what does it cost, how long is a cold start.

The cold-start model is calibrated on the seeds' measured 32B load on an A100-80GB
(423 s: safetensors 43 s, model init 45 s, torch.compile 156 s, CUDA graphs 46 s).
This module reads manifest values but imports no manifest code: the manifest asks it
which GPUs `any` expands to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import catalog

if TYPE_CHECKING:
    from .manifest import GpuSpec, Manifest, ModelSection

KV_RESERVE_FRACTION = 0.10  # of the weights: the least KV cache worth serving with
KV_RESERVE_MIN_GIB = 1.0
CONTAINER_START_S = 15.0
LOAD_GIB_PER_S = 1.4  # safetensors from a Modal Volume: 61 GiB in 43 s
INIT_S_PER_GIB = 0.74  # weights into GPU memory: 45 s for 61 GiB
COMPILE_S = 156.0  # torch.compile, cold
COMPILE_CACHED_S = 30.0  # with the compile cache on a Volume
GRAPHS_S = 46.0  # CUDA graph capture
DOWNLOAD_GIB_PER_S = 0.5  # first start: from the Hub into the Volume


def weights_gib(model: ModelSection) -> float | None:
    """The weights' size in GiB, from the parameter count and the dtype or quantization."""
    if model.size_b is None:
        return None
    per_param = catalog.BYTES_PER_PARAM[model.quantization or model.dtype.value]
    return model.size_b * 1e9 * per_param / 2**30


def needed_gib(model: ModelSection) -> float | None:
    """GPU memory to serve: the weights plus the least KV cache worth serving with."""
    weights = weights_gib(model)
    if weights is None:
        return None
    return weights + max(weights * KV_RESERVE_FRACTION, KV_RESERVE_MIN_GIB)


def usable_gib(spec: GpuSpec, model: ModelSection) -> float:
    """What vLLM may take of the entry's memory, at the model's gpu_memory_utilization."""
    return spec.memory_gib * model.gpu_memory_utilization


def gpus_that_fit(model: ModelSection, count: int, exclude: set[str]) -> list[catalog.Gpu]:
    """What `any` expands to: every GPU not in `exclude` that fits `count` of it, cheapest first."""
    need = needed_gib(model)
    out = []
    for gpu in sorted(catalog.GPUS, key=lambda g: g.usd_per_hour):
        fits = need is None or gpu.memory_gib * count * model.gpu_memory_utilization >= need
        if gpu.name not in exclude and gpu.variant_of is None and fits and count <= gpu.max_count:
            out.append(gpu)
    return out


@dataclass(frozen=True)
class Fit:
    spec: GpuSpec  # an entry of the expanded chain, e.g. H100:2
    usable_gib: float
    needed_gib: float | None

    @property
    def gpu(self) -> str:
        return str(self.spec)

    @property
    def fits(self) -> bool:
        return self.needed_gib is None or self.needed_gib <= self.usable_gib


def fits(m: Manifest) -> list[Fit]:
    """For each GPU of the expanded chain: usable memory versus weights plus a KV-cache reserve."""
    need = needed_gib(m.model)
    return [Fit(spec, usable_gib(spec, m.model), need) for spec in m.gpus]


@dataclass(frozen=True)
class ColdStart:
    first_s: float  # the very first start: download into the Volume, compile from scratch
    typical_s: float  # later starts: weights and compile cache on Volumes

    def describe(self) -> str:
        return f"~{self.typical_s / 60:.1f} min (first start ~{self.first_s / 60:.1f} min)"


def cold_start(m: Manifest) -> ColdStart | None:
    weights = weights_gib(m.model)
    if weights is None:
        return None
    load = weights / LOAD_GIB_PER_S + weights * INIT_S_PER_GIB
    eager = m.cold_start.fast_boot
    compiles = not eager and str(m.engine.kind) == "vllm"  # SGLang runs without torch.compile unless asked
    compile_cold = COMPILE_S if compiles else 0.0
    cached = m.cold_start.compile_cache and m.volumes.compile_cache is not None
    compile_warm = (COMPILE_CACHED_S if cached else COMPILE_S) if compiles else 0.0
    graphs = 0.0 if eager else GRAPHS_S
    download = weights / DOWNLOAD_GIB_PER_S
    typical = CONTAINER_START_S + load + compile_warm + graphs + (0.0 if m.volumes.weights else download)
    first = CONTAINER_START_S + download + load + compile_cold + graphs
    if m.cold_start.snapshot:
        typical = CONTAINER_START_S + weights / LOAD_GIB_PER_S  # restored, not rebuilt
    return ColdStart(first_s=round(first), typical_s=round(typical))
