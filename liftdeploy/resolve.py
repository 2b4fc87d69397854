"""Ask the real resolver (uv) whether a requirement set resolves for the deployment target.

``uv pip compile - --python-platform <platform> --python-version <ver>`` resolves for the
target (Linux x86_64, the container's Python) from any host, without installing anything and
without downloading a Python (``--no-python-downloads``). When the set is unsatisfiable uv
explains the chain ("vllm==0.9.2 depends on transformers>=4.51.1 ... unsatisfiable"), which
we return as is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["UV_HINT", "UV_MISSING", "ResolveResult", "find_uv", "resolve"]

DEFAULT_PLATFORM = "x86_64-manylinux_2_36"
"""glibc 2.36: Modal's `debian_slim` (Debian bookworm, image builders 2024.04 to 2025.06; trixie's
2.41 after). Wheels tagged for older glibc install there too; sglang 0.5.10 and later ship only
`manylinux_2_34` wheels, which a `manylinux_2_28` resolution would wrongly refuse."""

_NETWORK_MARKERS = (
    "failed to fetch",
    "error sending request",
    "dns error",
    "connection refused",
    "network is unreachable",
    "operation timed out",
    "request failed after",
    "could not connect",
    "tcp connect error",
    "failed to download",
)


@dataclass(frozen=True)
class ResolveResult:
    ok: bool
    output: str
    """The pinned requirement set when ``ok``; otherwise uv's explanation (or ours)."""
    seconds: float
    checked: bool = True
    """False when the resolver could not judge the pins (no uv, a timeout, an unreachable index)."""


UV_MISSING = "uv is not installed, so the pins were not resolved"
UV_HINT = "pip install uv (or put uv on PATH), or drop --resolve"


def find_uv() -> str | None:
    """The uv binary: the ``uv`` package's own (``uv.find_uv_bin()``), next to this Python, or on PATH."""
    try:
        import uv  # type: ignore[import-not-found]

        path = uv.find_uv_bin()
        if path and os.path.exists(path):
            return str(path)
    except (ImportError, FileNotFoundError, OSError):
        pass  # no uv package, or it has no binary here: look elsewhere
    beside = Path(sys.executable).parent / ("uv.exe" if os.name == "nt" else "uv")
    if beside.exists():
        return str(beside)
    return shutil.which("uv")


def resolve(
    requirements: list[str],
    *,
    python_version: str,
    platform: str = DEFAULT_PLATFORM,
    timeout: float = 60,
    extra_args: list[str] | None = None,
) -> ResolveResult:
    """Resolve ``requirements`` (PEP 508 lines) for ``platform`` and ``python_version``.

    Never raises for resolver problems: a missing uv, a timeout or an unreachable index come
    back as ``ok=False`` with a clear message.
    """
    started = time.perf_counter()

    def done(ok: bool, output: str, checked: bool = True) -> ResolveResult:
        return ResolveResult(ok=ok, output=output.strip(), seconds=round(time.perf_counter() - started, 3),
                             checked=checked)

    uv = find_uv()
    if uv is None:
        return done(False, UV_MISSING, checked=False)
    cmd = [
        uv, "pip", "compile", "-",
        "--python-platform", platform,
        "--python-version", python_version,
        "--no-python-downloads",
        "--no-header",
        "--no-annotate",
        "--quiet",
        *(extra_args or []),
    ]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("UV_NO_PROGRESS", "1")
    env.setdefault("NO_COLOR", "1")
    # uv's own HTTP timeout, below ours, so an unreachable index is reported by uv, not killed
    env.setdefault("UV_HTTP_TIMEOUT", str(max(5, int(timeout * 0.8))))
    stdin = "\n".join(r.strip() for r in requirements if r.strip()) + "\n"
    try:
        proc = subprocess.run(
            cmd, check=False, input=stdin, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return done(
            False,
            f"uv pip compile did not finish within {timeout:g} s (is the package index reachable?); "
            "the requirements were not checked",
            checked=False,
        )
    except OSError as exc:
        return done(False, f"could not run uv ({uv}): {exc}", checked=False)
    if proc.returncode == 0:
        return done(True, proc.stdout)
    explanation = (proc.stderr or proc.stdout).strip()
    if any(m in explanation.lower() for m in _NETWORK_MARKERS):
        return done(
            False, "the package index could not be reached; the requirements were not checked\n" + explanation,
            checked=False,
        )
    return done(False, explanation)
