"""The real resolver (uv pip compile) for the deployment target."""

from __future__ import annotations

import pytest

from liftdeploy import resolve as rs


@pytest.mark.network
def test_vllm_0_9_2_with_transformers_4_53_0_resolves_for_py312() -> None:
    result = rs.resolve(["vllm==0.9.2", "transformers==4.53.0"], python_version="3.12")
    assert result.ok, result.output
    lines = result.output.splitlines()
    assert "vllm==0.9.2" in lines and "transformers==4.53.0" in lines
    assert "torch==2.7.0" in lines and "xgrammar==0.1.19" in lines  # linux x86_64 markers held
    assert result.seconds > 0


@pytest.mark.network
def test_vllm_0_9_2_with_transformers_4_46_0_explains_conflict() -> None:
    result = rs.resolve(["vllm==0.9.2", "transformers==4.46.0"], python_version="3.12")
    assert not result.ok and result.checked
    assert "transformers" in result.output
    assert "vllm==0.9.2 depends on transformers>=4.51.1" in result.output
    assert "unsatisfiable" in result.output


@pytest.mark.network
def test_requires_python_is_enforced() -> None:
    result = rs.resolve(["vllm==0.33.0"], python_version="3.10")
    assert not result.ok
    assert "Python>=3.11" in result.output


def test_timeout_is_reported_not_hung() -> None:
    result = rs.resolve(["vllm==0.9.2"], python_version="3.12", timeout=0.001)
    assert not result.ok and not result.checked
    assert "did not finish within" in result.output
    assert result.seconds < 5


def test_unreachable_index_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")
    result = rs.resolve(
        ["vllm==0.9.2"],
        python_version="3.12",
        timeout=30,
        extra_args=["--index-url", "http://127.0.0.1:9/simple", "--no-cache"],
    )
    assert not result.ok and not result.checked
    assert "could not be reached" in result.output


def test_missing_uv_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rs, "find_uv", lambda: None)
    result = rs.resolve(["vllm==0.9.2"], python_version="3.12")
    assert not result.ok and not result.checked and "uv is not installed" in result.output


def test_find_uv() -> None:
    assert rs.find_uv()


# ---------------------------------------------------------------------------------- SGLang


@pytest.mark.network
def test_sglang_seeds_release_does_not_resolve_and_says_why() -> None:
    """The seeds' `sglang[all]>=0.5.3.post1` at its floor: uv refuses the yanked transformers
    it pins exactly (what `check` says offline as `required-release-yanked`)."""
    result = rs.resolve(["sglang[all]==0.5.3.post1"], python_version="3.12")
    assert not result.ok
    assert "transformers==4.57.0 was yanked" in result.output
    pinned = rs.resolve(["sglang[all]==0.5.3.post1", "transformers==4.57.0"], python_version="3.12")
    assert not pinned.ok  # then flashinfer-python 0.4.0's vanished apache-tvm-ffi pre-release
    assert "apache-tvm-ffi==0.1.0b15" in pinned.output


@pytest.mark.network
def test_sglang_0_5_4_post3_resolves_to_the_knowledge_base_pins() -> None:
    result = rs.resolve(["sglang==0.5.4.post3"], python_version="3.12")
    assert result.ok, result.output
    lines = result.output.splitlines()
    for pin in ("torch==2.8.0", "transformers==4.57.1", "xgrammar==0.1.25", "flashinfer-python==0.5.0"):
        assert pin in lines


@pytest.mark.network
def test_sglang_manylinux_2_34_wheels_resolve_for_the_container() -> None:
    result = rs.resolve(["sglang==0.5.23"], python_version="3.12")
    assert result.ok, result.output
    refused = rs.resolve(["sglang==0.5.23"], python_version="3.12", platform="x86_64-manylinux_2_28")
    assert not refused.ok and "manylinux_2_28" in refused.output
