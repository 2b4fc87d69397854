"""The rendered modules' vLLM code, run with the real `vllm` classes of each API family.

Each example deployment is rendered with its own pin (and the seeds' manifest re-pinned to one
release of every other family); then, in a subprocess with that vllm wheel on the path, the
module's own `sampling_params()` and `engine_args()` are called and read back."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from liftdeploy.manifest import load
from liftdeploy.render import render
from tests.conftest import DEPLOYMENTS
from tests.support.vllm_wheels import prefetch, run_with_vllm, sampling_params_probe

pytestmark = [pytest.mark.slow, pytest.mark.network]

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
CASES = {  # case: (manifest, pins to substitute or None, vllm version, field that must carry the schema)
    "qwen32b-0.9.2": ("qwen32b.toml", None, "0.9.2", "guided_decoding"),
    "qwen32b-as-0.6.5": ("qwen32b.toml", 'pins = { vllm = "0.6.5" }', "0.6.5", "guided_decoding"),
    "qwen32b-as-0.11.0": ("qwen32b.toml", 'pins = { vllm = "0.11.0" }', "0.11.0", "structured_outputs"),
    "qwen3-8b-0.32.0": ("qwen3-8b.toml", None, "0.32.0", "structured_outputs"),
}
ENGINE_PROBE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("rendered", {path!r})
module = importlib.util.module_from_spec(spec); sys.modules["rendered"] = module; spec.loader.exec_module(module)
args = module.engine_args()
config = getattr(args, "structured_outputs_config", None)
print(json.dumps({{
    "class": type(args).__name__,
    "model": args.model,
    "guided_decoding_backend": getattr(args, "guided_decoding_backend", None),
    "structured_backend": getattr(config, "backend", None),
    "structured_class": type(config).__name__ if config is not None else None,
}}))
"""


def rendered(tmp: Path, name: str, pins: str | None) -> Path:
    source = DEPLOYMENTS / name
    text = source.read_text()
    if pins:
        text = re.sub(r"^pins = \{.*\}$", pins, text, flags=re.M)
    manifest = tmp / name
    manifest.write_text(text)
    module = tmp / (manifest.stem.replace("-", "_") + ".py")
    module.write_text(render(load(manifest)))
    return module


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    prefetch({case[2] for case in CASES.values()})

    def probe(item):
        case, (name, pins, version, _) = item
        (tmp / case).mkdir()
        module = rendered(tmp / case, name, pins)
        params = sampling_params_probe(version, module, SCHEMA, max_tokens=64, temperature=0.3, top_p=0.95,
                                       timeout=300)
        engine = run_with_vllm(version, ENGINE_PROBE.format(path=str(module)), timeout=300)
        return case, (params, engine)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(probe, CASES.items()))


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_params_carry_the_schema(probes, case):
    field = CASES[case][3]
    params, _ = probes[case]
    assert params["class"].endswith(".SamplingParams")
    assert params["carried_by"] == field
    assert params["schema"] == SCHEMA
    assert (params["max_tokens"], params["temperature"], params["top_p"]) == (64, 0.3, 0.95)
    assert not [w for w in params["warnings"] if "deprecat" in w.lower()], params["warnings"]


@pytest.mark.parametrize("case", list(CASES))
def test_engine_args_ask_for_xgrammar(probes, case):
    field = CASES[case][3]
    _, engine = probes[case]
    assert engine["class"] == "AsyncEngineArgs"
    assert engine["model"].startswith("Qwen/")
    if field == "guided_decoding":
        assert engine["guided_decoding_backend"] == "xgrammar", json.dumps(engine)
    else:
        assert engine["structured_class"] == "StructuredOutputsConfig", json.dumps(engine)
        assert engine["structured_backend"] == "xgrammar"
