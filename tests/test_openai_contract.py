"""The `openai` endpoint's vLLM code, against the real wheels of each OpenAI-server API family.

vLLM's OpenAI server moved between releases (`vllm.entrypoints.openai.api_server` until 0.28,
`vllm.entrypoints.launchers` from 0.29) and its entry points changed their arguments. For each
family the manifest with an `openai` endpoint is rendered with that pin, and in a subprocess with
the real `vllm` wheel on the path:

* the module's `vllm_server_args()` is parsed by that release's own CLI parser;
* vLLM's `build_app` is called with those arguments, and serves every route the endpoint opens;
* every call of `vllm_openai_app()` (read from the module's syntax tree) binds to the real
  signature of `build_app` / `init_app_state`, awaited exactly when it is a coroutine function, and
  every engine-client attribute it uses exists on the release's real engine class;
* `vllm_request_fields()` imports the release's request models;
* the release's error model has the shape the module expects (flat, translated; or nested).

The engine itself needs a GPU (or vLLM's CPU build, see test_openai_route.py): CUDA wheels cannot
infer a device here, so the probe selects vLLM's own CPU platform before parsing (the container's
GPU does that on Modal).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from liftdeploy.manifest import load
from liftdeploy.openai_server import openai_server_api
from liftdeploy.render import render
from tests.conftest import DEPLOYMENTS
from tests.support.vllm_wheels import prefetch, run_with_vllm, server_deps_site

pytestmark = [pytest.mark.slow, pytest.mark.network]

VERSIONS = ["0.6.5", "0.9.2", "0.11.0", "0.32.0"]
# The real engine class a rendered VLLMEngine holds in each family (`AsyncLLMEngine.from_engine_args`).
ENGINE_CLASS = {
    "0.6.5": "vllm.engine.async_llm_engine.AsyncLLMEngine",
    "0.9.2": "vllm.v1.engine.async_llm.AsyncLLM",  # VLLM_USE_V1 is the default from 0.8
    "0.11.0": "vllm.v1.engine.async_llm.AsyncLLM",
    "0.32.0": "vllm.v1.engine.async_llm.AsyncLLM",
}

PROBE = r"""
import ast, importlib, importlib.util, inspect, json, sys, warnings
args_in = json.loads(ARGS)

import vllm.platforms as platforms
from vllm.platforms.cpu import CpuPlatform
platforms._current_platform = CpuPlatform()  # CUDA wheels on a machine without a GPU

spec = importlib.util.spec_from_file_location("rendered", args_in["module"])
module = importlib.util.module_from_spec(spec)
sys.modules["rendered"] = module
spec.loader.exec_module(module)
out = {}

caught = []
with warnings.catch_warnings(record=True) as parsing:
    warnings.simplefilter("always")
    args = module.vllm_server_args("/models/weights")
caught += parsing
out["args"] = {key: getattr(args, key, "MISSING") for key in
               ("model", "served_model_name", "tool_call_parser", "enable_auto_tool_choice", "disable_fastapi_docs",
                "api_key")}

# The module's own imports, and how it calls them: read from vllm_openai_app's syntax tree.
source = inspect.getsource(module.vllm_openai_app)
tree = ast.parse(source)
imported = {}
for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
        for alias in node.names:
            imported[alias.asname or alias.name] = getattr(importlib.import_module(node.module), alias.name)
awaited = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Await)}
calls, engine_uses = [], []
for node in ast.walk(tree):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
        fn = imported[node.func.id]
        placeholder = [object()] * len(node.args)
        try:
            inspect.signature(fn).bind(*placeholder)
            binds = True
        except TypeError as exc:
            binds = str(exc)
        calls.append({"name": node.func.id, "module": fn.__module__, "nargs": len(node.args), "binds": binds,
                      "awaited": id(node) in awaited, "coroutine": inspect.iscoroutinefunction(fn)})
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engine_client":
        engine_uses.append(node.attr)
out["calls"] = calls

engine_module, _, engine_name = args_in["engine_class"].rpartition(".")
engine_class = getattr(importlib.import_module(engine_module), engine_name)
def engine_attr(name):
    if hasattr(engine_class, name):
        member = inspect.getattr_static(engine_class, name)
        return "coroutine" if inspect.iscoroutinefunction(member) else type(member).__name__
    annotations = {}
    for klass in engine_class.__mro__:
        annotations.update(getattr(klass, "__annotations__", {}))
    init = inspect.getsource(engine_class.__init__) if hasattr(engine_class, "__init__") else ""
    return "instance attribute" if name in annotations or f"self.{name} =" in init or f"self.{name}:" in init else None
out["engine_uses"] = {name: engine_attr(name) for name in engine_uses}
out["engine_awaited_calls"] = sorted(
    node.value.func.attr for node in ast.walk(tree)
    if isinstance(node, ast.Await) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
    and isinstance(node.value.func.value, ast.Name) and node.value.func.value.id == "engine_client")

# build_app for real, with the module's arguments (it needs no engine)
build_app = imported["build_app"]
call = next(c for c in calls if c["name"] == "build_app")
extra = [("generate",), None][: call["nargs"] - 1]
with warnings.catch_warnings(record=True) as building:
    warnings.simplefilter("always")
    app = build_app(args, *extra)
caught += building
paths = set(app.openapi().get("paths", {}))
for route in app.routes:
    if getattr(route, "path", None):
        paths.add(route.path)
out["routes_missing"] = sorted(path for path in module.OPENAI_ROUTES if path not in paths)

fields = module.vllm_request_fields()
out["fields"] = {route: sorted(names) for route, names in fields.items()}

# The release's error model, as vLLM's handlers fill it
error_module = importlib.import_module(args_in["error_module"])
ErrorResponse = error_module.ErrorResponse
if "error" in ErrorResponse.model_fields:
    error = ErrorResponse(error=error_module.ErrorInfo(message="m", type="BadRequestError", code=400))
else:
    error = ErrorResponse(message="m", type="BadRequestError", code=400)
out["error"] = error.model_dump()
out["deprecations"] = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                       if issubclass(w.category, DeprecationWarning) and "/torch/" not in w.filename]
print(json.dumps(out, default=str))
"""

ERROR_MODULE = {
    "0.6.5": "vllm.entrypoints.openai.protocol",
    "0.9.2": "vllm.entrypoints.openai.protocol",
    "0.11.0": "vllm.entrypoints.openai.protocol",
    "0.32.0": "vllm.entrypoints.serve.engine.protocol",
}


def rendered(tmp: Path, version: str) -> Path:
    text = (DEPLOYMENTS / "qwen3-8b.toml").read_text()
    text = re.sub(r"^pins = \{.*\}$", f'pins = {{ vllm = "{version}" }}', text, flags=re.M)
    manifest = tmp / "qwen3-8b.toml"
    manifest.write_text(text)
    module = tmp / "qwen3_8b.py"
    module.write_text(render(load(manifest)))
    return module


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-contract")
    prefetch(VERSIONS)
    deps = server_deps_site()

    def probe(version: str):
        (tmp / version).mkdir()
        module = rendered(tmp / version, version)
        args = {"module": str(module), "engine_class": ENGINE_CLASS[version], "error_module": ERROR_MODULE[version]}
        code = f"ARGS = {json.dumps(json.dumps(args))}\n" + PROBE
        return version, run_with_vllm(version, code, timeout=300, extra_paths=[deps])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(probe, VERSIONS))


@pytest.mark.parametrize("version", VERSIONS)
def test_vllm_parses_the_server_options(probes, version):
    args = probes[version]["args"]
    assert args["model"] == "/models/weights"
    assert args["served_model_name"] == ["Qwen/Qwen3-8B"]
    assert args["tool_call_parser"] == "hermes"
    assert args["enable_auto_tool_choice"] is True
    assert args["disable_fastapi_docs"] is True
    assert args["api_key"] in (None, [])  # auth is the endpoint's own, on every route


@pytest.mark.parametrize("version", VERSIONS)
def test_build_app_and_init_app_state_take_what_the_module_passes(probes, version):
    calls = {call["name"]: call for call in probes[version]["calls"]}
    assert {"build_app", "init_app_state"} <= set(calls)
    for name in ("build_app", "init_app_state"):
        call = calls[name]
        assert call["binds"] is True, (version, call)
        assert call["awaited"] == call["coroutine"], (version, call)
    expected = "vllm.entrypoints.launchers" if openai_server_api(version).modules == "launchers" else \
        "vllm.entrypoints.openai.api_server"
    assert calls["build_app"]["module"].startswith(expected)


@pytest.mark.parametrize("version", VERSIONS)
def test_no_deprecated_entry_point(probes, version):
    """e.g. vLLM 0.32 warns when build_app is not given the supported tasks."""
    assert probes[version]["deprecations"] == []


@pytest.mark.parametrize("version", VERSIONS)
def test_the_engine_client_has_what_the_module_uses(probes, version):
    uses = probes[version]["engine_uses"]
    assert uses and all(uses.values()), (version, uses)
    for method in probes[version]["engine_awaited_calls"]:
        assert uses[method] == "coroutine", (version, method, uses)


@pytest.mark.parametrize("version", VERSIONS)
def test_vllm_serves_every_route_the_endpoint_opens(probes, version):
    assert probes[version]["routes_missing"] == []


@pytest.mark.parametrize("version", VERSIONS)
def test_request_fields_come_from_vllm_models(probes, version):
    fields = probes[version]["fields"]
    chat, completions = set(fields["/v1/chat/completions"]), set(fields["/v1/completions"])
    assert {"messages", "model", "stream", "n", "response_format", "tools", "tool_choice", "logprobs"} <= chat
    assert {"prompt", "model", "stream", "n", "max_tokens", "logprobs", "echo"} <= completions
    assert "user" not in chat and "user" not in completions  # vLLM ignores it: refused
    assert ("parallel_tool_calls" in chat) == (version == "0.32.0")


@pytest.mark.parametrize("version", VERSIONS)
def test_error_shape_is_what_the_module_expects(probes, version):
    error = probes[version]["error"]
    if openai_server_api(version).flat_errors:
        assert error["object"] == "error" and {"message", "type", "param", "code"} <= set(error)
    else:
        assert set(error) == {"error"} and {"message", "type", "param", "code"} <= set(error["error"])
