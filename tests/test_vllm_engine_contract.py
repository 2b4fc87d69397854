"""The rendered engine settings, read back by the real `vllm` of each API family.

What Modal lets into one container (`@modal.concurrent(max_inputs=...)`) is what vLLM batches
(`max_num_seqs`) and captures CUDA graphs for (no batch size above it: vLLM's default runs to
512); a snapshot deployment sleeps its engine before the snapshot and wakes it after the restore
(Modal's vLLM low-latency pattern); a thinking model gets vLLM's reasoning parser. Each rendered
module's own `engine_args()` builds the real `AsyncEngineArgs`, and its calls of the engine's
`sleep` / `wake_up` are bound to the real methods' signatures, on the wheels of 0.6.5, 0.9.2,
0.11.0 and 0.32.0 (installed `--no-deps`, see tests/support/vllm_wheels.py).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from liftdeploy import compat, sizing
from liftdeploy.manifest import load
from liftdeploy.render import render
from tests.conftest import DEPLOYMENTS
from tests.support.vllm_wheels import engine_deps_site, prefetch, run_with_vllm

pytestmark = [pytest.mark.slow, pytest.mark.network]

# case: (manifest, {text to replace: replacement}, vllm version)
SNAPSHOT = ("[cold_start]\nfast_download = true\ncompile_cache = true\n",
            "[cold_start]\nfast_download = true\ncompile_cache = true\nsnapshot = true\n")
THINKING = ('max_model_len = 16384\n', 'max_model_len = 16384\nthinking = true\n')
CASES = {
    "qwen32b-0.6.5": ("qwen32b.toml", {'vllm = "0.9.2"': 'vllm = "0.6.5"'}, "0.6.5"),
    "qwen32b-0.9.2-snapshot": ("qwen32b.toml", dict([SNAPSHOT]), "0.9.2"),
    "qwen32b-as-0.11.0-snapshot": ("qwen32b.toml", {'vllm = "0.9.2"': 'vllm = "0.11.0"', SNAPSHOT[0]: SNAPSHOT[1]},
                                   "0.11.0"),
    "qwen3-8b-0.32.0-snapshot": ("qwen3-8b.toml", {}, "0.32.0"),
    "qwen3-8b-0.32.0-thinking": ("qwen3-8b.toml", dict([THINKING]), "0.32.0"),
    "qwen3-8b-as-0.9.2-thinking": ("qwen3-8b.toml", {'vllm = "0.32.0"': 'vllm = "0.9.2"', THINKING[0]: THINKING[1],
                                                     "snapshot = true": "snapshot = false"}, "0.9.2"),
}

PROBE = r"""
import ast, importlib.util, inspect, json, sys
path = {path!r}
spec = importlib.util.spec_from_file_location("rendered", path)
module = importlib.util.module_from_spec(spec); sys.modules["rendered"] = module; spec.loader.exec_module(module)
import vllm

args = module.engine_args()  # the real AsyncEngineArgs, built by the rendered module
out = {{"version": vllm.__version__, "max_num_seqs": args.max_num_seqs,
        "enable_sleep_mode": getattr(args, "enable_sleep_mode", None),
        "enable_reasoning": getattr(args, "enable_reasoning", None),
        "reasoning_parser": getattr(args, "reasoning_parser", None) or None}}

# The CUDA-graph batch sizes vLLM ends up with: before 0.12 the config takes vLLM's own default
# list (1, 2, 4, 8 ... 512) through init_with_cudagraph_sizes and keeps explicit sizes over it;
# from 0.12 VllmConfig reads compilation_config.cudagraph_capture_sizes first.
config = args.compilation_config
if getattr(config, "cudagraph_capture_sizes", None) is None:
    out["graphs"] = None
elif hasattr(config, "init_with_cudagraph_sizes"):
    config.init_with_cudagraph_sizes([1, 2, 4] + list(range(8, 513, 8)))
    out["graphs"] = sorted(getattr(config, "capture_sizes", None) or config.cudagraph_capture_sizes)
else:
    out["graphs"] = sorted(config.cudagraph_capture_sizes)

# The engine class from_engine_args builds, and the rendered engine's calls of it.
try:
    from vllm.v1.engine.async_llm import AsyncLLM as engine_class
except ImportError as exc:
    engine_class, out["engine_import"] = None, repr(exc)
calls = {{}}
tree = ast.parse(open(path).read())
(engine_code,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VLLMEngine"]
for node in ast.walk(engine_code):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and ast.unparse(node.func.value) == "self.engine" and node.func.attr in ("sleep", "wake_up")):
        calls[node.func.attr] = {{k.arg: ast.literal_eval(k.value) for k in node.keywords}}
out["calls"] = calls
bound = {{}}
for name, kwargs in calls.items():
    method = getattr(engine_class, name, None)
    if method is None:
        bound[name] = "missing"
        continue
    inspect.signature(method).bind(None, **kwargs)  # raises TypeError if the call does not fit
    bound[name] = "coroutine" if inspect.iscoroutinefunction(method) else "plain"
out["bound"] = bound
if out["reasoning_parser"]:
    from vllm.reasoning import ReasoningParserManager
    registry = getattr(ReasoningParserManager, "reasoning_parsers", None) or ReasoningParserManager.lazy_parsers
    out["parser_registered"] = out["reasoning_parser"] in registry
print(json.dumps(out))
"""


def rendered(folder: Path, name: str, edits: dict[str, str]) -> tuple[Path, object]:
    text = (DEPLOYMENTS / name).read_text()
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    manifest = folder / name
    manifest.write_text(text)
    loaded = load(manifest)
    module = folder / (manifest.stem.replace("-", "_") + ".py")
    module.write_text(render(loaded))
    return module, loaded.manifest


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine-contract")
    prefetch({case[2] for case in CASES.values()})
    extra = [engine_deps_site()]

    def probe(item):
        case, (name, edits, version) = item
        (tmp / case).mkdir()
        module, manifest = rendered(tmp / case, name, edits)
        return case, (manifest, run_with_vllm(version, PROBE.format(path=str(module)), timeout=300, extra_paths=extra))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(probe, CASES.items()))


@pytest.mark.parametrize("case", list(CASES))
def test_the_engine_batches_what_modal_sends_one_container(probes, case):
    manifest, found = probes[case]
    assert found["version"] == CASES[case][2]
    assert found["max_num_seqs"] == manifest.concurrency.max_inputs
    assert found["graphs"] == sizing.capture_sizes(manifest.concurrency.max_inputs), json.dumps(found)
    assert max(found["graphs"]) == manifest.concurrency.max_inputs  # not vLLM's 512


@pytest.mark.parametrize("case", [c for c in CASES if "snapshot" in c])
def test_sleep_and_wake_fit_the_real_engine(probes, case):
    manifest, found = probes[case]
    assert found["enable_sleep_mode"] is True
    assert found["calls"] == {"sleep": {"level": 1}, "wake_up": {}}
    assert found["bound"] == {"sleep": "coroutine", "wake_up": "coroutine"}, json.dumps(found)
    assert compat.has(found["version"], compat.SLEEP_MODE_SINCE)


def test_without_a_snapshot_nothing_sleeps(probes):
    _, found = probes["qwen32b-0.6.5"]
    assert found["calls"] == {} and found["enable_sleep_mode"] is None  # 0.6.5 has no sleep mode at all


@pytest.mark.parametrize("case", [c for c in CASES if "thinking" in c])
def test_a_thinking_model_gets_the_reasoning_parser(probes, case):
    manifest, found = probes[case]
    assert found["reasoning_parser"] == manifest.model.parser == "qwen3"
    assert found["parser_registered"] is True
    if not compat.has(found["version"], compat.REASONING_FLAG_UNTIL):
        assert found["enable_reasoning"] is True  # 0.9.x asks for the flag too


def test_thinking_off_asks_for_no_parser(probes):
    manifest, found = probes["qwen3-8b-0.32.0-snapshot"]
    assert manifest.model.thinks == "hybrid" and manifest.model.thinking is False
    assert found["reasoning_parser"] is None
