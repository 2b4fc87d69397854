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
DOWNLOAD_GIB_PER_S = 0.5  # first start: from the Hub into the Volume
# CUDA graph capture, per captured batch size: the seeds captured vLLM 0.9.2's default 67 sizes
# (1, 2, 4, 8, 16, ... 512) in 46 s for 61 GiB of weights and in 32 s for 14 GiB.
GRAPH_S_PER_SIZE = 0.415
GRAPH_S_PER_SIZE_PER_GIB = 0.0045
# A memory snapshot is read from the same storage as Images and Volumes (1-2 GB/s,
# https://modal.com/docs/guide/memory-snapshots); a sleeping vLLM engine holds its weights
# in CPU memory, so the snapshot is about the weights' size; waking copies them back to the GPU.
SNAPSHOT_GIB_PER_S = 1.5
WAKE_GIB_PER_S = 10.0


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


def capture_sizes(max_inputs: int) -> list[int]:
    """The batch sizes vLLM captures CUDA graphs for: its own grid (1, 2, 4, then multiples
    of 8), cut at `max_inputs` and ending with it. vLLM's default runs to 512 (or twice
    `max_num_seqs`): graphs for batches Modal never sends, paid for at every cold start."""
    grid = [1, 2, 4, *range(8, max_inputs, 8)]
    return [size for size in grid if size < max_inputs] + [max_inputs]


@dataclass(frozen=True)
class ColdStart:
    """Seconds per step of a container start; `first` is the very first one (download into the
    Volume, compile from scratch, create the snapshot), `typical` every later one."""

    first: dict[str, float]
    typical: dict[str, float]
    graph_sizes: list[int]

    @property
    def first_s(self) -> float:
        return round(sum(self.first.values()))

    @property
    def typical_s(self) -> float:
        return round(sum(self.typical.values()))

    @staticmethod
    def _steps(steps: dict[str, float]) -> str:
        return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in steps.items() if seconds >= 0.5)

    def describe(self) -> str:
        return (f"~{self.typical_s / 60:.1f} min ({self._steps(self.typical)}); "
                f"first start ~{self.first_s / 60:.1f} min ({self._steps(self.first)})")


def cold_start(m: Manifest) -> ColdStart | None:
    weights = weights_gib(m.model)
    if weights is None:
        return None
    eager = m.cold_start.fast_boot
    compiles = not eager and str(m.engine.kind) == "vllm"  # SGLang runs without torch.compile unless asked
    sizes = [] if eager else capture_sizes(m.concurrency.max_inputs)
    graphs = len(sizes) * (GRAPH_S_PER_SIZE + GRAPH_S_PER_SIZE_PER_GIB * weights)
    start = {"container": CONTAINER_START_S}
    download = {"download": weights / DOWNLOAD_GIB_PER_S}
    load = {"load weights": weights / LOAD_GIB_PER_S + weights * INIT_S_PER_GIB}
    cached = m.compile_cached
    compile_cold = {"torch.compile": COMPILE_S if compiles else 0.0}
    compile_warm = {"torch.compile" + (" (cached)" if cached else ""):
                    (COMPILE_CACHED_S if cached else COMPILE_S) if compiles else 0.0}
    graph = {f"CUDA graphs ({len(sizes)} sizes)": graphs}
    first = {**start, **download, **load, **compile_cold, **graph}
    typical = {**start, **({} if m.volumes.weights else download), **load, **compile_warm, **graph}
    if m.cold_start.snapshot:
        first["snapshot"] = weights / SNAPSHOT_GIB_PER_S
        typical = {**start, "restore snapshot": weights / SNAPSHOT_GIB_PER_S, "wake": weights / WAKE_GIB_PER_S}
    return ColdStart(first, typical, sizes)


def hourly_usd(spec: GpuSpec, m: Manifest) -> float:
    """What one container on `spec` costs per hour: Modal's GPU list price times the region
    multiplier (CPU and memory are extra and small beside a GPU)."""
    return spec.usd_per_hour * catalog.region_multiplier(m.compute.region)
