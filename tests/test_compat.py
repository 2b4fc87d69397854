"""The knowledge base against real combinations (offline: reads only the packaged data files).

The expected facts were checked against the real metadata of the releases on the index when
the data file was generated (see liftdeploy/data/vllm_releases.json ``generated``)."""

from __future__ import annotations

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from liftdeploy import compat, compat_sglang
from liftdeploy.compat import Conflict, Finding, Release


def codes(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings}


# (pins, python, expected finding codes)
PIN_CASES = [
    pytest.param({"vllm": "0.9.2", "transformers": "4.53.0"}, "3.12", set(), id="0.9.2+tf4.53.0-ok"),
    pytest.param(
        {"vllm": "0.9.2", "transformers": "4.53.0", "torch": "2.7.0", "xgrammar": "0.1.19"},
        "3.12",
        set(),
        id="0.9.2-full-ok",
    ),
    pytest.param(
        {"vllm": "0.9.2", "transformers": "4.57.0"},
        "3.12",
        {"vllm-transformers-aimv2", "yanked-release"},
        id="0.9.2+tf4.57.0-aimv2",
    ),
    pytest.param(
        {"vllm": "0.9.2", "transformers": "4.57.1"},
        "3.12",
        {"vllm-transformers-aimv2"},
        id="0.9.2+tf4.57.1-aimv2",
    ),
    pytest.param(
        {"vllm": "0.9.0", "transformers": "4.54.0"},
        "3.11",
        {"vllm-transformers-aimv2"},
        id="0.9.0+tf4.54.0-aimv2",
    ),
    pytest.param({"vllm": "0.10.0", "transformers": "4.57.1"}, "3.12", set(), id="0.10.0-fixed-aimv2"),
    pytest.param({"vllm": "0.8.5", "transformers": "4.54.0"}, "3.12", set(), id="0.8.5-no-ovis-aimv2"),
    pytest.param(
        {"vllm": "0.9.2", "transformers": "4.46.0"},
        "3.12",
        {"transformers-out-of-range"},
        id="0.9.2+tf4.46.0-too-old",
    ),
    pytest.param(
        {"vllm": "0.12.0", "transformers": "5.0.0"},
        "3.12",
        {"transformers-out-of-range"},
        id="0.12.0+tf5-capped",
    ),
    pytest.param(
        {"vllm": "0.11.0", "transformers": "5.2.0"},
        "3.12",
        {"vllm-transformers-v5-tokenizer"},
        id="0.11.0+tf5-uncapped-breaks",
    ),
    pytest.param({"vllm": "0.33.0"}, "3.10", {"python-unsupported"}, id="0.33.0-py3.10"),
    pytest.param({"vllm": "0.33.0"}, "3.12", set(), id="0.33.0-py3.12"),
    pytest.param({"vllm": "0.9.2"}, "3.13", {"python-unsupported"}, id="0.9.2-py3.13"),
    pytest.param(
        {"vllm": "0.9.2", "xgrammar": "0.1.25"}, "3.12", {"xgrammar-out-of-range"}, id="0.9.2+xgr0.1.25"
    ),
    pytest.param({"vllm": "0.9.2", "torch": "2.8.0"}, "3.12", {"torch-out-of-range"}, id="0.9.2+torch2.8"),
    pytest.param(
        {"vllm": "0.7.2", "xgrammar": "0.1.13"},
        "3.12",
        {"vllm-xgrammar-cuda-kernel-build"},
        id="0.7.2+xgr0.1.13",
    ),
    pytest.param(
        {"vllm": "0.6.2", "xgrammar": "0.1.13"}, "3.12", {"xgrammar-backend-missing"}, id="0.6.2-no-xgrammar"
    ),
    pytest.param({"vllm": "0.5.0"}, "3.12", {"vllm-unknown-release"}, id="0.5.0-too-old"),
    pytest.param({"vllm": "9.9.9"}, "3.12", {"vllm-unknown-release"}, id="unknown-vllm"),
    pytest.param({"Transformers": "4.53.0", "VLLM": "==0.9.2"}, "3.12", set(), id="names-normalized"),
]


@pytest.mark.parametrize(("pins", "python", "expected"), PIN_CASES)
def test_pin_findings(pins: dict[str, str], python: str, expected: set[str]) -> None:
    found = compat.pin_findings(pins, python)
    assert codes(found) == expected, [f.message for f in found]
    for f in found:
        assert f.message and f.hint and f.package


def test_too_old_transformers_message_and_hint() -> None:
    (f,) = compat.pin_findings({"vllm": "0.9.2", "transformers": "4.46.0"}, "3.12")
    assert f.package == "transformers"
    assert f.message == "vllm==0.9.2 requires transformers>=4.51.1, but transformers==4.46.0 is pinned"
    # newest release inside >=4.51.1 that also avoids the aimv2 crash (>=4.54)
    assert f.hint == "pin transformers==4.53.3"


def test_aimv2_message_hint_source() -> None:
    (c,) = compat.runtime_conflicts({"vllm": "0.9.2", "transformers": "4.57.0"})
    assert isinstance(c, Conflict)
    assert set(c.packages) == {"vllm", "transformers"}
    assert "ValueError: 'aimv2' is already used by a Transformers config" in c.message
    assert "vllm==0.9.2" in c.message and "transformers==4.57.0" in c.message
    assert "pin transformers==4.53.0" in c.hint and "upgrade vllm to >=0.10.0" in c.hint
    assert c.source.startswith("https://github.com/vllm-project/vllm/issues/")


def test_transformers_v5_hint_stays_below_5() -> None:
    (f,) = compat.pin_findings({"vllm": "0.12.0", "transformers": "5.0.0"}, "3.12")
    assert f.message == "vllm==0.12.0 requires transformers<5,>=4.56.0, but transformers==5.0.0 is pinned"
    assert f.hint.startswith("pin transformers==4.57.")


def test_xgrammar_pin_hint() -> None:
    (f,) = compat.pin_findings({"vllm": "0.9.2", "xgrammar": "0.1.25"}, "3.12")
    assert f.message == "vllm==0.9.2 requires xgrammar==0.1.19, but xgrammar==0.1.25 is pinned"
    assert f.hint.startswith("pin xgrammar==0.1.19")
    assert "upgrade vllm to >=0.11.0" in f.hint  # vllm 0.11.0 pins xgrammar==0.1.25


def test_python_hint() -> None:
    (f,) = compat.pin_findings({"vllm": "0.33.0"}, "3.10")
    assert f.package == "python"
    assert "3.10" in f.message and ">=3.11" in f.message
    assert "3.12" in f.hint


def test_no_runtime_conflict_without_vllm_pin() -> None:
    assert compat.runtime_conflicts({"transformers": "4.57.0"}) == []


# ---------------------------------------------------------------------------------- releases


# (version, requires_python, torch, transformers, xgrammar) as declared by the real wheels
RELEASE_FACTS = [
    ("0.6.0", ">=3.8", "==2.4.0", ">=4.43.2", ""),
    ("0.6.5", ">=3.9", "==2.5.1", ">=4.45.2", ">=0.1.6"),
    ("0.9.2", "<3.13,>=3.9", "==2.7.0", ">=4.51.1", "==0.1.19"),
    ("0.10.0", "<3.13,>=3.9", "==2.7.1", ">=4.53.2", "==0.1.21"),
    ("0.11.0", "<3.14,>=3.9", "==2.8.0", ">=4.55.2", "==0.1.25"),
    ("0.12.0", "<3.14,>=3.10", "==2.9.0", "<5,>=4.56.0", "==0.1.27"),
    ("0.33.0", "<3.15,>=3.11", "==2.14.0", "<5.21.0,>=5.16.1", "==0.2.8"),
]


@pytest.mark.parametrize(("version", "py", "torch", "transformers", "xgrammar"), RELEASE_FACTS)
def test_release_facts(version: str, py: str, torch: str, transformers: str, xgrammar: str) -> None:
    rel = compat.release(version)
    assert rel == Release(version, py, torch, transformers, xgrammar, compat.api_family(version))


def test_releases_cover_0_6_0_to_newest() -> None:
    rels = compat.releases()
    versions = [Version(r.version) for r in rels]
    assert versions == sorted(versions)
    assert rels[0].version == "0.6.0"
    assert compat.newest() == rels[-1]
    assert Version(compat.newest().version) >= Version("0.33.0")
    assert len(rels) >= 60
    for v in ("0.6.1.post2", "0.8.5.post1", "0.9.0.1", "0.10.1.1"):
        assert compat.release(v) is not None
    assert compat.release("0.5.5") is None
    assert compat.release("not a version") is None
    for r in rels:  # every specifier parses
        (
            SpecifierSet(r.requires_python),
            SpecifierSet(r.torch),
            SpecifierSet(r.transformers),
            SpecifierSet(r.xgrammar),
        )
        assert r.transformers, r.version


def test_data_info_and_known_versions() -> None:
    info = compat.data_info()
    assert info["generated"] and info["source"]["index"]
    tf = compat.known_versions("transformers")
    assert "4.53.0" in tf and "4.53.3" in tf and "5.0.0" in tf
    assert "4.57.0" not in tf  # yanked on the index
    assert "0.1.19" in compat.known_versions("xgrammar")
    assert "2.7.0" in compat.known_versions("torch")


# ------------------------------------------------------------------------------------- API


@pytest.mark.parametrize(
    ("version", "family"),
    [
        ("0.6.0", "guided_options_request"),
        ("0.6.1.post2", "guided_options_request"),
        ("0.6.2", "guided_options_request"),
        ("0.6.3", "guided_decoding"),
        ("0.6.3.post1", "guided_decoding"),
        ("0.9.2", "guided_decoding"),
        ("0.10.1.1", "guided_decoding"),
        ("0.10.2", "guided_decoding"),
        ("0.11.0", "structured_outputs_compat"),
        ("0.11.2", "structured_outputs_compat"),
        ("0.12.0", "structured_outputs"),
        ("0.33.0", "structured_outputs"),
    ],
)
def test_api_family(version: str, family: str) -> None:
    assert compat.api_family(version) == family
    assert compat.API_FAMILIES[family].name == family
    if compat.release(version):
        assert compat.release(version).api_family == family


def test_api_family_rejects_pre_0_6() -> None:
    with pytest.raises(ValueError):
        compat.api_family("0.5.5")


@pytest.mark.parametrize(
    ("version", "ok"),
    [("0.6.0", False), ("0.6.4.post1", False), ("0.6.5", True), ("0.9.2", True), ("0.33.0", True)],
)
def test_supports_xgrammar(version: str, ok: bool) -> None:
    assert compat.supports_xgrammar(version) is ok


def test_xgrammar_dependency_matches_backend_support() -> None:
    # the metadata agrees: xgrammar becomes a dependency exactly when the backend appears
    for r in compat.releases():
        assert bool(r.xgrammar) == compat.supports_xgrammar(r.version), r.version


# ------------------------------------------------------------------------------- conflicts


def test_curated_conflicts_are_sourced_and_apply_to_known_releases() -> None:
    entries = compat.conflicts()
    assert len(entries) >= 3
    ids = [c.id for c, _ in entries]
    assert len(ids) == len(set(ids))
    for c, when in entries:
        assert c.source.startswith("https://"), c.id
        assert c.severity in ("error", "warning")
        assert c.message and c.hint
        # it applies to a known release of an engine: the engine is named in `when`, or its exact
        # requirements (what an install gets, pinned or not) are; the other packages are pinned
        hits = []
        for kb in (compat.KB, compat_sglang.KB):
            for rec in kb.records():
                fixed = {**kb.implied_pins(rec, frozenset(rec.get("extras", {}))), kb.project: rec["version"]}
                named = [p for p in when if p in fixed]
                if named and all(spec.contains(fixed[p], prereleases=True) for p, spec in when.items() if p in named):
                    hits.append(f"{kb.project}=={rec['version']}")
        assert hits, c.id


def test_best_version_avoids_conflicts() -> None:
    assert compat.best_version("transformers", ">=4.51.1", {"vllm": "0.9.2"}) == "4.53.3"
    # vllm 0.10.0 declares no upper bound, but transformers 5 breaks its tokenizer code
    assert compat.best_version("transformers", ">=4.53.2", {"vllm": "0.10.0"}) == "4.57.6"
    assert compat.best_version("transformers", ">=5.16.1,<5.21.0", {"vllm": "0.33.0"}) == "5.20.2"
    assert compat.best_version("torch", "==2.7.0") == "2.7.0"
    assert compat.best_version("transformers", ">=99") is None
