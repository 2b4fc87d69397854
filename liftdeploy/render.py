"""Render a validated manifest into one self-contained Modal app module.

Manifest values reach the generated code only through the `py` filter, which writes
Python literals (never pasted text), so no manifest value can inject code. The one
exception is an endpoint's function name, `ident(label)`: labels are validated DNS
labels (`[a-z0-9-]`), so the name is always an identifier. The same
manifest always renders the same bytes.
"""

from __future__ import annotations

import math
import os
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from pydantic import BaseModel

from . import __version__, compat, sglang_args, sizing
from ._files import write_atomic as write_atomic  # where the CLI and apply write files
from .compat import api_family, v1_structured_output
from .errors import StepError
from .manifest import Loaded, Manifest
from .openai_server import TOOL_CALL_PARSERS, openai_server_api

TEMPLATE = "modal_app.py.j2"
TEMPLATES = {"vllm": TEMPLATE, "sglang": "modal_app_sglang.py.j2"}
"""The template of each engine (`engine.kind`)."""


def template_dir() -> Path:
    """Templates ship inside the wheel; in a source checkout they sit at the top level."""
    packaged = Path(__file__).parent / "templates"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "templates"


def py(value: Any) -> str:
    """A Python literal for a manifest value: the only way values enter rendered code."""
    if isinstance(value, Enum):
        return py(value.value)
    if isinstance(value, BaseModel):  # a manifest section, as the table of its fields
        return py(value.model_dump(mode="json"))
    if value is None or isinstance(value, (bool, int)):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot render non-finite number {value!r}")
        return repr(value)
    if isinstance(value, str):
        literal = repr(value)
        if literal.startswith("'") and '"' not in value:
            literal = '"' + literal[1:-1] + '"'  # the house style: double quotes
        return literal
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py(k)}: {py(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(py(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as a Python literal")


def py_block(value: Any, indent: int = 0, width: int = 100) -> str:
    """Like `py`, but a long list or dict is written one item per line, as a formatter would."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    flat = py(value)
    if len(flat) + indent <= width or not isinstance(value, (dict, list, tuple)) or not value:
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{pad}{py(k)}: {py_block(v, indent + 4, width)}," for k, v in value.items()]
        return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{py_block(v, indent + 4, width)}," for v in value]
    return "[\n" + "\n".join(items) + "\n" + " " * indent + "]"


def ident(label: str) -> str:
    """The Python name of an endpoint's function: `web_` + its label (labels are DNS labels)."""
    return "web_" + label.replace("-", "_")


def minutes(seconds: int) -> str:
    """`600` → `10 * MINUTES`, as a reader would write it."""
    return f"{seconds // 60} * MINUTES" if seconds % 60 == 0 else str(int(seconds))


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(py=py, py_block=py_block, ident=ident, minutes=minutes)
    return env


# vLLM's sleep level before a snapshot: 1 moves the weights to CPU memory and drops the KV cache
# (Modal's vLLM snapshot examples use it); waking copies the weights back.
SLEEP_LEVEL = 1

# Each fixed layout of `decoding.whitespace` as llguidance's JSON options, which the rendered module
# puts in every schema (`x-guidance`, read after vLLM's whitespace default): no free whitespace, and
# the separators json.dumps writes by default.
JSON_LAYOUTS = {"spaced": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


def engine_args(m: Manifest) -> dict[str, Any]:
    """vLLM engine arguments, in the pinned release's names (contract-tested on each API family's
    real wheel: tests/test_vllm_engine_contract.py)."""
    args: dict[str, Any] = {"model": m.model.id}
    if m.model.revision:
        args["revision"] = m.model.revision
    args["dtype"] = m.model.dtype.value
    if m.model.max_model_len:
        args["max_model_len"] = m.model.max_model_len
    if m.model.quantization:
        args["quantization"] = m.model.quantization
    args["tensor_parallel_size"] = m.model.tensor_parallel_size
    args["gpu_memory_utilization"] = m.model.gpu_memory_utilization
    args["trust_remote_code"] = m.model.trust_remote_code
    # The engine batches exactly what Modal lets into one container (@modal.concurrent max_inputs).
    args["max_num_seqs"] = m.concurrency.max_inputs
    if m.cold_start.fast_boot:
        args["enforce_eager"] = True  # no CUDA graphs or torch.compile: faster start, slower tokens
    else:  # graphs only for batch sizes a container can get: vLLM's default runs to 512
        args["compilation_config"] = {"cudagraph_capture_sizes": sizing.capture_sizes(m.concurrency.max_inputs)}
    if m.cold_start.snapshot:
        args["enable_sleep_mode"] = True  # sleep before the memory snapshot, wake after the restore
    if m.model.thinking and m.model.parser:
        if not compat.has(m.image.vllm, compat.REASONING_FLAG_UNTIL):
            args["enable_reasoning"] = True  # 0.9.x asks for both; 0.10 dropped the flag
        args["reasoning_parser"] = m.model.parser  # constrain the answer, not the thinking
    if m.volumes.weights:
        args["download_dir"] = m.volumes.weights.mount + "/hub"
    compact = m.whitespace != "any"  # a fixed layout too: what a request's schema does not lay out stays compact
    if api_family(m.image.vllm) == "guided_decoding":
        args["guided_decoding_backend"] = m.backend
        if compact:
            args["guided_decoding_disable_any_whitespace"] = True
    else:
        args["structured_outputs_config"] = {"backend": m.backend}
        if compact:
            args["structured_outputs_config"]["disable_any_whitespace"] = True
    return args


def openai_context(m: Manifest) -> dict[str, Any]:
    """How the pinned vLLM builds its own OpenAI server, and the options it is given."""
    parser = TOOL_CALL_PARSERS.get(m.model.known.family) if m.model.known else None
    return {**openai_server_api(m.image.vllm).context(), "tool_call_parser": parser}


def image_env(m: Manifest) -> dict[str, str]:
    """The GPU image's environment, for the manifest's engine."""
    if str(m.engine.kind) == "sglang":
        return image_env_sglang(m)
    env: dict[str, str] = {}
    if m.volumes.weights:
        env["HF_HOME"] = m.volumes.weights.mount
    if m.compile_cached:
        env["VLLM_CACHE_ROOT"] = m.volumes.compile_cache.mount  # type: ignore[union-attr]
    if m.cold_start.fast_download:
        env["HF_XET_HIGH_PERFORMANCE"] = "1"
        if any(req.startswith("hf-transfer==") or req.startswith("hf_transfer==") for req in m.image.packages):
            env["HF_HUB_ENABLE_HF_TRANSFER"] = "1"
    if m.cold_start.snapshot:
        # What Modal's vLLM snapshot example sets (06_gpu_and_ml/llm-serving/vllm_low_latency.py),
        # and what Modal's snapshot guide advises when torch.compile runs before a snapshot.
        env["VLLM_SERVER_DEV_MODE"] = "1"
        env["TORCH_CPP_LOG_LEVEL"] = "FATAL"
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    env.update(m.image.env)
    return env


def source_name(path: Path) -> str:
    """How the header names the manifest: relative to its project (the nearest folder with
    `.git` or `pyproject.toml`), else by file name; never by the working directory or by how
    the path was spelled, so every invocation renders the same bytes."""
    path = Path(os.path.abspath(path))
    for root in path.parents:
        if (root / ".git").exists() or (root / "pyproject.toml").exists():
            return path.relative_to(root).as_posix()
    return path.name


def image_env_sglang(m: Manifest) -> dict[str, str]:
    env = {"HF_HOME": m.volumes.weights.mount} if m.volumes.weights else {}
    if m.cold_start.fast_download:
        env["HF_XET_HIGH_PERFORMANCE"] = "1"
    env.update(sglang_args.grammar_env(m))
    env.update(sglang_args.cache_env(m))
    env.update(m.image.env)
    return env


def context_sglang(m: Manifest) -> dict[str, Any]:
    """What the SGLang template needs beyond the shared context (see `sglang_args`)."""
    return {
        "sglang_version": sglang_args.version(m),
        "grammar_backend": sglang_args.grammar_backend(m),
        "server_args": sglang_args.server_args(m),
        "openai_template": "_openai_chat.py.j2",
    }


def context(loaded: Loaded) -> dict[str, Any]:
    m = loaded.manifest
    sglang = str(m.engine.kind) == "sglang"
    mounts = []
    if m.volumes.weights:
        mounts.append("MODELS_DIR: weights_volume")
    if m.volumes.compile_cache:
        mounts.append("CACHE_DIR: cache_volume" if sglang else "VLLM_CACHE_DIR: vllm_cache_volume")
    secrets = {name: m.secrets.required_keys(name) for name in m.secrets.all_names}
    shared = {
        "m": m,
        "version": __version__,
        "source": source_name(loaded.path),
        "env": loaded.env,
        "sha256": loaded.sha256,
        "gpu_chain": m.gpu_chain(),
        "backend": m.backend,
        "whitespace": m.whitespace,
        "json_layout": JSON_LAYOUTS.get(m.whitespace),
        "volumes_expr": "{" + ", ".join(mounts) + "}" if mounts else "",
        "secrets": secrets,
        "sleep_level": SLEEP_LEVEL,
        "hours": m.scaling.business_hours,
        "endpoints": m.endpoints,
        "kinds": sorted({ep.kind.value for ep in m.endpoints}),
        "image_env": image_env(m),
    }
    if sglang:
        return {**shared, **context_sglang(m)}
    openai = openai_context(m) if any(ep.kind.value == "openai" for ep in m.endpoints) else None
    return {**shared, "api_family": api_family(m.image.vllm), "engine_args": engine_args(m),
            "v1_structured_output": v1_structured_output(m.image.vllm), "openai": openai,
            "openai_template": "openai_route.py.j2"}


def render(loaded: Loaded) -> str:
    template = TEMPLATES[str(loaded.manifest.engine.kind)]
    return _environment().get_template(template).render(context(loaded))


def module_name(loaded: Loaded) -> str:
    """The rendered module's name (`Loaded.module_name`; the local server imports it by it)."""
    return loaded.module_name


def output_path(loaded: Loaded, out_dir: Path | str | None = None) -> Path:
    """Where the module goes: beside the manifest unless `out_dir` says otherwise."""
    directory = Path(out_dir) if out_dir is not None else loaded.path.parent
    return directory / f"{loaded.module_name}.py"


def drift(loaded: Loaded, path: Path) -> bool:
    """True when the module on disk differs from a fresh render (or is missing)."""
    try:
        return path.read_text(encoding="utf-8") != render(loaded)
    except FileNotFoundError:
        return True
    except OSError as exc:
        raise StepError("render", f"cannot read {path}: {exc.strerror}", "check the file's permissions") from None
