"""A manifest in SGLang's own terms: the `python -m sglang.launch_server` arguments, the image
environment, and what SGLang has no equivalent for (refused, with a hint).

| manifest | SGLang |
|---|---|
| `model.id`, `revision`, `dtype` | `--model-path`, `--revision`, `--dtype` |
| `model.max_model_len`, `quantization` | `--context-length`, `--quantization` |
| `model.tensor_parallel_size`, `trust_remote_code` | `--tp-size`, `--trust-remote-code` |
| `model.gpu_memory_utilization` | `--mem-fraction-static` (weights and KV cache pool) |
| `decoding.backend` | `--grammar-backend` (`guidance` is SGLang's `llguidance`) |
| `decoding.whitespace = "compact"` | `--constrained-json-disable-any-whitespace` (0.5.3.post2 and later) |
| `decoding.whitespace = "spaced"` | none: refused (no separator setting) |
| `concurrency.max_inputs` | `--max-running-requests`, `--cuda-graph-max-bs` (`-decode` from 0.5.14) |
| `cold_start.fast_boot` | `--disable-cuda-graph` |
| `cold_start.snapshot` | `--enable-memory-saver` (+ `--enable-weights-cpu-backup`), released before the snapshot |
| `cold_start.compile_cache` | the JIT caches (flashinfer, DeepGEMM, Triton, torch.compile) on the volume |
| `decoding.schema_compile_timeout` | `SGLANG_GRAMMAR_TIMEOUT` (0.4.6.post4 to 0.5.7) |

Imports nothing heavy: validation uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import compat_sglang
from .knowledge import parse_pins

if TYPE_CHECKING:
    from .manifest import Manifest

__all__ = ["GRAMMAR_BACKENDS", "cache_env", "grammar_backend", "refusals", "server_args", "version"]

GRAMMAR_BACKENDS = {"xgrammar": "xgrammar", "guidance": "llguidance"}
"""The manifest's `decoding.backend` -> SGLang's `--grammar-backend`."""

CACHE_DIRS = {
    # where each JIT compiler keeps its artefacts, relative to the compile-cache volume
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",  # flashinfer's JIT kernels and cubins (.cache/flashinfer below it)
    "SGLANG_DG_CACHE_DIR": "deep_gemm",  # DeepGEMM's JIT kernels (fp8 on Hopper), as in Modal's SGLang examples
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "SGLANG_CACHE_DIR": "sglang",  # SGLang's own torch.compile artefacts (0.5.x)
}


def version(m: Manifest) -> str:
    """The pinned SGLang release (the pin may carry extras: `sglang[all]`)."""
    return parse_pins(m.image.pins).versions["sglang"]


def grammar_backend(m: Manifest) -> str:
    return GRAMMAR_BACKENDS[m.backend]


def refusals(m: Manifest) -> list[tuple[tuple[str, ...], str, str]]:
    """`(key path, message, hint)` for every setting SGLang has no equivalent for in the pinned release."""
    v = version(m)
    out: list[tuple[tuple[str, ...], str, str]] = []
    if m.decoding.backend == "guidance" and not compat_sglang.supports(v, "grammar-backend-llguidance"):
        out.append((("decoding", "backend"), f"sglang {v} has no llguidance grammar backend (added in "
                    f"{compat_sglang.FEATURES['grammar-backend-llguidance'].since})",
                    'pin a newer sglang, or choose `backend = "xgrammar"`'))
    if m.whitespace == "compact" and not compat_sglang.supports(v, "disable-any-whitespace"):
        out.append((("decoding", "whitespace"), f"sglang {v} cannot keep whitespace out of JSON "
                    f"(`--constrained-json-disable-any-whitespace` came in "
                    f"{compat_sglang.FEATURES['disable-any-whitespace'].since})",
                    'pin sglang>=0.5.3.post2, or set `whitespace = "any"`'))
    if m.whitespace == "spaced":
        out.append((("decoding", "whitespace"), "the `spaced` layout is for vLLM's guidance backend; SGLang "
                    "has no setting for JSON separators (only `--constrained-json-disable-any-whitespace`)",
                    'set `whitespace = "compact"` or `"any"`, or serve with `[engine] kind = "vllm"`'))
    if "schema_compile_timeout" in m.decoding.model_fields_set and not compat_sglang.supports(v, "grammar-timeout-env"):
        out.append((("decoding", "schema_compile_timeout"), f"sglang {v} takes no grammar compile timeout "
                    "(`SGLANG_GRAMMAR_TIMEOUT` is read by 0.4.6.post4 to 0.5.7 only)",
                    "remove `schema_compile_timeout` (SGLang's own limit applies), or pin a release that reads it"))
    if m.cold_start.snapshot and not compat_sglang.supports(v, "memory-saver"):
        out.append((("cold_start", "snapshot"), f"sglang {v} cannot release GPU memory before a snapshot "
                    f"(`--enable-memory-saver` came in {compat_sglang.FEATURES['memory-saver'].since})",
                    "pin a newer sglang, or set `snapshot = false`"))
    return out


def server_args(m: Manifest) -> list[str]:
    """`python -m sglang.launch_server` arguments (host and port are the module's own)."""
    v = version(m)
    args = ["--model-path", m.model.id]
    if m.model.revision:
        args += ["--revision", m.model.revision]
    args += ["--served-model-name", m.model.id, "--dtype", str(m.model.dtype)]
    if m.model.max_model_len:
        args += ["--context-length", str(m.model.max_model_len)]
    if m.model.quantization:
        args += ["--quantization", str(m.model.quantization)]
    args += ["--tp-size", str(m.model.tensor_parallel_size)]
    args += ["--mem-fraction-static", str(m.model.gpu_memory_utilization)]
    if m.model.trust_remote_code:
        args.append("--trust-remote-code")
    args += ["--grammar-backend", grammar_backend(m)]
    if m.whitespace == "compact":
        args.append("--constrained-json-disable-any-whitespace")
    args += ["--max-running-requests", str(m.concurrency.max_inputs)]
    if m.cold_start.fast_boot:
        args.append("--disable-cuda-graph")  # no CUDA graph capture: faster start, slower tokens
    else:
        graphs = "--cuda-graph-max-bs-decode" if compat_sglang.supports(v, "cuda-graph-max-bs-decode") else \
            "--cuda-graph-max-bs"
        args += [graphs, str(m.concurrency.max_inputs)]  # graphs only for the batches we admit
    if m.cold_start.snapshot:
        args.append("--enable-memory-saver")
        if compat_sglang.supports(v, "weights-cpu-backup"):
            args.append("--enable-weights-cpu-backup")
    return args


def grammar_env(m: Manifest) -> dict[str, str]:
    """`decoding.schema_compile_timeout` as the release's scheduler reads it, where it does."""
    if not compat_sglang.supports(version(m), "grammar-timeout-env"):
        return {}
    return {"SGLANG_GRAMMAR_TIMEOUT": str(m.decoding.schema_compile_timeout)}  # seconds a grammar may compile


def cache_env(m: Manifest) -> dict[str, Any]:
    """Environment variables that put SGLang's JIT caches on the compile-cache volume."""
    if not (m.volumes.compile_cache and m.cold_start.compile_cache):
        return {}
    mount = m.volumes.compile_cache.mount
    env = {name: f"{mount}/{sub}" for name, sub in CACHE_DIRS.items()}
    if m.cold_start.snapshot:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # inductor's compile workers do not survive a GPU snapshot
    return env
