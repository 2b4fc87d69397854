"""`liftdeploy bench`: cold start, warm latency and throughput over a concurrency sweep.

Works against Modal URLs and against `serve --local` alike. Writes a JSON report and,
when matplotlib is installed, a PNG plot of latency and tokens/s per concurrency level.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .client import AsyncClient, Client, ClientError
from .verify import SMOKE_PROMPT, SMOKE_SCHEMA


@dataclass
class Level:
    concurrency: int
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    tokens_per_s: float
    wall_s: float


@dataclass
class BenchReport:
    target: str
    first_response_s: float  # time to the first successful answer: the cold start, when cold
    levels: list[Level] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


async def _level(client: AsyncClient, concurrency: int, requests: int, max_tokens: int) -> Level:
    latencies: list[float] = []
    tokens = 0
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker() -> None:
        nonlocal tokens, errors
        while not queue.empty():
            queue.get_nowait()
            started = time.perf_counter()
            try:
                result = await client.generate(SMOKE_PROMPT, SMOKE_SCHEMA, max_tokens=max_tokens, temperature=0.0)
            except ClientError:
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            tokens += result.tokens_used

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return Level(concurrency, requests, errors, round(percentile(latencies, 0.5), 1),
                 round(percentile(latencies, 0.95), 1), round(percentile(latencies, 0.99), 1),
                 round(tokens / wall, 2) if wall else 0.0, round(wall, 3))


def run(client: Client, async_client: AsyncClient, *, target: str, concurrency: list[int], requests: int,
        max_tokens: int = 64) -> BenchReport:
    started = time.perf_counter()
    client.generate(SMOKE_PROMPT, SMOKE_SCHEMA, max_tokens=max_tokens, temperature=0.0)
    report = BenchReport(target, round(time.perf_counter() - started, 3))

    async def sweep() -> list[Level]:
        async with async_client:  # one event loop for the whole sweep: the connections belong to it
            async_client.warm = True
            return [await _level(async_client, level, max(requests, level), max_tokens) for level in concurrency]

    report.levels = asyncio.run(sweep())
    return report


def plot(report: BenchReport, path: Path) -> bool:
    """A PNG of p50/p95 latency and tokens/s per concurrency; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = [lv.concurrency for lv in report.levels]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(10, 4))
    lat.plot(xs, [lv.p50_ms for lv in report.levels], marker="o", label="p50")
    lat.plot(xs, [lv.p95_ms for lv in report.levels], marker="o", label="p95")
    lat.set(xlabel="concurrent requests", ylabel="latency (ms)", title="Warm latency")
    lat.legend()
    thr.plot(xs, [lv.tokens_per_s for lv in report.levels], marker="o", color="tab:green")
    thr.set(xlabel="concurrent requests", ylabel="tokens / s", title="Throughput")
    fig.suptitle(f"{report.target} — first response {report.first_response_s:.1f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def summary(report: BenchReport) -> str:
    lines = [f"first successful response: {report.first_response_s:.2f} s",
             "concurrency  requests  errors   p50 ms   p95 ms   p99 ms   tokens/s"]
    for lv in report.levels:
        lines.append(f"{lv.concurrency:>11}  {lv.requests:>8}  {lv.errors:>6}  {lv.p50_ms:>7.1f}  "
                     f"{lv.p95_ms:>7.1f}  {lv.p99_ms:>7.1f}  {lv.tokens_per_s:>9.1f}")
    return "\n".join(lines)

