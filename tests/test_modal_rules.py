"""What `check` knows of Modal's and vLLM's rules: labels per Modal environment, host length,
what snapshots and reasoning models need, business hours; and the manifest defaults that
follow Modal (labels `<app>-<kind>`, `any` as a few cheap GPUs, a compile cache only on a volume)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from liftdeploy import catalog, urls
from liftdeploy.checks import check
from liftdeploy.manifest import load
from tests.helpers_render import DEPLOYMENTS, base, dump_toml


def write(folder: Path, name: str, data: dict[str, Any]) -> Path:
    path = folder / name
    path.write_text(dump_toml(data)[0])
    return path


def codes(report, code: str) -> list[tuple[str, str | None, str]]:
    return [(Path(f.file).name, f.env, f.path) for f in report.findings if f.code == code]


# ## Labels: one URL per label in each Modal environment


def test_the_examples_default_labels_do_not_collide() -> None:
    """Both examples claim health/warmup/generate in `main`: their default labels name their app."""
    a = load(DEPLOYMENTS / "qwen32b.toml").manifest
    b = load(DEPLOYMENTS / "qwen3-8b.toml").manifest
    assert a.app.environment == b.app.environment == "main"
    assert {ep.kind.value for ep in a.endpoints} & {ep.kind.value for ep in b.endpoints} >= {"health", "generate"}
    assert not {ep.label for ep in a.endpoints} & {ep.label for ep in b.endpoints}
    assert [ep.label for ep in a.endpoints] == ["lift-sys-inference-health", "lift-sys-inference-generate",
                                                "lift-sys-inference-warmup"]
    assert not codes(check([DEPLOYMENTS], drift_check=False), "label-collision")


def test_check_finds_a_label_claimed_by_two_apps_in_one_environment(tmp_path: Path) -> None:
    one, two = base(), base()
    two["app"]["name"] = "other-app"
    for data in (one, two):
        data["endpoints"][2]["label"] = "generate"  # the same explicit label in both
        data["env"] = {}
    write(tmp_path, "one.toml", one)
    write(tmp_path, "two.toml", two)
    report = check([tmp_path], drift_check=False)
    found = codes(report, "label-collision")
    assert found == [("one.toml", None, "endpoints[2].label"), ("two.toml", None, "endpoints[2].label")]
    (first,) = [f for f in report.findings if f.code == "label-collision" and f.file.endswith("one.toml")]
    assert first.severity == "error" and "`other-app`" in first.message and "environment `main`" in first.message
    assert report.exit_code() == 1


def test_the_same_label_in_two_environments_is_two_urls(tmp_path: Path) -> None:
    one, two = base(), base()
    two["app"].update(name="other-app", environment="staging")
    for data in (one, two):
        data["endpoints"][2]["label"] = "generate"
        data["env"] = {}
    write(tmp_path, "one.toml", one)
    write(tmp_path, "two.toml", two)
    assert not codes(check([tmp_path], drift_check=False), "label-collision")


def test_an_env_overlay_collides_with_another_manifests_base(tmp_path: Path) -> None:
    one, two = base(), base()
    two["app"].update(name="other-app", environment="dev")
    one["env"] = {"dev": {"app": {"environment": "dev", "name": "test-app-dev"}}}
    for data in (one, two):
        data["endpoints"][2]["label"] = "generate"
    two["env"] = {}
    write(tmp_path, "one.toml", one)
    write(tmp_path, "two.toml", two)
    assert codes(check([tmp_path], drift_check=False), "label-collision") == [
        ("one.toml", "dev", "endpoints[2].label"), ("two.toml", None, "endpoints[2].label")]


def test_a_host_over_63_characters_is_an_error(tmp_path: Path) -> None:
    data = base()
    data["app"].update(workspace="a-rather-long-workspace-name", environment="staging", web_suffix="staging")
    data["env"] = {}
    data["endpoints"][2]["label"] = "the-endpoint-that-generates-json"
    host = "a-rather-long-workspace-name-staging--the-endpoint-that-generates-json"
    assert len(host) > urls.MAX_HOST_CHARS
    report = check([write(tmp_path, "long.toml", data)], drift_check=False)
    (finding,) = [f for f in report.findings if f.code == "host-too-long"]
    assert (finding.severity, finding.path) == ("error", "endpoints[2].label")
    assert host in finding.message and "at most 25 characters" in finding.hint  # 63 - 36 - len("--")


def test_url_prediction_follows_modals_rules() -> None:
    # https://modal.com/docs/guide/webhook-urls: <workspace>[-<web suffix>]--<label>.modal.run
    assert urls.url("ECorp", "prod", "speechify") == "https://ecorp-prod--speechify.modal.run"
    assert urls.url("rand", "", "lift-sys-inference-generate") == "https://rand--lift-sys-inference-generate.modal.run"
    assert urls.assumed_web_suffix("main") == "" and urls.assumed_web_suffix("Dev_Env") == "dev-env"
    m = load(DEPLOYMENTS / "qwen32b.toml", "dev").manifest
    assert m.app.assumed_web_suffix == "dev"


# ## Snapshots


def snapshot_manifest(**changes: Any) -> dict[str, Any]:
    data = base()
    data["image"]["pins"]["vllm"] = "0.11.0"
    data["compute"]["memory"] = 32768
    data["cold_start"]["snapshot"] = True
    data["env"] = {}
    for key, value in changes.items():
        section, field = key.split("__")
        data[section][field] = value
    return data


@pytest.mark.parametrize(("changes", "code", "path"), [
    ({"image__pins": {"vllm": "0.6.5"}}, "snapshot-needs-sleep-mode", "cold_start.snapshot"),
    ({"model__tensor_parallel_size": 2, "compute__gpu": ["H100:2"]}, "snapshot-multi-gpu", "cold_start.snapshot"),
    ({"compute__memory": 4096}, "snapshot-memory", "compute.memory"),
])
def test_check_enforces_what_snapshots_need(tmp_path: Path, changes: dict[str, Any], code: str, path: str) -> None:
    assert not [f for f in check([write(tmp_path, "ok.toml", snapshot_manifest())], drift_check=False).findings
                if f.code.startswith("snapshot")]
    report = check([write(tmp_path, "snap.toml", snapshot_manifest(**changes))], drift_check=False)
    assert [(f.code, f.path) for f in report.findings if f.code.startswith("snapshot")] == [(code, path)]


# ## Reasoning models


@pytest.mark.parametrize(("model", "code"), [
    ({"id": "acme/thinker-9b", "params_b": 9.0, "thinking": True}, "thinking-without-parser"),
    ({"id": "Qwen/Qwen3-4B-Thinking-2507", "thinking": False}, "thinking-cannot-be-off"),
    ({"id": "Qwen/Qwen3-8B", "reasoning_parser": "qwen3"}, "parser-unused"),
    ({"id": "Qwen/Qwen3-8B", "thinking": True, "__vllm": "0.6.5"}, "reasoning-unsupported"),
])
def test_check_knows_what_reasoning_models_need(tmp_path: Path, model: dict[str, Any], code: str) -> None:
    data = base()
    vllm = model.pop("__vllm", None)
    if vllm:
        data["image"]["pins"]["vllm"] = vllm
    data["model"].update(model)
    data["env"] = {}
    report = check([write(tmp_path, "m.toml", data)], drift_check=False)
    reasoning = {"thinking-without-parser", "thinking-cannot-be-off", "parser-unused", "reasoning-unsupported"}
    assert [f.code for f in report.findings if f.code in reasoning] == [code]


def test_a_hybrid_thinking_model_is_fine_either_way(tmp_path: Path) -> None:
    for thinking in (False, True):
        data = base()
        data["model"]["thinking"] = thinking  # Qwen3-8B: the catalogue knows its parser
        data["env"] = {}
        report = check([write(tmp_path, f"m{thinking}.toml", data)], drift_check=False)
        assert not [f for f in report.findings if "think" in f.code or "reason" in f.code or "parser" in f.code]
    assert load(write(tmp_path, "t.toml", data)).manifest.model.parser == "qwen3"


# ## Business hours


def test_business_hours_that_keep_nothing_extra_warm_are_flagged(tmp_path: Path) -> None:
    data = base()
    data["scaling"].update(min_containers=2, business_hours={"start": "08:00", "end": "18:00", "timezone": "UTC",
                                                             "min_containers": 2})
    data["env"] = {}
    report = check([write(tmp_path, "h.toml", data)], drift_check=False)
    assert codes(report, "business-hours-idle") == [("h.toml", None, "scaling.business_hours.min_containers")]


# ## Sane defaults


def test_any_adds_the_cheapest_few_gpus_that_fit() -> None:
    m = load(DEPLOYMENTS / "qwen3-8b.toml").manifest  # ["L40S", "A100-80GB", "any"], an 8B model
    added = m.gpus[2:]
    assert len(added) == catalog.ANY_GPU_WIDTH
    assert [g.type for g in added] == ["L4", "A10G", "A100-40GB"]  # cheapest first, all fit
    assert not {"H100", "H200", "B200", "RTX-PRO-6000"} & {g.type for g in m.gpus}


def test_a_minimal_manifest_without_volumes_is_valid(tmp_path: Path) -> None:
    data = {"app": {"name": "tiny"}, "model": {"id": "Qwen/Qwen3-8B"}, "compute": {"gpu": ["L4"]},
            "image": {"pins": {"vllm": "0.11.0"}}}
    path = tmp_path / "tiny.toml"
    path.write_text(dump_toml(data)[0])
    m = load(path).manifest
    assert m.compile_cached is False and m.volumes.compile_cache is None
    from liftdeploy.render import image_env

    assert "VLLM_CACHE_ROOT" not in image_env(m)  # the compile cache is on only where a volume keeps it
    assert [ep.label for ep in m.endpoints] == ["tiny-health", "tiny-warmup", "tiny-generate"]


def test_check_json_names_the_new_rules(tmp_path: Path) -> None:
    data = snapshot_manifest(compute__memory=4096)
    report = check([write(tmp_path, "s.toml", data)], drift_check=False)
    found = json.loads(report.format("json"))["findings"]
    assert {"code": "snapshot-memory", "path": "compute.memory"}.items() <= next(
        f for f in found if f["code"] == "snapshot-memory").items()


# ## Both engines' modules: the same Modal functions


def test_the_sglang_module_has_business_hours_and_required_secret_keys(tmp_path: Path) -> None:
    from liftdeploy.render import render
    from tests.helpers_render import inspect_rendered

    text = (DEPLOYMENTS / "qwen3-coder-30b.toml").read_text()
    text += ('\n[scaling.business_hours]\nstart = "09:00"\nend = "17:30"\ntimezone = "Asia/Kolkata"\n'
             'min_containers = 2\n')
    manifest = tmp_path / "coder.toml"
    manifest.write_text(text)
    loaded = load(manifest)
    assert str(loaded.manifest.engine.kind) == "sglang"
    module = tmp_path / "coder.py"
    module.write_text(render(loaded))
    (found,) = inspect_rendered(module)
    assert found["functions"]["business_hours_start"]["schedule"] == {"cron": "0 9 * * 1-5", "timezone": "Asia/Kolkata"}
    assert found["functions"]["business_hours_end"]["schedule"] == {"cron": "30 17 * * 1-5", "timezone": "Asia/Kolkata"}
    secrets = loaded.manifest.secrets
    assert found["functions"]["Inference.*"]["secret_keys"] == {n: secrets.required_keys(n) for n in secrets.all_names}
