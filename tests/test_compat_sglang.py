"""The SGLang knowledge base against real pin sets (offline: reads only the packaged data files).

The facts were checked against the released packages when the data file was generated
(liftdeploy/data/sglang_releases.json ``generated``): the wheels' METADATA, and `uv pip compile`
for linux x86_64 (tests/test_resolve.py resolves the same pin sets for real)."""

from __future__ import annotations

import pytest

from liftdeploy import compat_sglang
from liftdeploy.knowledge import Finding, parse_pins


def codes(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings}


PIN_CASES = [
    # the seeds' release: it pins a yanked transformers and a flashinfer whose dependency is gone
    pytest.param({"sglang[all]": "0.5.3.post1"}, "3.12",
                 {"required-release-yanked", "flashinfer-tvm-ffi-beta-gone"}, id="seeds-0.5.3.post1"),
    pytest.param({"sglang[all]": "0.5.3.post1", "transformers": "4.57.0"}, "3.12",
                 {"yanked-release", "flashinfer-tvm-ffi-beta-gone"}, id="seeds-with-yanked-pinned"),
    pytest.param({"sglang": "0.5.4.post3"}, "3.12", set(), id="0.5.4.post3-ok"),
    pytest.param({"sglang[all]": "0.5.4.post3"}, "3.12", {"sglang-extra-unknown"}, id="0.5.4.post3-has-no-all"),
    pytest.param({"sglang": "0.5.4.post3", "transformers": "4.57.1", "xgrammar": "0.1.25",
                  "flashinfer-python": "0.5.0", "torch": "2.8.0"}, "3.12", set(), id="0.5.4.post3-full-ok"),
    pytest.param({"sglang": "0.5.4.post3", "transformers": "4.57.6"}, "3.12",
                 {"transformers-out-of-range"}, id="0.5.4.post3+tf4.57.6"),
    pytest.param({"sglang": "0.5.4.post3", "xgrammar": "0.1.19"}, "3.12", {"xgrammar-out-of-range"},
                 id="0.5.4.post3+xgr0.1.19"),
    pytest.param({"sglang": "0.5.4.post3"}, "3.9", {"python-unsupported"}, id="0.5.4.post3-py3.9"),
    pytest.param({"sglang[all]": "0.5.23"}, "3.10", {"python-unsupported"}, id="0.5.23-py3.10"),
    pytest.param({"sglang": "0.4.6.post5"}, "3.12", {"sglang-runtime-missing"}, id="0.4.6-no-srt"),
    pytest.param({"sglang[srt]": "0.4.6.post5", "torch": "2.7.1"}, "3.12", {"torch-out-of-range"},
                 id="0.4.6-srt+torch2.7.1"),
    pytest.param({"sglang[all]": "0.4.6.post5", "torch": "2.6.0"}, "3.12", set(), id="0.4.6-all-ok"),
    pytest.param({"sglang[all]": "0.5.9"}, "3.12", set(), id="0.5.9-all-ok"),
    pytest.param({"sglang": "0.3.6"}, "3.12", {"sglang-unknown-release"}, id="0.3.6-too-old"),
    pytest.param({"sglang": "9.9.9"}, "3.12", {"sglang-unknown-release"}, id="unknown"),
]  # fmt: skip


@pytest.mark.parametrize(("pins", "python", "expected"), PIN_CASES)
def test_pin_findings(pins: dict[str, str], python: str, expected: set[str]) -> None:
    found = compat_sglang.pin_findings(pins, python)
    assert codes(found) == expected, [f.message for f in found]
    for f in found:
        assert f.message and f.hint and f.package


def test_seeds_release_says_why_and_what_to_pin() -> None:
    by = {f.code: f for f in compat_sglang.pin_findings({"sglang[all]": "0.5.3.post1"}, "3.12")}
    yanked = by["required-release-yanked"]
    assert yanked.message.startswith("sglang==0.5.3.post1 requires transformers==4.57.0, which is yanked")
    assert "pin transformers==4.57.0" in yanked.hint
    gone = by["flashinfer-tvm-ffi-beta-gone"]
    assert "flashinfer-python==0.4.0 requires apache-tvm-ffi==0.1.0b15" in gone.message
    assert gone.hint.endswith("upgrade sglang to >=0.5.4.post3")
    assert gone.source == "https://github.com/flashinfer-ai/flashinfer/issues/1962"


def test_yanked_pin_the_engine_requires_is_kept() -> None:
    (f,) = [
        f
        for f in compat_sglang.pin_findings({"sglang[all]": "0.5.3.post1", "transformers": "4.57.0"}, "3.12")
        if f.code == "yanked-release"
    ]
    assert f.severity == "warning" and f.hint.startswith("keep the pin: sglang==0.5.3.post1 requires exactly")


def test_out_of_range_message_and_hint() -> None:
    (f,) = compat_sglang.pin_findings({"sglang": "0.5.4.post3", "transformers": "4.57.6"}, "3.12")
    assert (
        f.message == "sglang==0.5.4.post3 requires transformers==4.57.1, but transformers==4.57.6 is pinned"
    )
    assert f.hint.startswith("pin transformers==4.57.1")


def test_runtime_missing_hint_names_the_extra() -> None:
    (f,) = compat_sglang.pin_findings({"sglang": "0.4.6.post5"}, "3.12")
    assert "`srt` extra" in f.message and '"sglang[all]" = "0.4.6.post5"' in f.hint


def test_requirement_follows_the_pinned_extras() -> None:
    rec = compat_sglang.KB.record("0.4.6.post5")
    assert rec is not None
    assert compat_sglang.KB.requirement(rec, "torch") == ""
    assert compat_sglang.KB.requirement(rec, "torch", frozenset({"srt"})) == "==2.6.0"
    assert compat_sglang.runtime_packages(rec, frozenset({"all"})) >= {"torch", "torch-memory-saver"}
    assert "torch-memory-saver" not in compat_sglang.runtime_packages(rec, frozenset({"srt"}))


def test_parse_pins_keeps_extras_apart() -> None:
    pins = parse_pins({"SGLang[All]": "==0.5.4.post3", "flashinfer_python": "0.5.0"})
    assert pins.versions == {"sglang": "0.5.4.post3", "flashinfer-python": "0.5.0"}
    assert pins.extras == {"sglang": frozenset({"all"})}


@pytest.mark.parametrize(
    ("version", "era"),
    [
        ("0.4.0", "outlines-default"),
        ("0.4.4.post1", "outlines-default"),
        ("0.4.4.post2", "xgrammar-default"),
        ("0.4.7.post1", "xgrammar-default"),
        ("0.4.8", "entrypoints"),
        ("0.5.3.post1", "entrypoints"),
        ("0.5.3.post2", "compact-whitespace"),
        ("0.5.13.post1", "compact-whitespace"),
        ("0.5.14", "decode-graphs"),
        ("0.5.23", "decode-graphs"),
    ],
)
def test_eras(version: str, era: str) -> None:
    assert compat_sglang.era(version) == era


def test_features() -> None:
    assert not compat_sglang.supports("0.5.3.post1", "disable-any-whitespace")
    assert compat_sglang.supports("0.5.4.post3", "disable-any-whitespace")
    assert compat_sglang.supports("0.4.1.post6", "memory-saver")
    assert not compat_sglang.supports("0.4.1.post5", "memory-saver")
    assert compat_sglang.supports("0.5.4.post3", "grammar-timeout-env")  # read from 0.4.6.post4 to 0.5.7
    assert not compat_sglang.supports("0.5.8", "grammar-timeout-env")
    assert not compat_sglang.supports("0.4.6.post3", "grammar-timeout-env")
    with pytest.raises(ValueError, match="predates 0.4.0"):
        compat_sglang.era("0.3.6")


def test_every_release_is_recorded_from_the_floor() -> None:
    versions = [r["version"] for r in compat_sglang.KB.records()]
    assert versions[0] == "0.4.0" and "0.5.3.post1" in versions and "0.5.23" in versions
    assert len(versions) >= 90
    info = compat_sglang.KB.info()
    assert info["source"]["generator"] == "liftdeploy.refresh"
