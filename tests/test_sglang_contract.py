"""The rendered SGLang module against the real sglang wheels of each API era (CPU; no GPU).

For one release per era (liftdeploy.compat_sglang.ERAS), installed --no-deps as for vLLM
(tests/support/vllm_wheels.py), a module rendered for that release is imported in a process where
that sglang is importable, and:

* its `SERVER_ARGS` (plus host and port) go through sglang's own argument parser
  (`ServerArgs.add_cli_args`): every flag exists, takes the value given, and lands on a field of
  `ServerArgs`; the flags the feature table says a release lacks are refused by that release;
* its `sampling_params(...)` build sglang's `SamplingParams` (and pass its `verify`), and a native
  `/generate` body builds `GenerateReqInput`;
* its `finish_reason` reads what sglang's own finish-reason classes write;
* the routes and the environment variable it uses are in that release's source.

SGLang's engine cannot run here: its CUDA kernels (sgl-kernel) have no CPU build on the package
index, and its CPU backend needs AMX/AVX-512 Xeons (this machine has neither).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import tomllib

from liftdeploy import compat_sglang
from liftdeploy import render as rendering
from liftdeploy.manifest import load
from tests.helpers_render import DEPLOYMENTS, dump_toml
from tests.support import vllm_wheels

pytestmark = [pytest.mark.slow, pytest.mark.network]

# One release per era, and the seeds' own release (the last of its era without compact whitespace).
RELEASES = {
    "0.4.1.post7": "outlines-default",
    "0.4.6.post5": "xgrammar-default",
    "0.5.3.post1": "entrypoints",
    "0.5.4.post3": "compact-whitespace",
    "0.5.23": "decode-graphs",
}

FEATURE_FLAGS = {  # a flag the rendered module may pass -> the feature that says which releases have it
    "--enable-memory-saver": "memory-saver",
    "--enable-weights-cpu-backup": "weights-cpu-backup",
    "--constrained-json-disable-any-whitespace": "disable-any-whitespace",
    "--max-queued-requests": "max-queued-requests",
    "--cuda-graph-max-bs-decode": "cuda-graph-max-bs-decode",
}

PROBE = r"""
import argparse, importlib.util, json, os, sys
args = json.loads(ARGS)
out = {}
VALUED = ("--max-queued-requests", "--cuda-graph-max-bs-decode")
spec = importlib.util.spec_from_file_location("rendered_sglang", args["module"])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)

import sglang
out["version"] = getattr(sglang, "__version__", None)
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
argv = module.launch_command()[3:]
ns = parser.parse_args(argv)
dests = {a: parser._option_string_actions[a].dest for a in argv if a.startswith("--")}
out["values"] = {flag: getattr(ns, dest) for flag, dest in dests.items()}
# The ServerArgs sglang builds from them (its `from_cli_args`). Its __post_init__ resolves defaults
# against the accelerator and the model's config, neither of which is here: it is skipped.
ServerArgs.__post_init__ = lambda self: None
server = ServerArgs.from_cli_args(ns)
out["server"] = {name: getattr(server, name, "<missing>") for name in args["fields"]}
accepted = {}
for flag in args["features"]:
    try:
        parser.parse_args(["--model-path", "m", flag] + (["4"] if flag in VALUED else []))
        accepted[flag] = True
    except SystemExit:
        accepted[flag] = False
out["accepted"] = accepted
try:
    parser.parse_args(["--model-path", "m", "--grammar-backend", "llguidance"])
    out["llguidance"] = True
except SystemExit:
    out["llguidance"] = False

from sglang.srt.sampling.sampling_params import SamplingParams
params = module.sampling_params(args["schema"], max_tokens=64, temperature=0.3, top_p=0.95)
sp = SamplingParams(**params)
try:
    sp.verify(151936)
except TypeError:
    sp.verify()
out["sampling"] = {"json_schema": sp.json_schema, "max_new_tokens": sp.max_new_tokens, "top_p": sp.top_p}

try:
    from sglang.srt.managers.io_struct import GenerateReqInput
    req = GenerateReqInput(text="hi", sampling_params=params)
    req.normalize_batch_and_arguments()
    out["request"] = "ok"
    from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH, FINISH_MATCHED_TOKEN
    out["finish"] = [module.finish_reason({"finish_reason": FINISH_LENGTH(length=64).to_json()}),
                     module.finish_reason({"finish_reason": FINISH_MATCHED_TOKEN(matched=2).to_json()})]
    try:
        module.finish_reason({"finish_reason": FINISH_ABORT("Invalid grammar request: x").to_json()})
    except ValueError as exc:
        out["finish"].append(f"ValueError: {exc}")
except ImportError as exc:  # sglang 0.5.23's request module imports torchvision
    out["request"] = f"ImportError: {exc}"

root = os.path.dirname(sglang.__file__)
source = ""
for folder, _, files in os.walk(os.path.join(root, "srt")):
    for name in files:
        if name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                source += fh.read()
out["source"] = {needle: needle in source for needle in args["needles"]}
out["module"] = args["module"]
print(json.dumps(out))
"""

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}
NEEDLES = ['"/generate"', '"/health"', '"/release_memory_occupation"', '"/resume_memory_occupation"',
           "SGLANG_GRAMMAR_TIMEOUT"]


def render_for(version: str, tmp_path: Path) -> Path:
    data = copy.deepcopy(tomllib.loads((DEPLOYMENTS / "qwen3-coder-30b.toml").read_text()))
    data["image"]["pins"] = {"sglang[all]": version}
    if not compat_sglang.supports(version, "grammar-backend-llguidance"):
        data["decoding"]["backend"] = "xgrammar"
    data["cold_start"]["snapshot"] = compat_sglang.supports(version, "memory-saver")
    manifest = tmp_path / "coder.toml"
    manifest.write_text(dump_toml(data)[0])
    module = tmp_path / "coder.py"
    module.write_text(rendering.render(load(manifest)))
    return module


@pytest.fixture(scope="module", params=sorted(RELEASES), ids=str)
def probed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    version = request.param
    module = render_for(version, tmp_path_factory.mktemp(f"sglang-{version}"))
    args = {"module": str(module), "schema": SCHEMA, "features": list(FEATURE_FLAGS), "needles": NEEDLES,
            "fields": ["model_path", "tp_size", "grammar_backend", "mem_fraction_static", "max_running_requests",
                       "context_length"]}
    code = f"ARGS = {json.dumps(json.dumps(args))}\n" + PROBE
    return version, vllm_wheels.run_with_sglang(version, code, timeout=600)


def test_eras_are_the_ones_tested() -> None:
    for version, era in RELEASES.items():
        assert compat_sglang.era(version) == era
    assert set(RELEASES.values()) == {era for _, era in compat_sglang.ERAS}


def test_server_arguments_parse_with_sglangs_own_parser(probed: tuple[str, dict[str, Any]]) -> None:
    version, found = probed
    server = found["server"]  # what sglang's ServerArgs holds
    assert (server["model_path"], server["tp_size"], server["grammar_backend"]) == (
        "Qwen/Qwen3-Coder-30B-A3B-Instruct", 1, found["values"]["--grammar-backend"])
    assert (server["mem_fraction_static"], server["max_running_requests"], server["context_length"]) == (
        0.88, 20, 32768)
    values = found["values"]  # flag -> the value sglang parsed it to
    assert values["--model-path"] == values["--served-model-name"] == "Qwen/Qwen3-Coder-30B-A3B-Instruct"
    assert values["--revision"] == "b2cff646eb4bb1d68355c01b18ae02e7cf42d120"
    expected_backend = "llguidance" if compat_sglang.supports(version, "grammar-backend-llguidance") else "xgrammar"
    assert values["--grammar-backend"] == expected_backend
    graphs = "--cuda-graph-max-bs-decode" if compat_sglang.supports(version, "cuda-graph-max-bs-decode") else \
        "--cuda-graph-max-bs"
    assert (values["--mem-fraction-static"], values["--max-running-requests"], values[graphs]) == (0.88, 20, 20)
    assert (values["--context-length"], values["--tp-size"], values["--dtype"]) == (32768, 1, "bfloat16")
    assert values.get("--enable-memory-saver", False) is compat_sglang.supports(version, "memory-saver")
    assert values["--host"] == "127.0.0.1" and values["--port"] == 30000


def test_feature_table_matches_each_release(probed: tuple[str, dict[str, Any]]) -> None:
    """The releases on both sides of each bound accept exactly the flags the table says."""
    version, found = probed
    for flag, feature in FEATURE_FLAGS.items():
        assert found["accepted"][flag] is compat_sglang.supports(version, feature), (version, flag)
    assert found["llguidance"] is compat_sglang.supports(version, "grammar-backend-llguidance")


def test_sampling_params_and_request_are_sglangs_own(probed: tuple[str, dict[str, Any]]) -> None:
    version, found = probed
    assert found["sampling"] == {"json_schema": json.dumps(SCHEMA), "max_new_tokens": 64, "top_p": 0.95}
    if version == "0.5.23":  # its request module imports torchvision, which has no build for this torch
        assert found["request"].startswith("ImportError") and "torchvision" in found["request"]
        return
    assert found["request"] == "ok"
    assert found["finish"] == ["length", "stop", "ValueError: Invalid grammar request: x"]


def test_routes_and_environment_the_module_uses_exist(probed: tuple[str, dict[str, Any]]) -> None:
    version, found = probed
    source = found["source"]
    assert source['"/generate"'] and source['"/health"']
    memory = compat_sglang.supports(version, "memory-saver")
    assert source['"/release_memory_occupation"'] is memory and source['"/resume_memory_occupation"'] is memory
    assert source["SGLANG_GRAMMAR_TIMEOUT"] is compat_sglang.supports(version, "grammar-timeout-env")
    module = (Path(found["module"]).read_text())
    assert ('"SGLANG_GRAMMAR_TIMEOUT"' in module) is source["SGLANG_GRAMMAR_TIMEOUT"]  # set only where read
