"""`liftdeploy bench`: cold start, warm latency, time to first token and throughput over a
concurrency sweep.

With an `openai` endpoint every request is a streamed chat completion with the smoke schema as
`response_format`: the first chunk that carries text gives the time to first token (TTFT), the
end of the stream the latency, its usage the tokens. Without one, `generate` is timed (no TTFT:
it answers all at once). Works against Modal URLs and against `serve --local` alike. Writes a
JSON report and, when matplotlib is installed, a PNG plot per concurrency level.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

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
    ttft_p50_ms: float | None = None  # time to the first token, streamed (the `openai` route only)
    ttft_p99_ms: float | None = None


@dataclass
class BenchReport:
    target: str
    first_response_s: float  # time to the first successful answer: the cold start, when cold
    route: str = "generate"  # what was timed: "openai" (streamed chat completions) or "generate"
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


@dataclass
class Timing:
    """One request: milliseconds to its first token (None when not streamed) and to its end, tokens."""

    ttft_ms: float | None
    latency_ms: float
    tokens: int


async def _generated(client: AsyncClient, max_tokens: int) -> Timing:
    started = time.perf_counter()
    result = await client.generate(SMOKE_PROMPT, SMOKE_SCHEMA, max_tokens=max_tokens, temperature=0.0)
    return Timing(None, (time.perf_counter() - started) * 1000, result.tokens_used)


def _chat(model: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": SMOKE_PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "smoke", "schema": SMOKE_SCHEMA}},
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _event(line: str) -> dict | None:
    """One server-sent event of a streamed completion; None for anything else and the final [DONE]."""
    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
        return None
    event = json.loads(line[5:])
    if "error" in event:  # vLLM reports a failure inside the stream
        raise ClientError(f"openai stream failed: {event['error'].get('message', event['error'])}")
    return event


async def _streamed(client: AsyncClient, model: str, max_tokens: int) -> Timing:
    url, headers = client.address("openai")
    started = time.perf_counter()
    first, tokens = None, 0
    try:
        async with client.http.stream("POST", f"{url}/v1/chat/completions", json=_chat(model, max_tokens),
                                      headers=headers, timeout=client.timeout()) as response:
            if response.status_code != 200:
                raise ClientError(f"openai answered {response.status_code}: {(await response.aread())[:300]!r}",
                                  response.status_code)
            async for line in response.aiter_lines():
                event = _event(line)
                if event is None:
                    continue
                if first is None and any(choice.get("delta", {}).get("content") for choice in event.get("choices", [])):
                    first = time.perf_counter()
                tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    except httpx.HTTPError as exc:
        raise ClientError(f"openai stream failed: {type(exc).__name__}: {exc}") from None
    ended = time.perf_counter()
    return Timing((first - started) * 1000 if first else None, (ended - started) * 1000, tokens)


def _served_model(client: Client) -> str:
    """The model name the `openai` endpoint serves (its first, from /v1/models)."""
    url, headers = client.address("openai")
    try:
        response = client.http.get(f"{url}/v1/models", headers=headers, timeout=client.timeout())
        return response.raise_for_status().json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        hint = "check the endpoint's auth and that the model has loaded (`liftdeploy warmup`)"
        raise ClientError(f"openai /v1/models did not name a model: {exc}", hint=hint) from None


async def _level(request: Callable[[], Awaitable[Timing]], concurrency: int, requests: int) -> Level:
    timings: list[Timing] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker() -> None:
        nonlocal errors
        while not queue.empty():
            queue.get_nowait()
            try:
                timings.append(await request())
            except ClientError:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies = [t.latency_ms for t in timings]
    ttfts = [t.ttft_ms for t in timings if t.ttft_ms is not None]

    def ttft(q: float) -> float | None:
        return round(percentile(ttfts, q), 1) if ttfts else None

    tokens_per_s = round(sum(t.tokens for t in timings) / wall, 2) if wall else 0.0
    return Level(concurrency, requests, errors, round(percentile(latencies, 0.5), 1),
                 round(percentile(latencies, 0.95), 1), round(percentile(latencies, 0.99), 1),
                 tokens_per_s, round(wall, 3), ttft(0.5), ttft(0.99))


def run(client: Client, async_client: AsyncClient, *, target: str, concurrency: list[int], requests: int,
        max_tokens: int = 64) -> BenchReport:
    streamed = "openai" in client.kinds.values()
    started = time.perf_counter()
    if streamed:
        model = _served_model(client)  # the first answer: a cold start waits here
    else:
        client.generate(SMOKE_PROMPT, SMOKE_SCHEMA, max_tokens=max_tokens, temperature=0.0)
    report = BenchReport(target, round(time.perf_counter() - started, 3), "openai" if streamed else "generate")

    async def sweep() -> list[Level]:
        async with async_client:  # one event loop for the whole sweep: the connections belong to it
            async_client.warm = True
            if streamed:
                def request() -> Awaitable[Timing]:
                    return _streamed(async_client, model, max_tokens)
            else:
                def request() -> Awaitable[Timing]:
                    return _generated(async_client, max_tokens)
            return [await _level(request, level, max(requests, level)) for level in concurrency]

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
    if report.route == "openai":
        lat.plot(xs, [lv.ttft_p50_ms for lv in report.levels], marker="s", label="TTFT p50")
        lat.plot(xs, [lv.ttft_p99_ms for lv in report.levels], marker="s", label="TTFT p99")
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
    timed = "streamed chat completions (openai)" if report.route == "openai" else "generate (no TTFT: not streamed)"
    lines = [f"first successful response: {report.first_response_s:.2f} s", f"timed: {timed}",
             "concurrency  requests  errors   p50 ms   p95 ms   p99 ms  TTFT p50  TTFT p99   tokens/s"]

    def ms(value: float | None) -> str:
        return f"{value:>8.1f}" if value is not None else f"{'-':>8}"

    for lv in report.levels:
        lines.append(f"{lv.concurrency:>11}  {lv.requests:>8}  {lv.errors:>6}  {lv.p50_ms:>7.1f}  "
                     f"{lv.p95_ms:>7.1f}  {lv.p99_ms:>7.1f}  {ms(lv.ttft_p50_ms)}  {ms(lv.ttft_p99_ms)}  "
                     f"{lv.tokens_per_s:>9.1f}")
    return "\n".join(lines)
