"""The `liftdeploy` command line: help, what it imports, the schema, exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from liftdeploy.manifest import deep_merge
from tests.helpers_render import DEPLOYMENTS, EXAMPLES, ROOT, base, cli, cli_in_process, dump_toml, py_run

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HEAVY = ("torch", "vllm", "transformers", "xgrammar")


# ## --help


@pytest.mark.parametrize(("args", "expected"), [
    ([], ["validate", "render", "schema"]),
    (["validate"], ["files", "--env"]),
    (["render"], ["file", "--env", "--out", "-o", "--check", "--stdout"]),
    (["schema"], ["--out"]),
])
def test_help(args: list[str], expected: list[str]) -> None:
    proc = cli_in_process(*args, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ")
    for word in expected:
        assert word in proc.stdout, word


def test_help_in_a_real_process() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    assert "Declarative deployments" in proc.stdout and proc.stderr == ""


# ## What the light commands import

# Runs each command as `python -m liftdeploy.cli` would (runpy, `__main__`), one process
# per command, and reports its exit code and which heavy packages ended up in sys.modules.
# torch and transformers are installed in the dev venv, so this is not vacuous.
IMPORTS = """
import json, runpy, sys
args, watched = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
sys.argv = ["liftdeploy", *args]
code = 0
try:
    runpy.run_module("liftdeploy.cli", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code or 0
heavy = sorted({name.split(".")[0] for name in sys.modules} & watched)
print("\\n" + json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.mark.parametrize("args", [
    ["--help"],
    ["validate", "--help"],
    ["validate", "deployments/qwen32b.toml", "deployments/qwen3-8b.toml"],
    ["render", "deployments/qwen3-8b.toml", "--env", "prod", "--check"],
    ["render", "deployments/qwen32b.toml", "--stdout"],
    ["schema"],
], ids=lambda a: "-".join(a).replace("deployments/", ""))
def test_light_commands_import_no_gpu_stack(args: list[str]) -> None:
    proc = py_run(IMPORTS, json.dumps(args), json.dumps(HEAVY))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, proc.stderr


def test_the_heavy_packages_are_installed_so_the_check_means_something() -> None:
    """If the CLI imported torch or transformers, the import would succeed and show above."""
    import importlib.util

    installed = [name for name in HEAVY if importlib.util.find_spec(name) is not None]
    if not installed:
        pytest.skip("none of the GPU stack is installed here")
    assert set(installed) <= set(HEAVY)


# ## schema


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    proc = cli_in_process("schema")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_schema_is_valid_json_schema(schema: dict[str, Any]) -> None:
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"app", "model", "compute", "image"}


def _example(name: str) -> dict[str, Any]:
    return tomllib.loads((DEPLOYMENTS / name).read_text())


@pytest.mark.parametrize(("name", "env"), EXAMPLES, ids=[f"{n}@{e}" for n, e in EXAMPLES])
def test_examples_validate_against_the_schema(schema: dict[str, Any], name: str, env: str | None) -> None:
    data = _example(name)
    if env:  # the overlays are partial; the merged manifest is whole
        data = deep_merge({k: v for k, v in data.items() if k != "env"}, data["env"][env])
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in Draft202012Validator(schema).iter_errors(data)]
    assert errors == []


def test_schema_accepts_the_test_base_and_rejects_what_the_loader_rejects(schema: dict[str, Any]) -> None:
    validator = Draft202012Validator(schema)
    assert list(validator.iter_errors(base())) == []
    for path, value in [(("scalling",), {}), (("compute", "gpu"), 5), (("model", "dtype"), "bf16"),
                        (("endpoints",), [{"kind": "chat"}]), (("scaling", "timeout"), "10m"),
                        (("image", "python"), "3.9"), (("app", "nmae"), "x")]:
        data = base()
        node = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        assert not validator.is_valid(data), path


def test_schema_out_writes_the_same_text(tmp_path: Path, schema: dict[str, Any]) -> None:
    out = tmp_path / "sub" / "manifest.schema.json"
    proc = cli_in_process("schema", "-o", out)
    assert proc.returncode == 0 and proc.stdout == f"wrote {out}\n"
    assert json.loads(out.read_text()) == schema
    assert sorted(p.name for p in out.parent.iterdir()) == ["manifest.schema.json"]


# ## validate: several files, exit codes


def test_validate_reports_every_problem_of_every_file(tmp_path: Path) -> None:
    first, second = base(), base()
    first["compute"]["gpu"] = ["A10GG"]
    first["scaling"]["scaledown_window"] = 1
    second["endpoints"][1]["kind"] = "generate"
    paths = []
    for i, data in enumerate((first, second)):
        paths.append(tmp_path / f"m{i}.toml")
        paths[-1].write_text(dump_toml(data)[0])
    missing = tmp_path / "missing.toml"
    good = DEPLOYMENTS / "qwen32b.toml"
    proc = cli("validate", paths[0], good, paths[1], missing)
    assert proc.returncode == 2
    assert proc.stdout == f"ok: {good} (base, dev)\n"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, proc.stderr
    assert errors[0].startswith(f"error: {paths[0]}:") and "`compute.gpu[0]`" in errors[0]
    assert errors[1].startswith(f"error: {paths[0]}:") and "`scaling.scaledown_window`" in errors[1]
    assert errors[2].startswith(f"error: {paths[1]}:") and "`endpoints[2].label`" in errors[2]
    assert errors[3] == f"error: {missing}: no such file"
    assert all(line.startswith(("error: ", "hint: ")) for line in proc.stderr.splitlines())
    assert "Traceback" not in proc.stderr


def test_validate_checks_every_env_overlay_without_env(tmp_path: Path) -> None:
    data = base()
    data["env"]["prod"] = {"scaling": {"min_containers": 9}}  # above max_containers = 4
    path = tmp_path / "m.toml"
    path.write_text(dump_toml(data)[0])
    proc = cli_in_process("validate", path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {path} [env prod]:") and "`scaling.min_containers`" in proc.stderr
    assert cli_in_process("validate", path, "--env", "dev").returncode == 0


@pytest.mark.parametrize(("args", "code"), [
    (["validate", "deployments/qwen32b.toml"], 0),
    (["validate", "deployments/qwen32b.toml", "deployments/qwen3-8b.toml", "--env", "prod"], 2),  # no prod in qwen32b
    (["validate", "deployments/qwen3-8b.toml", "--env", "prod"], 0),
    (["validate", "deployments/nope.toml"], 2),
    (["validate"], 2),  # usage error
    (["validate", "--bogus", "x"], 2),
    (["render", "deployments/qwen32b.toml", "--check"], 0),
    (["render", "deployments/nope.toml", "--check"], 2),
    (["render", "deployments/qwen32b.toml", "--env", "prod", "--stdout"], 2),
    (["schema"], 0),
    (["bogus"], 2),
])
def test_exit_codes(args: list[str], code: int) -> None:
    proc = cli_in_process(*args)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_ok_lines_name_the_envs() -> None:
    proc = cli_in_process("validate", "deployments/qwen3-8b.toml", "deployments/qwen32b.toml")
    assert proc.stdout.splitlines() == ["ok: deployments/qwen3-8b.toml (base, prod)",
                                        "ok: deployments/qwen32b.toml (base, dev)"]
    proc = cli_in_process("validate", "deployments/qwen32b.toml", "-e", "dev")
    assert proc.stdout == "ok: deployments/qwen32b.toml (dev)\n"


def test_render_check_drift_in_a_real_process(tmp_path: Path) -> None:
    """Exit 1 for drift, from a real process (the documented CI use)."""
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "deployments").mkdir()
    manifest = tmp_path / "deployments" / "qwen3-8b.toml"
    manifest.write_text((DEPLOYMENTS / "qwen3-8b.toml").read_text().replace("max_inputs = 32", "max_inputs = 31"))
    (tmp_path / "deployments" / "qwen3_8b.py").write_bytes((DEPLOYMENTS / "qwen3_8b.py").read_bytes())
    proc = cli("render", "deployments/qwen3-8b.toml", "--check", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: deployments/qwen3_8b.py differs from a fresh render of deployments/qwen3-8b.toml",
        "hint: liftdeploy render deployments/qwen3-8b.toml",
    ]


def test_unwritable_output_is_an_error_not_a_bug(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args in (["render", "deployments/qwen32b.toml", "-o", blocker], ["schema", "-o", blocker / "s.json"]):
        proc = cli_in_process(*args)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("error: write failed: cannot create the directory")
        assert "internal error" not in proc.stderr and "hint: " in proc.stderr
    (tmp_path / "out" / "qwen32b.py").mkdir(parents=True)  # the module's path is a directory
    proc = cli_in_process("render", "deployments/qwen32b.toml", "-o", tmp_path / "out")
    assert proc.returncode == 1 and "cannot write" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["qwen32b.py"]  # no temp file left


def test_internal_errors_are_one_line_with_debug_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception liftdeploy does not anticipate prints one error line and exits 70;
    LIFTDEPLOY_DEBUG=1 lets the traceback through. (The CLI's own commands are meant never to
    get here, so this wraps a command that really fails in the CLI's own decorator.)"""
    import typer
    from typer.testing import CliRunner

    from liftdeploy.cli import reports_errors

    broken = typer.Typer()

    @broken.command()
    @reports_errors
    def divide(n: int) -> None:
        print(1 / n)

    @broken.command()
    def other() -> None: ...

    result = CliRunner().invoke(broken, ["divide", "0"])
    assert result.exit_code == 70
    assert result.stderr.splitlines() == [
        "error: internal error: ZeroDivisionError: division by zero",
        "hint: this is a liftdeploy bug; rerun with LIFTDEPLOY_DEBUG=1 and report the traceback",
    ]
    monkeypatch.setenv("LIFTDEPLOY_DEBUG", "1")
    result = CliRunner().invoke(broken, ["divide", "0"])
    assert isinstance(result.exception, ZeroDivisionError)


def test_deeply_nested_toml_is_invalid_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    proc = cli_in_process("validate", path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {path}: invalid TOML: arrays or tables nested too deeply")


def test_module_runs_as_script_with_same_root() -> None:
    """Sanity: the tests run this checkout's liftdeploy, not another worktree's."""
    proc = py_run("import liftdeploy, sys; print(liftdeploy.__file__)")
    assert Path(proc.stdout.strip()).resolve().is_relative_to(ROOT), proc.stdout
    import liftdeploy

    assert Path(liftdeploy.__file__).resolve().is_relative_to(ROOT)
    assert sys.executable
