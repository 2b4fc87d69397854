"""Shared fixtures (the example deployments), and the session's setup: one cache folder, and
SIGINT answered however pytest was launched."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.support.cache import CACHE_ENV, cache_path

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = ROOT / "deployments"
EXAMPLES = [
    (DEPLOYMENTS / "qwen32b.toml", None),
    (DEPLOYMENTS / "qwen32b.toml", "dev"),
    (DEPLOYMENTS / "qwen3-8b.toml", None),
    (DEPLOYMENTS / "qwen3-8b.toml", "prod"),
    (DEPLOYMENTS / "qwen3-coder-30b.toml", None),
]


def pytest_configure(config: pytest.Config) -> None:
    # Launched with SIGINT ignored (`pytest &` in a script, nohup, some CI runners), every process
    # the tests start would inherit that and shrug off the SIGINT a test sends it. A handler (unlike
    # SIG_IGN) is reset to the default across exec, so the children answer SIGINT again.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # The smoke model the tests build goes under the one test cache, in this process and its children.
    os.environ["LIFTDEPLOY_CACHE"] = str(cache_path() / "liftdeploy")


def pytest_report_header(config: pytest.Config) -> str:
    return (f"liftdeploy test cache: {cache_path()} (about 4 GB after the slow tests; "
            f"{CACHE_ENV}=DIR moves it, deleting it clears it)")


@pytest.fixture(params=EXAMPLES, ids=lambda e: e[0].stem + (f"-{e[1]}" if e[1] else ""))
def example(request):
    """Each example manifest with each of its envs: (path, env)."""
    return request.param


@pytest.fixture(scope="session")
def smoke_engine():
    """The transformers stand-in on the random smoke model, loaded once: for tests of the serving path,
    where the content of an answer does not matter."""
    pytest.importorskip("transformers")
    from liftdeploy.local.engine import LocalEngine

    engine = LocalEngine(None, max_model_len=2048)
    engine.start()
    return engine


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """`liftdeploy serve --local --engine vllm deployments/qwen3-8b.toml`, shared by the engine tests."""
    from tests.support.vllm_server import serve_vllm

    with serve_vllm(DEPLOYMENTS / "qwen3-8b.toml", tmp_path_factory.mktemp("vllm")) as served:
        yield served
