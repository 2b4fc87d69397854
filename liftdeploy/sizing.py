"""Back-of-the-envelope sizing: does the model fit each GPU, what does it cost, how long is a cold start.

The cold-start model is calibrated on the seeds' measured 32B load on an A100-80GB
(423 s: safetensors 43 s, model init 45 s, torch.compile 156 s, CUDA graphs 46 s).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import catalog
from .manifest import Manifest

CONTAINER_START_S = 15.0
LOAD_GIB_PER_S = 1.4  # safetensors from a Modal Volume: 61 GiB in 43 s
INIT_S_PER_GIB = 0.74  # weights into GPU memory: 45 s for 61 GiB
COMPILE_S = 156.0  # torch.compile, cold
COMPILE_CACHED_S = 30.0  # with the compile cache on a Volume
GRAPHS_S = 46.0  # CUDA graph capture
DOWNLOAD_GIB_PER_S = 0.5  # first start: from the Hub into the Volume


@dataclass(frozen=True)
class Fit:
    gpu: str  # as in the chain, e.g. "H100:2"
    usable_gib: float
    needed_gib: float | None

    @property
    def fits(self) -> bool:
        return self.needed_gib is None or self.needed_gib <= self.usable_gib


def fits(m: Manifest) -> list[Fit]:
    """For each GPU of the expanded chain: usable memory versus weights plus a KV-cache reserve."""
    out = []
    for entry in m.gpu_chain():
        name, _, count = entry.partition(":")
        gpu = catalog.find_gpu(name)
        assert gpu is not None
        usable = gpu.memory_gib * int(count or 1) * m.model.gpu_memory_utilization
        out.append(Fit(entry, usable, m.model.needed_gib()))
    return out


def hourly_usd(entry: str) -> float:
    name, _, count = entry.partition(":")
    gpu = catalog.find_gpu(name)
    assert gpu is not None
    return gpu.usd_per_hour * int(count or 1)


@dataclass(frozen=True)
class ColdStart:
    first_s: float  # the very first start: download into the Volume, compile from scratch
    typical_s: float  # later starts: weights and compile cache on Volumes

    def describe(self) -> str:
        return f"~{self.typical_s / 60:.1f} min (first start ~{self.first_s / 60:.1f} min)"


def cold_start(m: Manifest) -> ColdStart | None:
    weights = m.model.weights_gib()
    if weights is None:
        return None
    load = weights / LOAD_GIB_PER_S + weights * INIT_S_PER_GIB
    eager = m.cold_start.fast_boot
    compile_cold = 0.0 if eager else COMPILE_S
    cached = m.cold_start.compile_cache and m.volumes.compile_cache is not None
    compile_warm = 0.0 if eager else (COMPILE_CACHED_S if cached else COMPILE_S)
    graphs = 0.0 if eager else GRAPHS_S
    download = weights / DOWNLOAD_GIB_PER_S
    typical = CONTAINER_START_S + load + compile_warm + graphs + (0.0 if m.volumes.weights else download)
    first = CONTAINER_START_S + download + load + compile_cold + graphs
    if m.cold_start.snapshot:
        typical = CONTAINER_START_S + weights / LOAD_GIB_PER_S  # restored, not rebuilt
    return ColdStart(first_s=round(first), typical_s=round(typical))
