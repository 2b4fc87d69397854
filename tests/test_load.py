"""A bounded load test on loopback (marked `load`; CI runs it): overload waits, and recovery.

benchmarks/load.py is the full 30 s run; this is a short one with the same code."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

# Where the local server answers each endpoint: /<label>, the label `<app name>-<kind>` by default.
GENERATE_32B = "/lift-sys-inference-generate"

pytestmark = pytest.mark.load

spec = importlib.util.spec_from_file_location("load_bench", Path(__file__).parent.parent / "benchmarks" / "load.py")
load_bench = importlib.util.module_from_spec(spec)
sys.modules["load_bench"] = load_bench  # dataclasses look their module up there
spec.loader.exec_module(load_bench)


def test_overload_waits_its_turn_and_the_server_recovers():
    server, headers = load_bench.serve_seeds_deployment()
    with server:
        result = asyncio.run(load_bench.load(f"{server.url}{GENERATE_32B}", headers, clients=32, seconds=6,
                                             warmup_url=f"{server.url}{load_bench.WARMUP_32B}"))
    # 32 clients > 20 max_inputs: the extra ones wait for a slot, as Modal's queue makes them wait for a
    # container; none is refused, none gets a 500, no connection is dropped.
    assert result.unexpected == 0, result.statuses
    assert set(result.statuses) == {"200"}, result.statuses
    assert result.peak_in_flight == 20, result  # never more at once than max_inputs, and the cap was reached
    assert result.after_ms < max(5 * result.baseline_ms, result.baseline_ms + 2000)  # back to normal after
