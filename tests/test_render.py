"""Rendering: deterministic bytes, lint-clean code, manifest values only as literals, and a
module that the real `modal` client accepts with exactly the options the manifest asks for.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liftdeploy import render as rendering
from liftdeploy.manifest import Loaded, load
from tests.helpers_render import (
    DEPLOYMENTS,
    EXAMPLES,
    ROOT,
    VENV_BIN,
    base,
    cli,
    cli_in_process,
    dump_toml,
    inspect_rendered,
)

EXAMPLE_IDS = [f"{name}{'@' + env if env else ''}" for name, env in EXAMPLES]


# A manifest exercising the options the examples leave out: snapshots, cpu/memory/region,
# a tensor-parallel `any` chain, a schedule, bearer auth on health, proxy auth, no volumes.
def sink_manifest() -> dict[str, Any]:
    data = base()
    data["model"].update(id="Qwen/Qwen2.5-Coder-32B-Instruct", tensor_parallel_size=2, quantization="fp8")
    data["compute"] = {"gpu": ["H100:2", "any"], "cpu": 8.0, "memory": 65536, "region": ["us-east", "us-west"]}
    data["image"]["base"] = "nvidia/cuda:12.4.1-devel-ubuntu22.04"
    data["image"]["pins"]["vllm"] = "0.10.1"
    del data["volumes"]
    data["scaling"] = {"scaledown_window": 90, "timeout": 45, "startup_timeout": 1500, "min_containers": 2,
                       "buffer_containers": 0}
    data["concurrency"] = {"max_inputs": 8}
    data["scaling"]["business_hours"] = {"days": "1-6", "start": "07:30", "end": "19:00",
                                         "timezone": "America/New_York", "min_containers": 3, "buffer_containers": 1}
    data["cold_start"] = {"snapshot": True, "compile_cache": False, "fast_download": False}
    data["secrets"] = {"names": ["huggingface", "test-api-token"], "bearer": "test-api-token",
                       "keys": {"huggingface": ["HF_TOKEN"], "test-api-token": ["OTHER_KEY"]}}
    data["endpoints"] = [
        {"kind": "health", "auth": "bearer", "label": "status"},
        {"kind": "generate", "auth": "proxy"},
        {"kind": "openai", "label": "v1", "auth": "none"},
    ]
    data["env"] = {}
    return data


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    path = tmp_path_factory.mktemp("sink") / "sink.toml"
    path.write_text(dump_toml(sink_manifest())[0])
    return load(path)


@pytest.fixture(scope="module")
def inspected(tmp_path_factory: pytest.TempPathFactory, sink: Loaded) -> dict[str, Any]:
    """Every example (and the sink) rendered fresh, imported under modal once per module."""
    out = tmp_path_factory.mktemp("rendered")
    paths = []
    for (name, env), key in zip(EXAMPLES, EXAMPLE_IDS, strict=True):
        paths.append(out / f"{key.replace('@', '_').replace('.', '_')}.py")
        paths[-1].write_text(rendering.render(load(DEPLOYMENTS / name, env)))
    paths.append(out / "sink.py")
    paths[-1].write_text(rendering.render(sink))
    return dict(zip([*EXAMPLE_IDS, "sink"], inspect_rendered(*paths), strict=True))


# ## Bytes


@pytest.mark.parametrize(("name", "env"), EXAMPLES, ids=EXAMPLE_IDS)
def test_render_is_deterministic_and_names_its_manifest(name: str, env: str | None) -> None:
    loaded = load(DEPLOYMENTS / name, env)
    first, second = rendering.render(loaded), rendering.render(load(DEPLOYMENTS / name, env))
    assert first == second
    header = first.splitlines()[:3]
    source = f'"deployments/{name}"'
    assert header[0].startswith(f"# Rendered by liftdeploy {rendering.__version__} from {source}")
    assert (f', env "{env}";' in header[0]) == (env is not None)
    digest = hashlib.sha256((DEPLOYMENTS / name).read_bytes()).hexdigest()
    assert header[1] == f"# manifest sha256: {digest}"
    assert header[2] == f"# re-render: liftdeploy render {source}" + (f' --env "{env}"' if env else "")


@pytest.mark.parametrize(("name", "env"), EXAMPLES, ids=EXAMPLE_IDS)
def test_committed_module_is_a_fresh_render(name: str, env: str | None) -> None:
    loaded = load(DEPLOYMENTS / name, env)
    committed = rendering.output_path(loaded)
    assert committed.parent == DEPLOYMENTS
    assert committed.read_text(encoding="utf-8") == rendering.render(loaded)


def test_bytes_do_not_depend_on_cwd_or_path_spelling(tmp_path: Path) -> None:
    """`--stdout` from the root, from deployments/ and with an absolute path: the same bytes."""
    runs = [
        cli("render", "deployments/qwen3-8b.toml", "--env", "prod", "--stdout"),
        cli("render", "qwen3-8b.toml", "--env", "prod", "--stdout", cwd=DEPLOYMENTS),
        cli("render", DEPLOYMENTS / "qwen3-8b.toml", "--env", "prod", "--stdout", cwd=tmp_path),
        cli("render", "./deployments/../deployments/qwen3-8b.toml", "-e", "prod", "--stdout"),
    ]
    assert [r.returncode for r in runs] == [0] * len(runs), [r.stderr for r in runs]
    assert {r.stdout for r in runs} == {(DEPLOYMENTS / "qwen3_8b_prod.py").read_text()}


def test_header_does_not_embed_the_machine_path(sink: Loaded) -> None:
    """Outside a project the header names the file (not `/tmp/pytest-…/sink.toml`)."""
    first = rendering.render(sink).splitlines()[0]
    assert 'sink.toml";' in first
    assert str(sink.path.parent) not in first
    if not any((p / ".git").exists() or (p / "pyproject.toml").exists() for p in sink.path.parents):
        assert first.startswith('# Rendered by liftdeploy 0.1.0 from "sink.toml";')


def test_ruff_passes_on_every_render(tmp_path: Path, sink: Loaded) -> None:
    files = []
    for name, env in EXAMPLES:
        loaded = load(DEPLOYMENTS / name, env)
        files.append(tmp_path / rendering.output_path(loaded).name)
        files[-1].write_text(rendering.render(loaded))
    files.append(tmp_path / "sink.py")
    files[-1].write_text(rendering.render(sink))
    ruff = VENV_BIN / "ruff"
    command = [str(ruff)] if ruff.exists() else [str(VENV_BIN / "python"), "-m", "ruff"]
    proc = subprocess.run([*command, "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), *map(str, files)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for file in files:
        compile(file.read_text(), str(file), "exec")


# ## Values reach code only as literals


def _assignments(tree: ast.Module) -> dict[str, ast.expr]:
    return {node.targets[0].id: node.value for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def _calls(tree: ast.Module, attribute: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == attribute]


@pytest.mark.parametrize(("name", "env"), EXAMPLES, ids=EXAMPLE_IDS)
def test_manifest_values_are_literals_in_the_code(name: str, env: str | None) -> None:
    loaded = load(DEPLOYMENTS / name, env)
    m = loaded.manifest
    tree = ast.parse(rendering.render(loaded))
    values = _assignments(tree)

    gpu = values["GPU"]
    assert isinstance(gpu, ast.List) and all(isinstance(e, ast.Constant) for e in gpu.elts)
    assert [e.value for e in gpu.elts] == m.gpu_chain()
    if m.compute.gpu[-1].type != "any":
        assert [e.value for e in gpu.elts] == [str(g) for g in m.compute.gpu]
    sglang = str(m.engine.kind) == "sglang"
    version_constant = "SGLANG_VERSION" if sglang else "VLLM_VERSION"
    for constant, expected in [("APP_NAME", m.app.name), ("MODEL_NAME", m.model.id),
                               ("MODEL_REVISION", m.model.revision), (version_constant, m.engine_version),
                               ("MAX_INPUTS", m.concurrency.max_inputs),
                               ("MAX_TOKENS_LIMIT", m.decoding.max_tokens_limit),
                               ("DEFAULT_TEMPERATURE", m.decoding.temperature)]:
        assert isinstance(values[constant], ast.Constant), constant
        assert values[constant].value == expected, constant
    if sglang:  # SGLang's launch_server arguments, as flags and values
        args = ast.literal_eval(values["SERVER_ARGS"])
        assert args[args.index("--model-path") + 1] == m.model.id
        assert ("--revision" in args) == bool(m.model.revision)
        assert args[args.index("--context-length") + 1] == str(m.model.max_model_len)
    else:
        engine = ast.literal_eval(values["ENGINE_ARGS"])
        assert engine["model"] == m.model.id and engine["revision"] == m.model.revision
        assert engine["max_model_len"] == m.model.max_model_len
    assert ast.literal_eval(values["ENDPOINTS"]) == [
        {"kind": ep.kind.value, "label": ep.label, "auth": ep.auth.value} for ep in m.endpoints]

    (install,) = [c for c in _calls(tree, "uv_pip_install")
                  if any(isinstance(a, ast.Constant) and str(a.value).startswith(f"{m.engine.kind}") for a in c.args)]
    assert all(isinstance(a, ast.Constant) for a in install.args)
    assert sorted(a.value for a in install.args) == sorted(m.image.requirements())
    for call in _calls(tree, "from_name"):
        assert all(isinstance(a, ast.Constant) for a in call.args), ast.unparse(call)
        for keyword in call.keywords:  # a constant, or a list of them (required_keys)
            assert ast.literal_eval(keyword.value) is not None, ast.unparse(call)


def _shape(text: str) -> str:
    """The code's structure with every literal blanked out."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            node.value = None
    return ast.dump(tree)


HOSTILE = ['"); import os; os.system("id") #', "'''", '\\', "x'y\"z", "{{ m }}", "${HOME}", "\t\u2028"]


def test_hostile_strings_change_literals_not_code(tmp_path: Path) -> None:
    """Strings that are free text in the manifest cannot change the rendered code's structure."""
    plain, hostile = base(), base()
    plain["image"]["env"] = {f"HOSTILE_{i}": "plain" for i in range(len(HOSTILE))}
    hostile["image"]["env"] = {f"HOSTILE_{i}": value for i, value in enumerate(HOSTILE)}
    plain["compute"]["region"] = ["us-east"] * len(HOSTILE)
    hostile["compute"]["region"] = HOSTILE
    texts = []
    for i, data in enumerate((plain, hostile)):
        path = tmp_path / f"m{i}.toml"
        path.write_text(dump_toml(data)[0])
        texts.append(rendering.render(load(path)))
    assert _shape(texts[0]) == _shape(texts[1])
    tree = ast.parse(texts[1])
    (env_call,) = [c for c in _calls(tree, "env") if isinstance(c.args[0], ast.Dict)]
    env = ast.literal_eval(env_call.args[0])
    assert {k: v for k, v in env.items() if k.startswith("HOSTILE_")} == hostile["image"]["env"]
    (cls_call,) = _calls(tree, "cls")
    region = {k.arg: k.value for k in cls_call.keywords}["region"]
    assert ast.literal_eval(region) == HOSTILE


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, database=None)
@given(json_values, st.integers(min_value=0, max_value=12))
def test_py_writes_literals_that_read_back(value: Any, indent: int) -> None:
    for text in (rendering.py(value), rendering.py_block(value, indent, width=20)):
        assert ast.literal_eval(text) == value
        assert isinstance(ast.parse(text, mode="eval").body, (ast.Constant, ast.List, ast.Dict, ast.UnaryOp))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_py_refuses_non_finite_numbers(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        rendering.py(bad)


def test_py_prefers_double_quotes() -> None:
    assert rendering.py("a'b") == '"a\'b"'
    assert rendering.py('a"b') == "'a\"b'"
    assert rendering.py("plain") == '"plain"'


# ## The module under the real modal client


def _expected(loaded: Loaded) -> dict[str, Any]:
    """What the Inference class must be declared with, straight from the manifest."""
    m = loaded.manifest
    volumes = {}
    if m.volumes.weights:
        volumes[m.volumes.weights.mount] = {"name": m.volumes.weights.name,
                                            "create_if_missing": m.volumes.weights.create_if_missing}
    if m.volumes.compile_cache:
        volumes[m.volumes.compile_cache.mount] = {"name": m.volumes.compile_cache.name,
                                                  "create_if_missing": m.volumes.compile_cache.create_if_missing}
    secrets = list(dict.fromkeys([*m.secrets.names, *([m.secrets.bearer] if m.secrets.bearer else [])]))
    keys = {name: list(m.secrets.keys.get(name, [])) + (["LIFTDEPLOY_API_TOKEN"] if name == m.secrets.bearer else [])
            for name in secrets}
    return {
        "image": f"{m.engine.kind}_image",
        "gpu": m.gpu_chain(),
        "spec_gpus": m.gpu_chain(),
        "cpu": m.compute.cpu,
        "memory": m.compute.memory,
        "region": [m.compute.region] if isinstance(m.compute.region, str) else m.compute.region,
        "timeout": m.scaling.timeout,
        "startup_timeout": m.scaling.startup_timeout,
        "min_containers": m.scaling.min_containers or None,
        "max_containers": m.scaling.max_containers,
        "buffer_containers": m.scaling.buffer_containers,
        "scaledown_window": m.scaling.scaledown_window,
        "max_inputs": m.concurrency.max_inputs,
        "target_inputs": m.concurrency.target_inputs,
        "volumes": volumes,
        "secrets": secrets,
        "secret_keys": keys,
        "schedule": None,
        "enable_memory_snapshot": m.cold_start.snapshot,
        "experimental_options": {"enable_gpu_snapshot": "True"} if m.cold_start.snapshot else {},
        "webhook": None,
    }


def _check_app(found: dict[str, Any], loaded: Loaded) -> None:
    m = loaded.manifest
    assert found["imported"] == [], "the rendered module imported the serving stack or fastapi"
    assert found["app_name"] == m.app.name
    health = [ep for ep in m.endpoints if ep.kind.value == "health"]
    on_gpu = [ep for ep in m.endpoints if ep.kind.value != "health"]
    expected_functions = {"Inference.*"} | {f"web_{ep.label.replace('-', '_')}" for ep in health}
    hours = m.scaling.business_hours
    if hours:
        expected_functions |= {"business_hours_start", "business_hours_end"}
    assert set(found["functions"]) == expected_functions
    assert found["entrypoints"] == ["main"]

    # The GPU class: every option the manifest sets, as modal recorded it.
    assert found["functions"]["Inference.*"] == _expected(loaded)
    inference = found["classes"]["Inference"]
    assert inference["is_modal_cls"] is True
    snap = m.cold_start.snapshot
    # Modal's vLLM snapshot pattern: load, warm up and sleep before the snapshot; wake after the restore.
    assert (inference["enter_snap"], inference["enter"]) == ((["start_and_sleep"], ["wake"]) if snap
                                                             else ([], ["start_engine"]))
    webs = {name: method["webhook"] for name, method in inference["methods"].items() if method["webhook"]}
    assert webs == {f"web_{ep.label.replace('-', '_')}": {"label": ep.label, "type": "WEBHOOK_TYPE_ASGI_APP",
                                                          "requires_proxy_auth": ep.auth.value == "proxy"}
                    for ep in on_gpu}
    assert inference["methods"]["ping"] == {"method": True, "webhook": None}

    # Health answers from the light image, without a GPU, volumes or the model.
    for ep in health:
        fn = found["functions"][f"web_{ep.label.replace('-', '_')}"]
        assert fn["webhook"] == {"label": ep.label, "type": "WEBHOOK_TYPE_ASGI_APP",
                                 "requires_proxy_auth": ep.auth.value == "proxy"}
        assert (fn["image"], fn["gpu"], fn["volumes"]) == ("web_image", None, {})
        assert fn["secrets"] == ([m.secrets.bearer] if ep.auth.value == "bearer" else [])
        if ep.auth.value == "bearer":  # a Secret without the token fails the deploy, not every request
            assert "LIFTDEPLOY_API_TOKEN" in fn["secret_keys"][m.secrets.bearer]
    if hours:  # Modal's autoscaler on a schedule, in the manifest's time zone
        start, end = found["functions"]["business_hours_start"], found["functions"]["business_hours_end"]
        assert start["schedule"] == {"cron": hours.cron(hours.start), "timezone": hours.timezone}
        assert end["schedule"] == {"cron": hours.cron(hours.end), "timezone": hours.timezone}
        assert (start["image"], start["gpu"], end["image"], end["gpu"]) == ("web_image", None, "web_image", None)

    # Images: the pins, the web pins and the environment reach the Dockerfile commands.
    def installed(commands: list[str]) -> set[str]:
        runs = [shlex.split(c.removeprefix("RUN ")) for c in commands if "uv pip install" in c]
        return {word for run in runs for word in run if "==" in word}

    vllm_image, web_image = found["images"][f"{m.engine.kind}_image"], found["images"]["web_image"]
    assert installed(vllm_image) == set(m.image.requirements())
    assert installed(web_image) == {f"{k}=={v}" for k, v in m.image.web_pins.items()}
    env_lines = dict(shlex.split(c.removeprefix("ENV "))[0].split("=", 1) for c in vllm_image
                     if c.startswith("ENV ") and not c.startswith("ENV TERMINFO"))
    assert env_lines == rendering.image_env(m)
    for key, value in m.image.env.items():
        assert env_lines[key] == value
    if m.volumes.weights:
        assert env_lines["HF_HOME"] == m.volumes.weights.mount
    if m.image.base:
        assert vllm_image[0] == f"FROM {m.image.base}"
        assert "ENTRYPOINT []" in vllm_image
    else:
        assert vllm_image[0].startswith(f"FROM python:{m.image.python}.")
    assert web_image[0].startswith(f"FROM python:{m.image.python}.")
    assert found["volumes"] == {name: spec.name for name, spec in
                                (("weights_volume", m.volumes.weights),
                                 ("cache_volume" if str(m.engine.kind) == "sglang" else "vllm_cache_volume",
                                  m.volumes.compile_cache))
                                if spec}


@pytest.mark.parametrize(("name", "env"), EXAMPLES, ids=EXAMPLE_IDS)
def test_example_declares_what_the_manifest_says(name: str, env: str | None, inspected: dict[str, Any]) -> None:
    key = f"{name}{'@' + env if env else ''}"
    _check_app(inspected[key], load(DEPLOYMENTS / name, env))


def test_examples_differ_where_their_manifests_do(inspected: dict[str, Any]) -> None:
    """Spot checks against the TOML text itself, so the oracle is not only the manifest model."""
    prod = inspected["qwen3-8b.toml@prod"]["functions"]["Inference.*"]
    assert (prod["gpu"], prod["min_containers"], prod["max_containers"]) == (["H100", "A100-80GB"], 1, 8)
    base_8b = inspected["qwen3-8b.toml"]["functions"]["Inference.*"]
    assert base_8b["gpu"][:2] == ["L40S", "A100-80GB"] and len(base_8b["gpu"]) > 2  # `any` expanded
    assert "T4" not in base_8b["gpu"]  # 16 GB cannot hold Qwen3-8B in bf16 with headroom
    assert (base_8b["min_containers"], base_8b["target_inputs"], base_8b["buffer_containers"]) == (None, 24, 1)
    big = inspected["qwen32b.toml"]["functions"]["Inference.*"]
    dev = inspected["qwen32b.toml@dev"]["functions"]["Inference.*"]
    assert (big["gpu"], big["scaledown_window"], big["startup_timeout"]) == (["A100-80GB", "H100"], 300, 900)
    assert (dev["gpu"], dev["scaledown_window"]) == (["A10G", "L4"], 120)
    assert inspected["qwen32b.toml@dev"]["app_name"] == "lift-sys-inference-dev"
    methods = inspected["qwen32b.toml"]["classes"]["Inference"]["methods"]
    generate = methods["web_lift_sys_inference_generate"]["webhook"]
    assert generate["requires_proxy_auth"] is True  # auth defaults to Modal proxy auth
    # default labels are `<app name>-<kind>`, as Modal labels its own: two apps never claim one URL
    assert generate["label"] == "lift-sys-inference-generate"
    health = inspected["qwen32b.toml"]["functions"]["web_lift_sys_inference_health"]["webhook"]
    assert health["requires_proxy_auth"] is False


def test_sink_declares_what_the_manifest_says(inspected: dict[str, Any], sink: Loaded) -> None:
    found = inspected["sink"]
    _check_app(found, sink)
    inference = found["functions"]["Inference.*"]
    assert inference["gpu"][0] == "H100:2" and all(g.endswith(":2") for g in inference["gpu"])
    assert (inference["cpu"], inference["memory"], inference["region"]) == (8.0, 65536, ["us-east", "us-west"])
    assert (inference["timeout"], inference["startup_timeout"], inference["scaledown_window"]) == (45, 1500, 90)
    assert (inference["min_containers"], inference["buffer_containers"]) == (2, 0)
    assert inference["enable_memory_snapshot"] is True
    assert found["functions"]["web_status"]["secrets"] == ["test-api-token"]
    assert found["functions"]["business_hours_start"]["schedule"] == {"cron": "30 7 * * 1-6",
                                                                      "timezone": "America/New_York"}
    assert found["functions"]["business_hours_end"]["schedule"] == {"cron": "0 19 * * 1-6",
                                                                    "timezone": "America/New_York"}
    assert inference["secret_keys"] == {"huggingface": ["HF_TOKEN"],
                                        "test-api-token": ["OTHER_KEY", "LIFTDEPLOY_API_TOKEN"]}
    methods = found["classes"]["Inference"]["methods"]
    assert methods["web_test_app_generate"]["webhook"]["requires_proxy_auth"] is True
    assert methods["web_v1"]["webhook"]["requires_proxy_auth"] is False


# ## render --check, -o, --stdout and atomic writes


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of deployments/ inside a project of its own (so headers name `deployments/...`)."""
    (tmp_path / "pyproject.toml").write_text("")
    shutil.copytree(DEPLOYMENTS, tmp_path / "deployments")
    return tmp_path


def test_check_passes_on_committed_modules() -> None:
    for name, env in EXAMPLES:
        proc = cli_in_process("render", f"deployments/{name}", *(["--env", env] if env else []), "--check")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("ok: ") and proc.stderr == ""


def test_check_fails_after_a_manifest_edit(project: Path) -> None:
    manifest = project / "deployments" / "qwen32b.toml"
    before = {p.name: p.read_bytes() for p in (project / "deployments").iterdir()}
    for env in (None, "dev"):
        env_args = ["--env", env] if env else []
        proc = cli_in_process("render", "deployments/qwen32b.toml", *env_args, "--check", cwd=project)
        assert proc.returncode == 0, proc.stderr
    manifest.write_text(manifest.read_text().replace("timeout = 600", "timeout = 660"))
    for env in (None, "dev"):  # a base edit reaches every env's module
        env_args = ["--env", env] if env else []
        proc = cli_in_process("render", "deployments/qwen32b.toml", *env_args, "--check", cwd=project)
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr.startswith("error: deployments/qwen32b") and "differs from a fresh render" in proc.stderr
        assert "hint: liftdeploy render deployments/qwen32b.toml" in proc.stderr
    # --check writes nothing
    after = {p.name: p.read_bytes() for p in (project / "deployments").iterdir() if p.name != "qwen32b.toml"}
    assert after == {k: v for k, v in before.items() if k != "qwen32b.toml"}
    # re-rendering makes it pass again
    assert cli_in_process("render", "deployments/qwen32b.toml", cwd=project).returncode == 0
    assert cli_in_process("render", "deployments/qwen32b.toml", "--check", cwd=project).returncode == 0


def test_check_fails_when_the_module_is_missing_or_hand_edited(project: Path) -> None:
    module = project / "deployments" / "qwen3_8b.py"
    module.write_text(module.read_text().replace("max_containers=4", "max_containers=40"))
    assert cli_in_process("render", "deployments/qwen3-8b.toml", "--check", cwd=project).returncode == 1
    module.unlink()
    proc = cli_in_process("render", "deployments/qwen3-8b.toml", "--check", cwd=project)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert not module.exists()


def test_check_on_an_invalid_manifest_exits_2(project: Path) -> None:
    manifest = project / "deployments" / "qwen3-8b.toml"
    manifest.write_text(manifest.read_text().replace('gpu = ["L40S"', 'gpu = ["L40"'))
    proc = cli_in_process("render", "deployments/qwen3-8b.toml", "--check", cwd=project)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: deployments/qwen3-8b.toml:") and "did you mean `L40S`?" in proc.stderr


def test_out_dir_writes_there_and_only_there(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "nested"
    before = sorted(p.name for p in (project / "deployments").iterdir())
    proc = cli_in_process("render", "deployments/qwen3-8b.toml", "--env", "prod", "-o", out, cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["qwen3_8b_prod.py"]
    assert (out / "qwen3_8b_prod.py").read_bytes() == (DEPLOYMENTS / "qwen3_8b_prod.py").read_bytes()
    assert sorted(p.name for p in (project / "deployments").iterdir()) == before
    assert proc.stdout.strip().endswith(f"-> {out / 'qwen3_8b_prod.py'}")
    # --check against the same directory
    checked = cli_in_process("render", "deployments/qwen3-8b.toml", "-e", "prod", "-o", out, "--check", cwd=project)
    assert checked.returncode == 0


def test_default_output_sits_beside_the_manifest_and_leaves_no_temp_files(project: Path) -> None:
    deployments = project / "deployments"
    for module in deployments.glob("*.py"):
        module.unlink()
    for name, env in EXAMPLES:
        proc = cli_in_process("render", f"deployments/{name}", *(["--env", env] if env else []), cwd=project)
        assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(deployments))
    assert names == sorted(p.name for p in DEPLOYMENTS.iterdir() if p.suffix in (".toml", ".py"))
    for name in names:
        assert (deployments / name).read_bytes() == (DEPLOYMENTS / name).read_bytes()


def test_stdout_writes_no_file(project: Path) -> None:
    module = project / "deployments" / "qwen32b.py"
    module.unlink()
    proc = cli_in_process("render", "deployments/qwen32b.toml", "--stdout", cwd=project)
    assert proc.returncode == 0
    assert proc.stdout == (DEPLOYMENTS / "qwen32b.py").read_text()
    assert not module.exists()


def test_write_atomic_replaces_whole_files_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "module.py"
    rendering.write_atomic(target, "first\n")
    rendering.write_atomic(target, "second\n")
    assert target.read_text() == "second\n"
    with pytest.raises(UnicodeEncodeError):
        rendering.write_atomic(target, "half written \udcff")  # fails while writing the temp file
    assert target.read_text() == "second\n"  # the old file is intact
    assert os.listdir(target.parent) == ["module.py"]  # and no temp file is left behind
    assert target.read_bytes().count(b"\r") == 0


@pytest.mark.parametrize("whitespace", ["compact", "spaced", "any"])
@pytest.mark.parametrize("name", ["qwen32b.toml", "qwen3-8b.toml"], ids=["guided_decoding", "structured_outputs"])
def test_whitespace_renders_the_engine_flag_and_the_layout(tmp_path: Path, name: str, whitespace: str) -> None:
    """`spaced` is compact for the engine (what no schema lays out stays compact) plus llguidance's
    layout options for every schema; the layout is json.dumps's default separators."""
    text = (DEPLOYMENTS / name).read_text()
    setting = f'[decoding]\nwhitespace = "{whitespace}"\n'
    path = tmp_path / name
    path.write_text(text.replace("[decoding]\n", setting) if "[decoding]\n" in text else text + "\n" + setting)
    values = _assignments(ast.parse(rendering.render(load(path))))
    engine = ast.literal_eval(values["ENGINE_ARGS"])
    flag = engine.get("guided_decoding_disable_any_whitespace",
                      engine.get("structured_outputs_config", {}).get("disable_any_whitespace", False))
    assert flag is (whitespace != "any") and ast.literal_eval(values["COMPACT_JSON"]) is flag
    layout = ast.literal_eval(values["JSON_LAYOUT"])
    if whitespace == "spaced":
        assert layout == {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        assert json.dumps({"a": [1, 2]}) == '{"a"' + layout["key_separator"] + "[1" + layout["item_separator"] + "2]}"
    else:
        assert layout is None
