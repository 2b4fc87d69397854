"""`liftdeploy check`: the PR check, run as a user runs it, on real pin combinations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from liftdeploy.checks import check

ROOT = Path(__file__).resolve().parent.parent
BASE = (ROOT / "deployments" / "qwen32b.toml").read_text()


def run_check(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "liftdeploy.cli", "check", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def manifest(tmp_path: Path, *edits: tuple[str, str], name: str = "m.toml") -> Path:
    text = BASE
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def codes(path: Path) -> dict[str, str]:
    report = check([path])
    return {f.code: f.severity for f in report.findings + report.invalid}


def test_examples_are_clean():
    result = run_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 error(s), 0 warning(s)" in result.stdout


PINS = 'pins = { vllm = "0.9.2", transformers = "4.53.0", xgrammar = "0.1.19" }'


@pytest.mark.parametrize(
    ("pins", "python", "expected"),
    [
        ('vllm = "0.9.2", transformers = "4.53.0", xgrammar = "0.1.19"', "3.12", None),
        ('vllm = "0.9.2", transformers = "4.57.0", xgrammar = "0.1.19"', "3.12", "vllm-transformers-aimv2"),
        ('vllm = "0.9.2", transformers = "4.46.0", xgrammar = "0.1.19"', "3.12", "transformers-out-of-range"),
        ('vllm = "0.12.0", transformers = "5.0.0"', "3.12", "transformers-out-of-range"),
        ('vllm = "0.33.0"', "3.10", "python-unsupported"),
        ('vllm = "0.9.2", transformers = "4.53.0", xgrammar = "0.1.25"', "3.12", "xgrammar-out-of-range"),
    ],
    ids=["0.9.2-ok", "aimv2", "too-old", "transformers-5", "py310", "xgrammar-pin"],
)
def test_pin_combinations(tmp_path, pins, python, expected):
    path = manifest(tmp_path, (PINS, f"pins = {{ {pins} }}"), ('python = "3.12"', f'python = "{python}"'))
    found = codes(path)
    if expected is None:
        assert not [c for c, sev in found.items() if sev == "error"], found
    else:
        assert found.get(expected) == "error", found
        result = run_check(str(path))
        assert result.returncode == 1
        assert f"error[{expected}]" in result.stdout and "hint: " in result.stdout


def test_old_vllm_without_xgrammar(tmp_path):
    path = manifest(tmp_path, (PINS, 'pins = { vllm = "0.6.4" }'))
    assert codes(path)["xgrammar-unavailable"] == "error"


def test_32b_does_not_fit_a10g(tmp_path):
    path = manifest(tmp_path, ('gpu = ["A100-80GB", "H100"]', 'gpu = ["A10G"]'))
    result = run_check(str(path))
    assert result.returncode == 1
    assert "error[gpu-memory]" in result.stdout and "`A10G` offers 22 GiB" in result.stdout


def test_fp8_on_a100_warns(tmp_path):
    path = manifest(tmp_path, ('dtype = "bfloat16"', 'dtype = "bfloat16"\nquantization = "fp8"'))
    assert codes(path)["fp8-emulated"] == "warning"


def test_unpinned_revision_and_public_endpoint_warn(tmp_path):
    path = manifest(tmp_path, ('revision = "b47205940b83b5b484577359f71ee7b88472df67"\n', ""),
                    ('kind = "generate"', 'kind = "generate"\nauth = "none"'))
    found = codes(path)
    assert found["unpinned-revision"] == "warning" and found["public-endpoint"] == "warning"
    assert run_check(str(path)).returncode == 0
    assert run_check("--strict", str(path)).returncode == 1


def test_secret_value_in_manifest(tmp_path):
    token = "hf_" + "a1B2c3D4e5" * 4
    path = manifest(tmp_path, ('TOKENIZERS_PARALLELISM = "false"',
                               f'TOKENIZERS_PARALLELISM = "false", HF_TOKEN = "{token}"'))
    result = run_check(str(path))
    assert result.returncode == 1
    assert "error[secret-value]" in result.stdout and token not in result.stdout


def test_short_startup_timeout_warns(tmp_path):
    path = manifest(tmp_path, ("startup_timeout = 900", "startup_timeout = 120"))
    assert codes(path)["startup-timeout"] == "warning"


def test_drift_of_committed_render(tmp_path):
    path = manifest(tmp_path, name="app.toml")
    subprocess.run([sys.executable, "-m", "liftdeploy.cli", "render", str(path)], check=True, capture_output=True)
    assert "render-drift" not in codes(path)
    path.write_text(path.read_text().replace("scaledown_window = 300", "scaledown_window = 200"))
    assert codes(path)["render-drift"] == "error"


def test_formats_and_exit_codes(tmp_path):
    path = manifest(tmp_path, ('transformers = "4.53.0"', 'transformers = "4.57.0"'))
    as_json = json.loads(run_check("--format", "json", str(path)).stdout)
    assert {f["code"] for f in as_json["findings"]} >= {"vllm-transformers-aimv2"}
    github = run_check("--format", "github", str(path)).stdout.splitlines()
    assert any(line.startswith(f"::error file={path},line=") and "vllm-transformers-aimv2" in line for line in github)
    broken = tmp_path / "broken.toml"
    broken.write_text("[app\n")
    assert run_check(str(broken)).returncode == 2
    assert run_check(str(tmp_path / "missing.toml")).returncode == 2
    assert run_check("--format", "xml", str(path)).returncode == 2


def test_schema_file_is_current():
    from liftdeploy.manifest import json_schema

    assert json.loads((ROOT / "manifest.schema.json").read_text()) == json_schema()


def test_a_finding_the_env_shares_with_the_base_is_kept_on_both_and_shown_once(tmp_path):
    path = manifest(tmp_path, ('transformers = "4.53.0"', 'transformers = "4.57.0"'))
    report = check([path])
    shared = [(f.env, f.path) for f in report.findings if f.code == "vllm-transformers-aimv2"]
    assert shared == [(None, "image.pins.transformers"), ("dev", "image.pins.transformers")]  # apply --env dev sees it
    shown = [f for f in report.shown() if f.code == "vllm-transformers-aimv2"]
    assert [f.env for f in shown] == [None]
    as_json = json.loads(run_check("--format", "json", str(path)).stdout)
    assert [f["env"] for f in as_json["findings"] if f["code"] == "vllm-transformers-aimv2"] == [None]
    assert run_check(str(path)).stdout.count("error[vllm-transformers-aimv2]") == 1


def test_one_definition_of_a_token():
    """The raw-text scan of `check` finds what the Secret-name rule rejects, and the reverse."""
    from liftdeploy._tokens import is_token
    from liftdeploy.checks import secret_values

    def scanned(value: str) -> bool:
        return any(d.code == "secret-value" for d in secret_values(Path("m.toml"), f'note = "{value}"'))

    for token in ("hf_" + "a1B2c3D4e5" * 2, "sk-" + "x" * 16, "ghp_" + "A" * 20, "github_pat_" + "B" * 22,
                  "ak-" + "c" * 16, "AKIA" + "D" * 16, "xoxb-" + "e" * 10):
        assert is_token(token) and scanned(token), token
    for name in ("huggingface", "lift-sys-api-token", "hf_short", "sk-abc"):
        assert not is_token(name) and not scanned(name), name



@pytest.mark.parametrize(
    ("decoding", "pins", "expected"),
    [
        ('whitespace = "spaced"', PINS, None),  # vLLM 0.9.2, guidance by default
        ('whitespace = "spaced"\nbackend = "xgrammar"', PINS, "whitespace-layout-unavailable"),
        ('whitespace = "spaced"', 'pins = { vllm = "0.8.5" }', "whitespace-layout-unavailable"),  # xgrammar only
    ],
    ids=["guidance-0.9.2", "xgrammar", "before-0.9"],
)
def test_spaced_layout_needs_the_guidance_backend(tmp_path, decoding, pins, expected):
    path = manifest(tmp_path, ("[decoding]\n", f"[decoding]\n{decoding}\n"), (PINS, pins))
    found = codes(path)
    if expected is None:
        assert not [c for c, sev in found.items() if sev == "error"], found
        return
    assert found.get(expected) == "error", found
    out = run_check(str(path)).stdout
    assert f"error[{expected}]" in out and "the `spaced` layout reaches only llguidance" in out
    assert 'hint: set `backend = "guidance"` (vLLM 0.9 or later), or `whitespace = "compact"`' in out
