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
from tests.support.vllm_wheels import engine_deps_site, prefetch, run_with_vllm, sampling_params_probe

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
    "guided_compact": getattr(args, "guided_decoding_disable_any_whitespace", None),
    "structured_backend": getattr(config, "backend", None),
    "structured_compact": getattr(config, "disable_any_whitespace", None),
    "structured_class": type(config).__name__ if config is not None else None,
    "module_backend": module.BACKEND,
}}))
"""
# What the rendered pre-check (`VLLMEngine.prepare`) imports and calls on vLLM's V1 structured output
# (0.9 and later): the names exist, take what it passes, and vLLM's own validators answer as it expects.
PRECHECK_PROBE = """
import dataclasses, importlib.util, inspect, json, sys
spec = importlib.util.spec_from_file_location("rendered", {path!r})
module = importlib.util.module_from_spec(spec); sys.modules["rendered"] = module; spec.loader.exec_module(module)
from vllm.v1.structured_output.backend_guidance import GuidanceBackend, GuidanceGrammar, validate_guidance_grammar
from vllm.v1.structured_output.backend_types import StructuredOutputOptions
from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend, XgrammarGrammar, validate_xgrammar_grammar

def params(schema):
    return module.sampling_params(schema, max_tokens=1, temperature=1.0, top_p=1.0)

def refusal(check, schema, **kwargs):
    try:
        check(params(schema), **kwargs)
    except Exception as exc:
        return str(exc).splitlines()[0][:200] or type(exc).__name__
    return None

# overlapping branches (every integer is a number): llguidance cannot prove "exactly one"
one_of = {{"type": "object", "properties": {{"v": {{"oneOf": [{{"type": "integer"}}, {{"type": "number"}}]}}}}}}
print(json.dumps({{
    "backend_fields": [f.name for f in dataclasses.fields(GuidanceBackend)][:3],
    "xgrammar_fields": [f.name for f in dataclasses.fields(XgrammarBackend)][:3],
    "compile_params": list(inspect.signature(GuidanceBackend.compile_grammar).parameters)[1:3],
    "allocate_params": list(inspect.signature(GuidanceBackend.allocate_token_bitmask).parameters)[1:],
    "fill_params": [list(inspect.signature(g.fill_bitmask).parameters)[1:] for g in (GuidanceGrammar, XgrammarGrammar)],
    "ll_matcher": "ll_matcher" in {{f.name for f in dataclasses.fields(GuidanceGrammar)}},
    "ll_tokenizer": "ll_tokenizer" in inspect.getsource(GuidanceBackend),
    "json_option": StructuredOutputOptions.JSON.name,
    "xgrammar_plain": refusal(validate_xgrammar_grammar, {schema}),
    "xgrammar_unknown_format": refusal(validate_xgrammar_grammar, {{"type": "string", "format": "byte"}}),
    "xgrammar_bounded_rewritten": refusal(validate_xgrammar_grammar,
                                          module.xgrammar_safe({{"type": "string", "maxLength": 5}})),
    "guidance_plain": refusal(validate_guidance_grammar, {schema}, tokenizer=None),
    "guidance_one_of": refusal(validate_guidance_grammar, one_of, tokenizer=None),
    "guidance_one_of_lenient": refusal(validate_guidance_grammar, module.guidance_schema(one_of, lenient=True),
                                       tokenizer=None),
}}))
"""
V1 = ("0.9.2", "0.11.0", "0.32.0")


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
        precheck = run_with_vllm(version, PRECHECK_PROBE.format(path=str(module), schema=SCHEMA), timeout=300,
                                 extra_paths=[engine_deps_site()]) if version in V1 else None
        return case, (params, engine, precheck)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(probe, CASES.items()))


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_params_carry_the_schema(probes, case):
    field = CASES[case][3]
    params, _, _ = probes[case]
    assert params["class"].endswith(".SamplingParams")
    assert params["carried_by"] == field
    assert params["schema"] == SCHEMA
    assert (params["max_tokens"], params["temperature"], params["top_p"]) == (64, 0.3, 0.95)
    assert not [w for w in params["warnings"] if "deprecat" in w.lower()], params["warnings"]


@pytest.mark.parametrize("case", list(CASES))
def test_engine_args_ask_for_the_backend_and_compact_json(probes, case):
    field, version = CASES[case][3], CASES[case][2]
    _, engine, _ = probes[case]
    assert engine["class"] == "AsyncEngineArgs"
    assert engine["model"].startswith("Qwen/")
    backend = "guidance" if version in V1 else "xgrammar"  # the default: guidance where vLLM has it
    assert engine["module_backend"] == backend
    if field == "guided_decoding":
        assert engine["guided_decoding_backend"] == backend, json.dumps(engine)
        # compact JSON, in the 0.9.x form (the engine argument); 0.6.5 has no way to ask for it
        assert engine["guided_compact"] is (True if version in V1 else None), json.dumps(engine)
    else:
        assert engine["structured_class"] == "StructuredOutputsConfig", json.dumps(engine)
        assert engine["structured_backend"] == backend
        assert engine["structured_compact"] is True


@pytest.mark.parametrize("case", [case for case, spec in CASES.items() if spec[2] in V1])
def test_the_precheck_calls_vllms_own_structured_output_code(probes, case):
    _, _, precheck = probes[case]
    assert precheck["backend_fields"] == ["vllm_config", "tokenizer", "vocab_size"] == precheck["xgrammar_fields"]
    assert precheck["compile_params"] == ["request_type", "grammar_spec"]
    assert precheck["allocate_params"] == ["max_num_seqs"]
    assert precheck["fill_params"] == [["bitmask", "idx"]] * 2
    assert precheck["ll_matcher"] and precheck["ll_tokenizer"] and precheck["json_option"] == "JSON"
    assert precheck["xgrammar_plain"] is None and precheck["guidance_plain"] is None
    # refusals carry vLLM's own reason (0.9.2 to 0.32.0 say it in these words)
    assert "features not supported by xgrammar" in precheck["xgrammar_unknown_format"]
    assert precheck["xgrammar_bounded_rewritten"] is None  # the rewrite for xgrammar#800 is accepted
    assert "oneOf" in precheck["guidance_one_of"]  # llguidance refuses it as it is...
    assert precheck["guidance_one_of_lenient"] is None  # ...and takes the lenient form the pre-check sends
