"""Shared fixtures: paths of the example deployments."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = ROOT / "deployments"
EXAMPLES = [
    (DEPLOYMENTS / "qwen32b.toml", None),
    (DEPLOYMENTS / "qwen32b.toml", "dev"),
    (DEPLOYMENTS / "qwen3-8b.toml", None),
    (DEPLOYMENTS / "qwen3-8b.toml", "prod"),
]


@pytest.fixture(params=EXAMPLES, ids=lambda e: e[0].stem + (f"-{e[1]}" if e[1] else ""))
def example(request):
    """Each example manifest with each of its envs: (path, env)."""
    return request.param


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """`liftdeploy serve --local --engine vllm deployments/qwen3-8b.toml`, shared by the engine tests."""
    from tests.support.vllm_server import serve_vllm

    with serve_vllm(DEPLOYMENTS / "qwen3-8b.toml", tmp_path_factory.mktemp("vllm")) as served:
        yield served
