"""The SGLang engine: a manifest with `[engine] kind = "sglang"` renders a module in the style of
Modal's SGLang examples, maps its settings onto SGLang's server arguments, and is refused where
SGLang has no equivalent. (The committed deployments/qwen3-coder-30b.toml is also one of the
EXAMPLES every render, check and CLI test runs over; its deploy is in tests/test_apply.py.)"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import pytest
import tomllib

from liftdeploy import render as rendering
from liftdeploy.manifest import load
from tests.helpers_render import DEPLOYMENTS, cli, dump_toml, inspect_rendered

SEEDS = tomllib.loads((DEPLOYMENTS / "qwen3-coder-30b.toml").read_text())


def seeds() -> dict[str, Any]:
    return copy.deepcopy(SEEDS)


def write(tmp_path: Path, data: dict[str, Any], name: str = "coder.toml") -> Path:
    path = tmp_path / name
    path.write_text(dump_toml(data)[0])
    return path


def server_args(path: Path) -> list[str]:
    tree = ast.parse(rendering.render(load(path)))
    (args,) = [n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "SERVER_ARGS"]
    return ast.literal_eval(args)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ## Server arguments


def test_the_seeds_deployment_maps_onto_sglang_arguments() -> None:
    args = server_args(DEPLOYMENTS / "qwen3-coder-30b.toml")
    assert flag(args, "--model-path") == "Qwen/Qwen3-Coder-30B-A3B-Instruct"
    assert flag(args, "--revision") == SEEDS["model"]["revision"]
    assert flag(args, "--context-length") == "32768" and flag(args, "--mem-fraction-static") == "0.88"
    assert flag(args, "--grammar-backend") == "llguidance"  # the manifest's `guidance`
    assert flag(args, "--max-running-requests") == "20" == flag(args, "--cuda-graph-max-bs")
    assert "--enable-memory-saver" not in args and "--disable-cuda-graph" not in args


@pytest.mark.parametrize(
    ("changes", "present", "absent"),
    [
        ({"cold_start": {"fast_boot": True}}, ["--disable-cuda-graph"], ["--cuda-graph-max-bs"]),
        ({"cold_start": {"snapshot": True}}, ["--enable-memory-saver", "--enable-weights-cpu-backup"], []),
        ({"cold_start": {"snapshot": True}, "image": {"pins": {"sglang[all]": "0.4.6.post5"}}},
         ["--enable-memory-saver"], ["--enable-weights-cpu-backup"]),  # weights CPU backup came in 0.5.3
        ({"decoding": {"backend": "xgrammar"}}, ["xgrammar"], ["llguidance"]),
        ({"model": {"trust_remote_code": True, "quantization": "fp8"}}, ["--trust-remote-code", "fp8"], []),
    ],
    ids=["fast-boot", "snapshot", "snapshot-0.4", "xgrammar", "remote-code-fp8"],
)
def test_settings_map_onto_server_arguments(tmp_path: Path, changes: dict[str, Any], present: list[str],
                                            absent: list[str]) -> None:
    data = seeds()
    for section, values in changes.items():
        data[section].update(values)
    args = server_args(write(tmp_path, data))
    assert all(a in args for a in present) and not any(a in args for a in absent), args


def test_snapshot_releases_memory_before_and_resumes_after(tmp_path: Path) -> None:
    """As Modal's SGLang snapshot example: start, warm up and sleep in `enter(snap=True)`, wake in
    `enter(snap=False)`; the class asks Modal for a memory + GPU snapshot."""
    data = seeds()
    data["cold_start"]["snapshot"] = True
    module = tmp_path / "coder.py"
    module.write_text(rendering.render(load(write(tmp_path, data))))
    (found,) = inspect_rendered(module)
    cls = found["classes"]["Inference"]
    assert (cls["enter_snap"], cls["enter"]) == (["start_engine"], ["wake_engine"])
    fn = found["functions"]["Inference.*"]
    assert fn["enable_memory_snapshot"] is True and fn["experimental_options"] == {"enable_gpu_snapshot": "True"}
    source = module.read_text()
    assert "self.engine.sleep()" in source and '"/release_memory_occupation"' in source
    assert "TORCHINDUCTOR_COMPILE_THREADS" in source  # as Modal's example, for GPU snapshots


def test_caches_and_grammar_timeout_reach_the_image() -> None:
    env = rendering.image_env(load(DEPLOYMENTS / "qwen3-coder-30b.toml").manifest)
    mount = SEEDS["volumes"]["compile_cache"]["mount"]
    assert env["SGLANG_DG_CACHE_DIR"] == f"{mount}/deep_gemm"  # DeepGEMM's JIT, as in Modal's examples
    assert env["FLASHINFER_WORKSPACE_BASE"] == f"{mount}/flashinfer"
    assert env["SGLANG_GRAMMAR_TIMEOUT"] == "10.0" and env["HF_HOME"] == "/models"


def test_grammar_timeout_only_where_sglang_reads_it(tmp_path: Path) -> None:
    data = seeds()
    data["image"]["pins"] = {"sglang[all]": "0.5.9"}  # polls instead: the default is not refused, not set
    assert "SGLANG_GRAMMAR_TIMEOUT" not in rendering.image_env(load(write(tmp_path, data)).manifest)


def test_module_imports_without_sglang_and_speaks_its_protocol() -> None:
    """The module imports where no sglang is installed (it runs SGLang as a process), and its
    helpers build what SGLang's /generate takes and read what it answers."""
    namespace: dict[str, Any] = {"__name__": "rendered"}
    exec(compile(rendering.render(load(DEPLOYMENTS / "qwen3-coder-30b.toml")), "coder.py", "exec"), namespace)
    params = namespace["sampling_params"]({"type": "object"}, max_tokens=7, temperature=0.2, top_p=0.9)
    assert params == {"max_new_tokens": 7, "temperature": 0.2, "top_p": 0.9, "json_schema": '{"type": "object"}'}
    assert "json_schema" not in namespace["sampling_params"](None, max_tokens=7, temperature=0.2, top_p=0.9)
    command = namespace["launch_command"]()
    assert command[1:3] == ["-m", "sglang.launch_server"] and command[-4:] == ["--host", "127.0.0.1", "--port", "30000"]
    finish = namespace["finish_reason"]
    assert finish({"finish_reason": {"type": "length", "length": 7}}) == "length"
    assert finish({"finish_reason": {"type": "stop", "matched": 151645}}) == "stop"
    with pytest.raises(ValueError, match="Invalid grammar request"):
        finish({"finish_reason": {"type": "abort", "message": "Invalid grammar request: key=('json', '{')"}})


# ## Refused where SGLang has no equivalent


@pytest.mark.parametrize(
    ("changes", "message", "hint"),
    [
        ({"decoding": {"backend": "auto"}}, "input should be 'guidance' or 'xgrammar'", "decoding.backend"),
        ({"decoding": {"backend": "guidance"}, "image": {"pins": {"sglang[all]": "0.4.3"}}},
         "sglang 0.4.3 has no llguidance grammar backend", "pin a newer sglang"),
        ({"cold_start": {"snapshot": True}, "image": {"pins": {"sglang[all]": "0.4.1.post5"}},
          "decoding": {"backend": "xgrammar"}},
         "sglang 0.4.1.post5 cannot release GPU memory before a snapshot", "snapshot = false"),
        ({"image": {"pins": {"vllm": "0.9.2"}}}, "`sglang` must be pinned (`engine.kind` is sglang)",
         'add `sglang = "0.5.4.post3"`'),
        ({"image": {"pins": {"sglang": "0.5.4.post3", "vllm": "0.9.2"}}},
         "`vllm` is pinned but `engine.kind` is sglang", 'kind = "vllm"'),
        ({"image": {"pins": {"sglang": "0.3.6"}}}, "cannot be rendered: sglang 0.3.6 predates 0.4.0",
         "pin a sglang"),
        ({"engine": {"kind": "sglan"}}, "engine.kind", "did you mean `sglang`?"),
        ({"decoding": {"backend": "guidance", "schema_compile_timeout": 5.0},
          "image": {"pins": {"sglang[all]": "0.5.9"}}},
         "sglang 0.5.9 takes no grammar compile timeout", "remove `schema_compile_timeout`"),
        ({"decoding": {"backend": "guidance", "whitespace": "spaced"}},
         "the `spaced` layout is for vLLM's guidance backend", 'set `whitespace = "compact"`'),
    ],
    ids=["auto", "llguidance-0.4.3", "snapshot-0.4.1", "no-sglang-pin", "both-engines", "too-old", "typo",
         "compile-timeout-0.5.9", "spaced"],
)
def test_refused_with_error_and_hint(tmp_path: Path, changes: dict[str, Any], message: str, hint: str) -> None:
    data = seeds()
    for section, values in changes.items():
        data[section].update(values)
    result = cli("validate", write(tmp_path, data))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and message in lines[0], lines
    assert lines[1].startswith("hint: ") and hint in lines[1], lines
    assert "Traceback" not in result.stderr


# ## check and plan


def test_check_catches_the_seeds_sglang_pin_set(tmp_path: Path) -> None:
    """The seeds' `sglang[all]` at 0.5.3.post1: uv refuses its yanked transformers, and its
    flashinfer needs a package gone from the index; `check` says both, offline."""
    data = seeds()
    data["image"]["pins"] = {"sglang[all]": "0.5.3.post1"}
    result = cli("check", write(tmp_path, data))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "error[required-release-yanked]" in out and "transformers==4.57.0, which is yanked" in out
    assert "error[flashinfer-tvm-ffi-beta-gone]" in out and "upgrade sglang to >=0.5.4.post3" in out


@pytest.mark.parametrize(
    ("pins", "code"),
    [
        ({"sglang": "0.5.4.post3", "transformers": "4.57.6"}, "error[transformers-out-of-range]"),
        ({"sglang": "0.4.6.post5"}, "error[sglang-runtime-missing]"),
        ({"sglang": "0.5.23"}, "error[python-unsupported]"),  # with image.python 3.10
    ],
)
def test_check_catches_wrong_sglang_pins(tmp_path: Path, pins: dict[str, str], code: str) -> None:
    data = seeds()
    data["image"]["pins"] = pins
    if "0.5.23" in pins.values():
        data["image"]["python"] = "3.10"
    result = cli("check", write(tmp_path, data))
    assert result.returncode == 1 and code in result.stdout, result.stdout + result.stderr


def test_check_sizes_a_mixture_of_experts_by_all_its_parameters(tmp_path: Path) -> None:
    data = seeds()
    data["compute"]["gpu"] = ["A10G", "A100-80GB"]
    result = cli("check", write(tmp_path, data))
    assert result.returncode == 1
    assert "error[gpu-memory]" in result.stdout
    assert "3.3B parameters are active per token, but all 30.5B stay" in result.stdout
    data = seeds()
    data["model"]["params_b"] = 3.3  # the active count: the memory check would pass an A10G
    result = cli("check", write(tmp_path, data, "active.toml"))
    assert result.returncode == 1 and "error[moe-active-params]" in result.stdout
    assert "set `params_b = 30.5`" in result.stdout


def test_plan_names_the_engine_and_the_memory_of_all_experts() -> None:
    result = cli("plan", DEPLOYMENTS / "qwen3-coder-30b.toml")
    assert result.returncode == 0, result.stderr
    assert "engine       SGLang 0.5.4.post3, grammar backend llguidance" in result.stdout
    assert "a mixture of experts: 3.3B active per token, all 30.5B held" in result.stdout
    assert "A100-80GB ($2.50/h), H100 ($3.95/h)" in result.stdout and "cold start" in result.stdout
