"""Shared test helpers: a valid base manifest as data, a small TOML writer, and ways to
run the real CLI and import a rendered module in a clean subprocess.

The TOML writer records the line of every key it writes, so tests can check the
`file:LINE:` that error messages point at against an oracle that does not share code
with `liftdeploy._toml_lines`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = ROOT / "deployments"
PYTHON = sys.executable
VENV_BIN = Path(sys.executable).parent

# Every committed example, with each of its envs: (manifest file name, env or None).
EXAMPLES = [
    ("qwen32b.toml", None),
    ("qwen32b.toml", "dev"),
    ("qwen3-8b.toml", None),
    ("qwen3-8b.toml", "prod"),
    ("qwen3-coder-30b.toml", None),
]

# A valid manifest touching every section; tests deep-copy it and break one thing.
BASE: dict[str, Any] = {
    "app": {"name": "test-app", "environment": "main"},
    "model": {
        "id": "Qwen/Qwen3-8B",
        "revision": "b968826d9c46dd6066d109eabc6255188de91218",
        "dtype": "bfloat16",
        "max_model_len": 8192,
    },
    "compute": {"gpu": ["L40S", "A100-80GB"]},
    "image": {
        "python": "3.12",
        "pins": {"vllm": "0.9.2", "transformers": "4.53.0"},
        "packages": ["hf-transfer==0.1.9"],
        "env": {"TOKENIZERS_PARALLELISM": "false"},
    },
    "volumes": {
        "weights": {"name": "test-weights", "mount": "/models"},
        "compile_cache": {"name": "test-vllm-cache", "mount": "/root/.cache/vllm"},
    },
    "scaling": {"scaledown_window": 300, "min_containers": 0, "max_containers": 4},
    "concurrency": {"max_inputs": 20, "target_inputs": 16},
    "cold_start": {"fast_download": True, "compile_cache": True},
    "decoding": {"backend": "xgrammar", "max_tokens": 2048},
    "secrets": {"names": ["huggingface"], "bearer": "test-api-token"},
    "endpoints": [
        {"kind": "health", "auth": "none"},
        {"kind": "warmup"},
        {"kind": "generate", "auth": "bearer"},
    ],
    "env": {"dev": {"app": {"name": "test-app-dev"}, "compute": {"gpu": ["A10G"]}}},
}


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def _key(key: str) -> str:
    return key if key.replace("_", "a").replace("-", "a").isalnum() and key.isascii() else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of ASCII text is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(type(value))


def dump_toml(data: dict[str, Any]) -> tuple[str, dict[tuple[Any, ...], int]]:
    """TOML text for `data`, and the 1-based line of each key path written.

    Top-level tables become `[section]`, a list of tables `[[section]]`, `env.<name>`
    becomes `[env.<name>]`; anything deeper is an inline value on its key's line.
    """
    lines: list[str] = ["# written by tests/helpers_render.py"]
    where: dict[tuple[Any, ...], int] = {}

    def put(path: tuple[Any, ...], text: str) -> None:
        lines.append(text)
        where.setdefault(path, len(lines))

    def keys(prefix: tuple[Any, ...], table: dict[str, Any]) -> None:
        for key, value in table.items():
            put((*prefix, key), f"{_key(key)} = {_value(value)}")
            if isinstance(value, dict):  # inline table: its keys sit on the same line
                for inner in value:
                    where.setdefault((*prefix, key, inner), len(lines))

    def is_table_list(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(x, dict) for x in value)

    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and not is_table_list(v)}
    keys((), scalars)
    for section, value in data.items():
        if section in scalars:
            continue
        if section == "env" and isinstance(value, dict):
            lines.append("")
            put(("env",), "[env]")  # overlays that are not tables are written as keys here
            keys(("env",), {name: v for name, v in value.items() if not isinstance(v, dict)})
            for name, overlay in value.items():
                if isinstance(overlay, dict):
                    lines.append("")
                    put(("env", name), f"[env.{_key(name)}]")
                    keys(("env", name), overlay)
        elif isinstance(value, dict):
            lines.append("")
            put((section,), f"[{_key(section)}]")
            keys((section,), value)
        else:  # a list of tables
            for i, item in enumerate(value):
                lines.append("")
                put((section, i), f"[[{_key(section)}]]")
                where.setdefault((section,), len(lines))
                keys((section, i), item)
    return "\n".join(lines) + "\n", where


def cli(*args: str | os.PathLike[str], cwd: Path | str | None = None,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `liftdeploy` CLI in a subprocess, with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", **(extra_env or {})}
    env.pop("LIFTDEPLOY_DEBUG", None)
    return subprocess.run(
        [PYTHON, "-m", "liftdeploy.cli", *map(str, args)],
        cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def cli_in_process(*args: str | os.PathLike[str], cwd: Path | str | None = None) -> subprocess.CompletedProcess[str]:
    """The same CLI through typer's CliRunner, in this process (fast); same result shape as `cli`."""
    from typer.testing import CliRunner

    from liftdeploy.cli import app

    before = os.getcwd()
    os.chdir(cwd or ROOT)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(before)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(map(str, args)), result.exit_code, result.stdout, result.stderr)


def py_run(code: str, *args: str, cwd: Path | str | None = None, flags: tuple[str, ...] = (),
           timeout: int = 60) -> subprocess.CompletedProcess[str]:
    """Run Python code in a fresh interpreter, with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([PYTHON, *flags, "-c", code, *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ## Looking inside a rendered module with the real `modal` client
#
# `describe_rendered(path)` runs in a fresh interpreter (see `inspect_rendered`), with
# warnings as errors, no network and no GPU stack importable, imports the module and
# returns what its modal objects were declared with, as JSON-able data.
#
# Where modal keeps the options (modal 1.6), least fragile first:
# - `app._local_state` (what the deprecated `registered_functions/classes` return, without
#   the DeprecationError): tag → `_Function` / `_Cls`.
# - `_Function._spec` (a `_FunctionSpec`, kept for `modal shell`): image, secrets, volumes,
#   gpus, cpu, memory. `_Function._webhook_config` ("only set locally") for web functions.
# - `_Cls._method_partials`: each method's `_PartialFunction` with its flags and
#   `params.webhook_config` (label = `requested_suffix`, `requires_proxy_auth`).
# - Everything else (timeout, startup_timeout, the AutoscalerSettings proto, concurrency,
#   schedule, snapshot flags) is only passed on to the FunctionCreate request built at
#   deploy time, so it lives in the closure of the function's deferred `_load`; we read
#   those free variables by name. If a modal upgrade renames them these tests fail loudly
#   (KeyError), never silently.
# - Images: each layer's `_load` closure holds `dockerfile_function` and `base_images`;
#   calling the function gives the Dockerfile commands of that layer.

BLOCKED_MODULES = ("vllm", "torch", "transformers", "xgrammar")


def _closure(function: Any) -> dict[str, Any]:
    cells = function.__closure__ or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells), strict=True))


def _image_commands(image: Any) -> list[str]:
    from modal._utils.async_utils import synchronizer

    image = synchronizer._translate_in(image)
    layers: list[list[str]] = []
    while image is not None:
        cells = _closure(image._load)
        if "single_layer_image" in cells:  # from_registry(add_python=...): one layer up to builder 2025.06
            image = cells["single_layer_image"]
            continue
        build = cells["dockerfile_function"]
        layers.append(build("2025.06").commands if build else [])
        image = next(iter((cells["base_images"] or {}).values()), None)
    return [command for layer in reversed(layers) for command in layer]


def _webhook(config: Any) -> dict[str, Any] | None:
    if config is None or not config.type:
        return None
    return {"label": config.requested_suffix, "requires_proxy_auth": config.requires_proxy_auth,
            "type": type(config).DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[config.type].name}


def describe_rendered(path: str) -> dict[str, Any]:
    import importlib.abc
    import importlib.util

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, *args: Any) -> None:
            if name.split(".")[0] in BLOCKED_MODULES:
                raise ImportError(f"{name} must not be imported by a rendered module")

    def no_network(event: str, args: tuple[Any, ...]) -> None:
        if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
            raise RuntimeError(f"network access while importing a rendered module: {event} {args!r}")

    sys.meta_path.insert(0, Blocker())
    sys.addaudithook(no_network)

    import modal
    from modal._partial_function import _find_partial_methods_for_user_cls, _PartialFunctionFlags
    from modal._utils.async_utils import synchronizer

    spec = importlib.util.spec_from_file_location("rendered_app", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["rendered_app"] = module
    spec.loader.exec_module(module)

    app = module.app
    state = synchronizer._translate_in(app)._local_state
    images = {name: synchronizer._translate_in(value) for name, value in vars(module).items()
              if isinstance(value, modal.Image)}

    def function_info(function: Any) -> dict[str, Any]:
        cells = _closure(function._load)
        autoscaler = cells["autoscaler_settings"]
        schedule = cells["schedule"]
        spec = function._spec
        return {
            "image": next((name for name, image in images.items() if image is spec.image), None),
            "gpu": cells["gpu"],
            "spec_gpus": spec.gpus,
            "cpu": spec.cpu,
            "memory": spec.memory,
            "region": list(spec.scheduler_placement.regions) if spec.scheduler_placement else None,
            "timeout": cells["timeout"],
            "startup_timeout": cells["startup_timeout"],
            **{field: getattr(autoscaler, field) if autoscaler.HasField(field) else None
               for field in ("min_containers", "max_containers", "buffer_containers", "scaledown_window")},
            "max_inputs": cells["max_concurrent_inputs"],
            "target_inputs": cells["target_concurrent_inputs_int"] or None,
            "volumes": {str(mount): {"name": volume._name,
                                     "create_if_missing": _closure(volume._load)["create_if_missing"]}
                        for mount, volume in spec.volumes.items()},
            "secrets": [secret._name for secret in spec.secrets],
            "secret_keys": {secret._name: list(_closure(secret._load)["required_keys"]) for secret in spec.secrets},
            "schedule": ({"cron": schedule.proto_message.cron.cron_string,
                          "timezone": schedule.proto_message.cron.timezone} if schedule is not None else None),
            "enable_memory_snapshot": cells["enable_memory_snapshot"],
            "experimental_options": cells["experimental_options"],
            "webhook": _webhook(function._webhook_config),
        }

    classes = {}
    for tag, cls in state.classes.items():
        methods = {}
        for name, partial in cls._method_partials.items():
            methods[name] = {
                "method": bool(partial.flags & _PartialFunctionFlags.CALLABLE_INTERFACE),
                "webhook": _webhook(partial.params.webhook_config),
            }
        pre = _find_partial_methods_for_user_cls(cls._user_cls, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT)
        post = _find_partial_methods_for_user_cls(cls._user_cls, _PartialFunctionFlags.ENTER_POST_SNAPSHOT)
        classes[tag] = {
            "is_modal_cls": isinstance(getattr(module, tag), modal.Cls),
            "methods": methods,
            "enter_snap": sorted(pre),
            "enter": sorted(post),
        }

    return {
        "app_name": app.name,
        "functions": {tag: function_info(function) for tag, function in state.functions.items()},
        "classes": classes,
        "entrypoints": sorted(state.local_entrypoints),
        "images": {name: _image_commands(image) for name, image in images.items()},
        "volumes": {name: value.name if hasattr(value, "name") else None for name, value in vars(module).items()
                    if isinstance(value, modal.Volume)},
        "imported": sorted({name.split(".")[0] for name in sys.modules} & {*BLOCKED_MODULES, "fastapi"}),
    }


def inspect_rendered(*paths: Path | str) -> list[dict[str, Any]]:
    """`describe_rendered` for each path, each in a fresh interpreter with `-W error` (run side
    by side); fails on a non-zero exit or any output to stderr (a warning included)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[2]); import helpers_render as h; "
            "print(json.dumps(h.describe_rendered(sys.argv[1])))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    procs = []
    for path in paths:
        path = Path(path).resolve()
        procs.append(subprocess.Popen(
            [PYTHON, "-W", "error", "-c", code, str(path), str(Path(__file__).parent)],
            cwd=path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    found = []
    for path, proc in zip(paths, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{path}:\n{err}"
        assert err == "", f"{path}:\n{err}"  # no warning of any kind, deprecations included
        found.append(json.loads(out))
    return found
