"""Bounded load against `serve --local` on 127.0.0.1: throughput, latency, errors, recovery.

    python benchmarks/load.py [--clients 32] [--seconds 30]

Starts the seeds' deployment (deployments/qwen32b.toml: 20 inputs per container) on the CPU
smoke model, then runs `clients` concurrent loops of schema-constrained requests for `seconds`,
while the warm-up endpoint is polled for the requests running in the engine. Requests beyond
the configured concurrency wait for a slot (on Modal they wait in Modal's queue for a
container), never more than `max_inputs` run at once, none is a 500; afterwards a single
request must answer at its normal latency again. Every loop stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from liftdeploy.bench import percentile  # noqa: E402  (the benchmark runs from a checkout)

# Where the local server answers each endpoint: /<label>, the label `<app name>-<kind>` by default.
GENERATE_32B = "/lift-sys-inference-generate"
WARMUP_32B = "/lift-sys-inference-warmup"

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 9}},
          "required": ["ok", "n"]}


@dataclass
class LoadResult:
    clients: int
    seconds: float
    statuses: dict[str, int]
    ok_per_s: float
    p50_ms: float
    p99_ms: float
    baseline_ms: float
    after_ms: float
    peak_in_flight: int  # the most requests the engine reported running at once

    @property
    def unexpected(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")


async def one(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> tuple[str, float, float]:
    started = time.perf_counter()
    try:
        response = await client.post(url, headers=headers, json={"prompt": "load", "schema": SCHEMA,
                                                                  "max_tokens": 24, "temperature": 0.0})
        status, retry = str(response.status_code), float(response.headers.get("retry-after", 0) or 0)
    except httpx.HTTPError as exc:
        status, retry = type(exc).__name__, 0.0
    return status, (time.perf_counter() - started) * 1000, retry


async def load(url: str, headers: dict[str, str], *, clients: int, seconds: float, warmup_url: str) -> LoadResult:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0), limits=limits) as client:
        baseline = statistics.median([(await one(client, url, headers))[1] for _ in range(3)])
        statuses: Counter[str] = Counter()
        latencies: list[float] = []
        deadline = time.monotonic() + seconds

        async def loop() -> None:
            while time.monotonic() < deadline:
                status, ms, retry = await one(client, url, headers)
                statuses[status] += 1
                if status == "200":
                    latencies.append(ms)
                elif status == "503":
                    await asyncio.sleep(min(retry, 0.5) or 0.1)  # a polite client backs off

        peak = 0

        async def watch() -> None:
            nonlocal peak
            while time.monotonic() < deadline:
                answer = await client.get(warmup_url, headers=headers)
                peak = max(peak, answer.json().get("requests_running", 0))
                await asyncio.sleep(0.05)

        started = time.monotonic()
        await asyncio.gather(watch(), *(loop() for _ in range(clients)))
        wall = time.monotonic() - started
        after = statistics.median([(await one(client, url, headers))[1] for _ in range(3)])
    return LoadResult(clients, round(wall, 2), dict(statuses), round(len(latencies) / wall, 2),
                      round(percentile(latencies, 0.5), 1), round(percentile(latencies, 0.99), 1),
                      round(baseline, 1), round(after, 1), peak)


def serve_seeds_deployment():
    """The local server for deployments/qwen32b.toml on the smoke model, with known proxy credentials."""
    from liftdeploy.local.engine import LocalEngine
    from liftdeploy.local.server import Credentials, LocalServer, build
    from liftdeploy.manifest import load as load_manifest

    engine = LocalEngine(None, max_model_len=1024)
    engine.start()
    router = build(load_manifest(ROOT / "deployments" / "qwen32b.toml"), engine,
                   Credentials(proxy_key="wk-load", proxy_secret="ws-load"))
    return LocalServer(router), {"Modal-Key": "wk-load", "Modal-Secret": "ws-load"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    server, headers = serve_seeds_deployment()
    with server:
        result = asyncio.run(load(f"{server.url}{GENERATE_32B}", headers, clients=args.clients, seconds=args.seconds,
                                  warmup_url=f"{server.url}{WARMUP_32B}"))
    print(json.dumps(asdict(result), indent=2))
    print(f"unexpected statuses: {result.unexpected}")


if __name__ == "__main__":
    main()
