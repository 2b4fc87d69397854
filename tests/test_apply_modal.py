"""What `plan` and `apply` promise about Modal, held against the real `modal` client and the
control-plane double: the environment exists (or what to run), URLs carry the environment's web
suffix, a Secret without its required key fails the deploy, autoscaler-only changes are applied
in place, and the plan's money, time and change marks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from liftdeploy.manifest import load
from liftdeploy.plan import describe
from liftdeploy.state import State, settings
from tests.support.modal_control_plane import ModalControlPlane
from tests.test_apply import DEPLOYMENTS, LOOKUPS, SECRETS, edit, liftdeploy, output, state_file


@pytest.fixture
def workspace():
    """A workspace with two environments: `main` (no web suffix) and `dev` (web suffix `dev-web`)."""
    with ModalControlPlane(workspace="acme", environments={"main": "", "dev": "dev-web"}) as cp:
        for environment in ("main", "dev"):
            for name, values in SECRETS.items():
                cp.add_secret(name, values, environment=environment)
        yield cp
        assert cp.errors == [], f"the double itself crashed: {cp.errors}"


def copy(folder: Path, name: str) -> Path:
    shutil.copy(DEPLOYMENTS / name, folder / name)
    return folder / name


# ## Environments


def test_apply_into_a_missing_environment_says_what_to_run(workspace, tmp_path):
    manifest = copy(tmp_path, "qwen3-8b.toml")  # its prod overlay deploys into Modal environment `prod`
    start = len(workspace.requests)
    result = liftdeploy(workspace, "apply", manifest.name, "--env", "prod", "--yes", "--no-verify", cwd=tmp_path)
    assert result.returncode == 1, output(result)
    assert result.stderr.splitlines() == [
        "error: environment failed: Modal environment `prod` does not exist in workspace `acme`; nothing was deployed",
        "hint: run `modal environment create prod` (or set `app.environment`), then re-run apply",
    ]
    assert set(workspace.method_names()[start:]) <= LOOKUPS  # asked, created nothing
    assert not (tmp_path / ".liftdeploy").exists()


def test_plan_tells_whether_the_environment_exists(workspace, tmp_path):
    manifest = copy(tmp_path, "qwen3-8b.toml")
    missing = liftdeploy(workspace, "plan", manifest.name, "--env", "prod", cwd=tmp_path)
    assert missing.returncode == 0, output(missing)
    assert ("app          qwen3-structured in Modal environment `prod`: does not exist in workspace `acme`: "
            "create it with `modal environment create prod`, or set `app.environment`") in missing.stdout
    there = liftdeploy(workspace, "plan", manifest.name, cwd=tmp_path)
    assert "environment `main`: exists in workspace `acme` (no web suffix)" in there.stdout
    offline = liftdeploy(None, "plan", manifest.name, cwd=tmp_path)
    assert "not checked (no Modal credentials: run `modal token new`)" in offline.stdout


def test_urls_carry_the_environments_web_suffix(workspace, tmp_path):
    manifest = copy(tmp_path, "qwen32b.toml")  # its dev overlay deploys into `dev`, web suffix `dev-web`
    plan = liftdeploy(workspace, "plan", manifest.name, "--env", "dev", cwd=tmp_path)
    assert "(web suffix from Modal)" in plan.stdout, output(plan)
    # app.workspace is "rand" in the manifest: it wins over the workspace Modal names
    assert "https://rand-dev-web--lift-sys-inference-dev-generate.modal.run" in plan.stdout
    applied = liftdeploy(workspace, "apply", manifest.name, "--env", "dev", "--yes", "--no-verify", cwd=tmp_path)
    assert applied.returncode == 0, output(applied)
    state = json.loads(state_file(tmp_path, "qwen32b_dev").read_text())
    # what Modal answered, for the workspace of the credentials
    assert state["urls"]["lift-sys-inference-dev-generate"] == (
        "https://acme-dev-web--lift-sys-inference-dev-generate.modal.run")
    offline = liftdeploy(None, "plan", manifest.name, "--env", "dev", cwd=tmp_path)
    assert "https://rand-dev--lift-sys-inference-dev-generate.modal.run" in offline.stdout
    assert "web suffix assumed: `dev` (set `app.web_suffix`)" in offline.stdout


# ## Secrets


def test_a_secret_without_its_required_key_fails_the_deploy(tmp_path):
    with ModalControlPlane() as cp:
        cp.add_secret("huggingface", {"HF_TOKEN": "hf_dummy"})
        cp.add_secret("qwen3-api-token", {"API_TOKEN": "a-key-of-another-name"})  # not LIFTDEPLOY_API_TOKEN
        manifest = copy(tmp_path, "qwen3-8b.toml")
        start = len(cp.requests)
        result = liftdeploy(cp, "apply", manifest.name, "--yes", "--no-verify", cwd=tmp_path)
        assert cp.errors == []
    assert result.returncode == 1, output(result)
    assert result.stderr.startswith("error: deploy failed: "), output(result)
    assert "missing keys: LIFTDEPLOY_API_TOKEN" in result.stderr
    asked = [req for method, req in list(cp.requests)[start:] if method == "SecretGetOrCreate"]
    assert ("qwen3-api-token", ["LIFTDEPLOY_API_TOKEN"]) in [(r.deployment_name, list(r.required_keys)) for r in asked]
    assert "AppPublish" not in cp.method_names()[start:] and not (tmp_path / ".liftdeploy").exists()


# ## In place: the autoscaler without a deploy


def test_an_autoscaler_change_is_applied_in_place(workspace, tmp_path):
    manifest = copy(tmp_path, "qwen32b.toml")
    first = liftdeploy(workspace, "apply", manifest.name, "--yes", "--no-verify", cwd=tmp_path)
    assert first.returncode == 0, output(first)
    deployed = workspace.deployed_app("lift-sys-inference")
    version = deployed.version
    edit(manifest, "scaledown_window = 300", "scaledown_window = 120")

    plan = liftdeploy(workspace, "plan", manifest.name, cwd=tmp_path)
    assert "  ~   scaling.scaledown_window: 300 → 120   (in place)" in plan.stdout.splitlines(), output(plan)
    assert "Every change is in place: `apply` updates Modal's autoscaler without a deploy." in plan.stdout

    start = len(workspace.requests)
    again = liftdeploy(workspace, "apply", manifest.name, "--yes", "--no-verify", cwd=tmp_path)
    assert again.returncode == 0, output(again)
    methods = workspace.method_names()[start:]
    assert "FunctionUpdateSchedulingParams" in methods
    assert not {"AppCreate", "AppPublish", "FunctionCreate", "ImageGetOrCreate"} & set(methods)  # no deploy
    assert re.search(r"^✓ update autoscaler \([\d.]+ s\) .*scaledown_window 120", again.stdout, re.M), output(again)
    class_function = deployed.function_ids["Inference.*"]
    assert workspace.autoscaler_overrides[class_function].scaledown_window == 120
    assert workspace.deployed_app("lift-sys-inference").version == version  # the same deployment
    assert "No changes." in liftdeploy(workspace, "plan", manifest.name, cwd=tmp_path).stdout


def test_a_change_that_needs_containers_is_deployed(workspace, tmp_path):
    manifest = copy(tmp_path, "qwen32b.toml")
    assert liftdeploy(workspace, "apply", manifest.name, "--yes", "--no-verify", cwd=tmp_path).returncode == 0
    edit(manifest, "scaledown_window = 300", "scaledown_window = 120")
    edit(manifest, "max_inputs = 20", "max_inputs = 16")  # the engine's batch: new containers
    start = len(workspace.requests)
    result = liftdeploy(workspace, "apply", manifest.name, "--yes", "--no-verify", cwd=tmp_path)
    assert result.returncode == 0, output(result)
    assert "AppPublish" in workspace.method_names()[start:]
    assert "FunctionUpdateSchedulingParams" not in workspace.method_names()[start:]


# ## The plan: money, time, what each change does


def planned(tmp_path: Path, name: str, *edits: tuple[str, str], env: str | None = None,
            applied: dict | None = None) -> str:
    manifest = copy(tmp_path, name)
    for old, new in edits:
        edit(manifest, old, new)
    loaded = load(manifest, env)
    state = None
    if applied is not None:
        state = State(str(manifest), env, "0" * 64, loaded.manifest.app.name, loaded.manifest.app.environment,
                      "manifest-old", "ap-old", {}, applied)
    return describe(loaded, state)


def test_plan_prices_every_gpu_of_the_chain_with_the_region_multiplier(tmp_path):
    chain = 'gpu = ["A100-80GB", "H100"]'
    text = planned(tmp_path, "qwen32b.toml", (chain, chain + '\nregion = "us-east"'))
    # https://modal.com/docs/guide/region-selection#pricing: a narrow region costs 1.75x
    assert "  gpu          A100-80GB ($4.38/h), H100 ($6.91/h)  — tried in this order" in text
    assert "  cost         $4.38–$6.91/h per busy container, by GPU of the chain, ×1.75 for region us-east" in text
    broad = planned(tmp_path, "qwen32b.toml", (chain, chain + '\nregion = "us"'))  # a broad one, 1.5x
    assert "$3.75–$5.93/h per busy container, by GPU of the chain, ×1.5 for region us" in broad


def test_plan_prices_business_hours(tmp_path):
    text = planned(tmp_path, "qwen3-8b.toml")
    # one container 10 h a day, 5 days: 50 h on the cheapest ($0.80) to the dearest ($2.50) GPU of the chain
    assert "business hours +$40–$125 a week (1 warm 08:00–18:00 Europe/Berlin, days 1-5)" in text


def test_plan_counts_the_cold_start_parts(tmp_path):
    text = planned(tmp_path, "qwen32b.toml")
    line = next(line for line in text.splitlines() if line.startswith("  cold start"))
    assert "torch.compile (cached) 30 s" in line and "CUDA graphs (6 sizes)" in line and "download" in line
    assert "  batching     vLLM max_num_seqs 20; CUDA graphs for 6 batch sizes (1–20)" in text
    uncached = planned(tmp_path, "qwen32b.toml", ("compile_cache = true", "compile_cache = false"))
    assert "torch.compile 156 s" in next(line for line in uncached.splitlines() if line.startswith("  cold start"))
    snap = planned(tmp_path, "qwen3-8b.toml")
    line = next(line for line in snap.splitlines() if line.startswith("  cold start"))
    typical, first = line.split("; first start ")
    assert "restore snapshot" in typical and "wake" in typical and "torch.compile" not in typical
    assert "snapshot" in first and "CUDA graphs (7 sizes)" in first


def test_plan_marks_each_change_as_a_cold_start_or_in_place(tmp_path):
    before = settings(load(copy(tmp_path, "qwen32b.toml")))
    text = planned(tmp_path, "qwen32b.toml", ('vllm = "0.9.2"', 'vllm = "0.11.0"'),
                   ("scaledown_window = 300", "scaledown_window = 120"),
                   ("max_model_len = 8192", "max_model_len = 4096"), applied=before)
    changes = [line for line in text.splitlines() if line.startswith(("  -/+", "  ~  "))]
    assert changes == [
        "  -/+ image.vllm: 0.9.2 → 0.11.0   (new image → cold start)",
        "  -/+ model.max_model_len: 8192 → 4096   (new containers → cold start)",
        "  ~   scaling.scaledown_window: 300 → 120   (in place)",
    ]
    assert text.endswith("Plan: 0 to add, 3 to change (2 with a cold start, 1 in place), 0 to remove.")


def test_every_deployed_setting_counts_so_nothing_hides_behind_in_place(tmp_path):
    """An autoscaler change beside any change that reaches the module is no longer in place."""
    before = settings(load(copy(tmp_path, "qwen32b.toml")))
    text = planned(tmp_path, "qwen32b.toml", ("scaledown_window = 300", "scaledown_window = 120"),
                   ("max_tokens = 2048", "max_tokens = 1024"),
                   ('TOKENIZERS_PARALLELISM = "false"', 'TOKENIZERS_PARALLELISM = "true"'), applied=before)
    assert "  -/+ decoding.max_tokens: 2048 → 1024   (new containers → cold start)" in text.splitlines()
    assert "  -/+ image.env.TOKENIZERS_PARALLELISM: false → true   (new image → cold start)" in text.splitlines()
    assert "Every change is in place" not in text
