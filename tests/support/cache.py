"""The test suite's one cache folder: `$LIFTDEPLOY_TEST_CACHE`, by default `~/.cache/liftdeploy-tests`.

Everything the tests download or build once and reuse lives under it, about 5.5 GB after a full run:

    vllm-<version>/, vllm-deps/, overlay-*/, pip/   real vLLM wheels (tests/support/vllm_wheels.py)
    sglang-<version>/, sglang-deps/                real SGLang wheels (the same module; overlay-sglang04
                                                   holds the triton 0.4.x releases import)
    liftdeploy/smoke-models/                       the smoke model: tests/conftest.py points
                                                   LIFTDEPLOY_CACHE here for the whole session
    liftdeploy/instruct-models/                    SmolLM2-135M-Instruct, converted (~540 MB)
    core-venv-<key>/                               a venv with only `pip install liftdeploy`
                                                   (tests/test_core_install.py)
    modal-<version>/                               real modal releases (tests/test_modal_floor.py)

Set LIFTDEPLOY_TEST_CACHE to another folder to move it; delete the folder to clear it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CACHE_ENV = "LIFTDEPLOY_TEST_CACHE"


def cache_path() -> Path:
    """Where the cache is, without creating it."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "liftdeploy-tests")
    return Path(root).expanduser()


def cache_root() -> Path:
    """The cache folder, created if needed."""
    path = cache_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


MARKER = ".liftdeploy-complete"


def _marker(path: Path) -> Any:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached(name: str, key: Any, build: Callable[[Path], None]) -> Path:
    """`<cache>/<name>`, made once by `build(path)` for `key` (JSON data: what it was made from).

    The marker holding `key` is written last, so a folder with the right marker is complete; a
    folder without it (a killed build) or with another key is deleted and made again. Concurrent
    test processes wait on a lock and reuse the result.
    """
    root = cache_root()
    target = root / name
    if _marker(target) == key:
        return target
    with _locked(root / f".{name}.lock"):
        if _marker(target) == key:  # somebody else finished while we waited
            return target
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        try:
            build(target)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        (target / MARKER).write_text(json.dumps(key))
    return target
