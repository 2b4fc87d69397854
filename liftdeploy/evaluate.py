"""`liftdeploy eval`: does a deployment still answer right? Its answers to labelled tasks, graded.

Each task (see `grade`) is sent to the deployment, through the `generate` endpoint (the schema as
its constraint; the runtime states it in a system message) or the `openai` endpoint (a chat
completion with `response_format` json_schema, strict; where the schema is stated is `schema_in`;
`free` sends no response_format and takes the first JSON value out of the text: the baseline
constrained decoding is measured against). The answers are graded (valid, exact, fields) and
totalled; "stopped-invalid" counts answers that finished (`stop`) and still break their schema, the
failure constrained decoding exists to prevent. Works against Modal URLs and `serve --local` alike.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .bench import percentile
from .client import AsyncClient, ClientError
from .errors import UsageError
from .grade import NO_JSON, Task, first_json, grade, parse_strict

DEFAULT_TASKS = Path(__file__).parent / "data" / "eval_tasks.jsonl"
ROUTES = ("generate", "openai")
# Answers that refuse the task itself (a schema the engine cannot compile, a prompt over a limit): a
# grade. Any other failure (no answer, 401, 404, 5xx) says the deployment was not asked at all.
REFUSALS = frozenset({400, 413, 422})
SCHEMA_IN = ("system", "user", "none")
# The rendered runtime's `schema_prompt` (templates/_runtime.py.j2) states the schema with exactly
# this text; tests/test_eval.py holds the two to the same words.
SCHEMA_INSTRUCTION = "Answer with JSON only, matching this JSON Schema:\n"


def schema_messages(prompt: str, schema: dict[str, Any], schema_in: str) -> list[dict[str, str]]:
    """The chat for a task: the schema in a system message as `generate` states it (`system`),
    appended to the user's message (`user`), or not stated at all (`none`)."""
    instruction = SCHEMA_INSTRUCTION + json.dumps(schema)
    if schema_in == "system":
        return [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]
    if schema_in == "user":
        return [{"role": "user", "content": f"{prompt}\n\n{instruction}"}]
    return [{"role": "user", "content": prompt}]


@dataclass(frozen=True)
class Options:
    route: str = "generate"
    schema_in: str = "system"  # the openai route only: generate always states it in a system message
    free: bool = False  # the openai route only: no response_format
    temperature: float = 0.0
    max_tokens: int = 512
    concurrency: int = 4

    def check(self) -> None:
        if self.route not in ROUTES:
            raise UsageError(f"unknown route `{self.route}`", f"use one of: {', '.join(ROUTES)}")
        if self.schema_in not in SCHEMA_IN:
            raise UsageError(f"unknown --schema-in `{self.schema_in}`", f"use one of: {', '.join(SCHEMA_IN)}")
        if self.route == "generate" and (self.free or self.schema_in != "system"):
            raise UsageError("--free and --schema-in apply to the openai route: `generate` always constrains "
                             "and states the schema in a system message", "add --route openai")
        if self.concurrency < 1 or self.max_tokens < 1:
            raise UsageError("--concurrency and --max-tokens must be at least 1", "e.g. --concurrency 4")

    @property
    def label(self) -> str:
        """`generate`, `openai/system/constrained`, `openai/none/free`: what was measured, in a word."""
        if self.route == "generate":
            return "generate"
        return f"openai/{self.schema_in}/{'free' if self.free else 'constrained'}"


@dataclass
class Record:
    """One task's answer and its grade."""

    id: str
    tags: list[str]
    valid: bool
    exact: bool
    fields_right: int
    fields_total: int
    finish_reason: str  # stop | length | invalid (generate's own), or "error" when there was no answer
    tokens: int
    latency_ms: float
    output: str | None  # the raw text the model produced
    answer: Any = None  # the JSON graded (None when there was none)
    parsed: bool = False  # whether any JSON was found in the output
    problem: str | None = None  # why it is not valid
    wrong: list[str] = field(default_factory=list)  # paths of the fields it got wrong
    error: str | None = None  # the request failed: a refusal (4xx) or no answer
    status: int | None = None  # the HTTP status of a refusal (REFUSALS); None for a failure
    attempts: int = 1  # generate's samples: more than one when the runtime retried an invalid answer

    @property
    def stopped_invalid(self) -> bool:
        return self.finish_reason == "stop" and not self.valid


@dataclass
class Totals:
    tasks: int
    valid: int
    exact: int
    stopped_invalid: int  # finished (`stop`) and still invalid against the schema: the headline failure
    fields_right: int
    fields_total: int
    field_accuracy: float  # micro: fields right / fields, over every task (an unanswered task gets none right)
    finish_reasons: dict[str, int]
    refused: int  # answered 400/413/422: the task refused (a schema the engine cannot compile, say)
    failed: int  # no answer, or any other error status (401, 404, 5xx after retries)
    completion_tokens: int
    mean_tokens: float
    latency_p50_ms: float
    latency_p95_ms: float
    retried: int = 0  # answers generate sampled more than once (decoding.retries_on_invalid)

    @classmethod
    def of(cls, records: list[Record]) -> Totals:
        answered = [r for r in records if r.error is None]
        right, total = sum(r.fields_right for r in records), sum(r.fields_total for r in records)
        latencies = [r.latency_ms for r in answered]
        tokens = sum(r.tokens for r in answered)
        return cls(
            len(records), sum(r.valid for r in records), sum(r.exact for r in records),
            sum(r.stopped_invalid for r in records), right, total, round(right / total, 4) if total else 0.0,
            dict(Counter(r.finish_reason for r in records).most_common()),
            sum(r.error is not None and r.status is not None for r in records),
            sum(r.error is not None and r.status is None for r in records),
            tokens, round(tokens / len(answered), 1) if answered else 0.0,
            round(percentile(latencies, 0.5), 1) if latencies else 0.0,
            round(percentile(latencies, 0.95), 1) if latencies else 0.0,
            sum(r.attempts > 1 for r in records),
        )


@dataclass
class EvalReport:
    target: str
    tasks_file: str
    options: dict[str, Any]
    model: str | None
    totals: Totals
    by_tag: dict[str, Totals]
    records: list[Record]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"


async def _generate(client: AsyncClient, task: Task, options: Options) -> tuple[str, str, int, Any, int]:
    body = {"prompt": task.prompt, "schema": task.schema, "temperature": options.temperature,
            "max_tokens": options.max_tokens}
    answer = await client.call("generate", "POST", body)
    text = answer["text"]
    parsed = answer["ir_json"] if answer["complete"] else parse_strict(text)
    return text, answer["finish_reason"], int(answer["tokens_used"]), parsed, int(answer.get("attempts", 1))


async def _chat(client: AsyncClient, task: Task, options: Options, model: str) -> tuple[str, str, int, Any, int]:
    body: dict[str, Any] = {"model": model, "messages": schema_messages(task.prompt, task.schema, options.schema_in),
                            "temperature": options.temperature, "max_tokens": options.max_tokens}
    if not options.free:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "answer", "schema": task.schema, "strict": True}}
    answer = await client.call("openai", "POST", body, path="/v1/chat/completions")
    choice = answer["choices"][0]
    text = choice["message"].get("content") or ""
    tokens = int((answer.get("usage") or {}).get("completion_tokens") or 0)
    parsed = first_json(text) if options.free else parse_strict(text)
    return text, choice.get("finish_reason") or "unknown", tokens, parsed, 1


async def _answer(client: AsyncClient, task: Task, options: Options, model: str | None) -> Record:
    started = time.perf_counter()
    try:
        if model is None:
            text, finish, tokens, parsed, attempts = await _generate(client, task, options)
        else:
            text, finish, tokens, parsed, attempts = await _chat(client, task, options, model)
    except (ClientError, KeyError, IndexError, TypeError, ValueError) as exc:
        status = exc.status if isinstance(exc, ClientError) else None
        message = exc.message if isinstance(exc, ClientError) else f"{options.route} answered out of contract: {exc!r}"
        graded = grade(task, NO_JSON)
        return Record(task.id, list(task.tags), False, False, 0, graded.fields_total, "error", 0,
                      round((time.perf_counter() - started) * 1000, 1), None, wrong=graded.wrong, error=message,
                      status=status if status in REFUSALS else None)
    latency = round((time.perf_counter() - started) * 1000, 1)
    graded = grade(task, parsed)
    return Record(task.id, list(task.tags), graded.valid, graded.exact, graded.fields_right, graded.fields_total,
                  finish, tokens, latency, text, None if parsed is NO_JSON else parsed, parsed is not NO_JSON,
                  graded.problem, graded.wrong, attempts=attempts)


async def _served_model(client: AsyncClient) -> str:
    """The model the `openai` endpoint serves (the first of /v1/models)."""
    listing = await client.call("openai", path="/v1/models")
    try:
        return str(listing["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise ClientError(f"openai /v1/models named no model: {str(listing)[:200]}",
                          hint="check that the model has loaded (`liftdeploy warmup`)") from None


async def evaluate(client: AsyncClient, tasks: list[Task], options: Options, *, target: str,
                   tasks_file: str) -> EvalReport:
    """Send every task (at most `options.concurrency` at once), grade the answers, total them."""
    options.check()
    async with client:
        client.endpoints.label(options.route, client.kinds)  # a ClientError naming the endpoints when absent
        model = await _served_model(client) if options.route == "openai" else None
        slots = asyncio.Semaphore(options.concurrency)

        async def one(task: Task) -> Record:
            async with slots:
                return await _answer(client, task, options, model)

        records = list(await asyncio.gather(*(one(task) for task in tasks)))
    tags = sorted({tag for task in tasks for tag in task.tags})
    by_tag = {tag: Totals.of([r for r in records if tag in r.tags]) for tag in tags}
    return EvalReport(target, tasks_file, {**asdict(options), "label": options.label}, model,
                      Totals.of(records), by_tag, records)


def run(client: AsyncClient, tasks: list[Task], options: Options, *, target: str, tasks_file: str) -> EvalReport:
    """`evaluate` on an event loop of its own (what the CLI and benchmarks/eval_matrix.py call)."""
    return asyncio.run(evaluate(client, tasks, options, target=target, tasks_file=tasks_file))


def select(tasks: list[Task], *, ids: str | None = None, tags: str | None = None,
           limit: int | None = None) -> list[Task]:
    """The tasks named by comma-separated `ids`, or carrying one of comma-separated `tags`; the first `limit`."""
    chosen = tasks
    if ids:
        wanted = [i.strip() for i in ids.split(",") if i.strip()]
        known = {task.id for task in tasks}
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise UsageError(f"no task with id `{unknown[0]}`", "the ids are the task file's `id` values")
        chosen = [task for task in chosen if task.id in wanted]
    if tags:
        wanted_tags = {t.strip() for t in tags.split(",") if t.strip()}
        chosen = [task for task in chosen if wanted_tags & set(task.tags)]
    if limit is not None:
        chosen = chosen[:limit]
    if not chosen:
        raise UsageError("no task is left to run after --ids / --tag / --limit", "loosen the filter")
    return chosen


# ## Showing it


def _pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f}%)" if whole else "0/0"


def summary(report: EvalReport) -> str:
    """The totals in a few lines, the headline numbers first."""
    t = report.totals
    finishes = " ".join(f"{reason}={count}" for reason, count in t.finish_reasons.items())
    lines = [
        f"{report.options['label']} on {report.target}" + (f" (model {report.model})" if report.model else ""),
        f"valid {_pct(t.valid, t.tasks)}   exact {_pct(t.exact, t.tasks)}   "
        f"fields {_pct(t.fields_right, t.fields_total)}   stopped-invalid {t.stopped_invalid}",
        f"finish {finishes}   tokens {t.completion_tokens} (mean {t.mean_tokens})   "
        f"latency p50 {t.latency_p50_ms:.0f} ms, p95 {t.latency_p95_ms:.0f} ms",
    ]
    if t.refused or t.failed or t.retried:
        lines.append(f"refused {t.refused}   failed {t.failed}   retried {t.retried}")
    if report.by_tag:
        lines.append("fields by tag: " + "   ".join(f"{tag} {100 * tt.field_accuracy:.0f}% ({tt.tasks})"
                                                    for tag, tt in report.by_tag.items()))
    return "\n".join(lines)


def table(report: EvalReport) -> Any:
    """A rich table: one row per task, then the totals; `stop!` marks a stopped-invalid answer."""
    from rich.table import Table

    def mark(ok: bool) -> str:
        return "✓" if ok else "✗"

    rows = Table(title=f"liftdeploy eval: {report.options['label']}", show_footer=False)
    for name, justify in (("id", "left"), ("valid", "center"), ("exact", "center"), ("fields", "right"),
                          ("finish", "left"), ("tokens", "right"), ("ms", "right")):
        rows.add_column(name, justify=justify, no_wrap=name == "id")  # type: ignore[arg-type]
    for r in report.records:
        rows.add_row(r.id, mark(r.valid), mark(r.exact), f"{r.fields_right}/{r.fields_total}",
                     r.finish_reason + ("!" if r.stopped_invalid else ""), str(r.tokens), f"{r.latency_ms:.0f}")
    t = report.totals
    rows.add_section()
    rows.add_row("total", f"{t.valid}/{t.tasks}", f"{t.exact}/{t.tasks}", f"{t.fields_right}/{t.fields_total}",
                 f"{t.stopped_invalid} stop!", str(t.completion_tokens), f"p50 {t.latency_p50_ms:.0f}")
    return rows


def plot(report: EvalReport, path: Path) -> bool:
    """A PNG: valid / exact / field accuracy / stopped-invalid overall, and field accuracy per tag;
    False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = report.totals
    n = max(t.tasks, 1)
    fig, (overall, tags) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    names = ["valid", "exact", "fields", "stopped-invalid"]
    values = [t.valid / n, t.exact / n, t.field_accuracy, t.stopped_invalid / n]
    overall.bar(names, values, color=["tab:green", "tab:blue", "tab:cyan", "tab:red"])
    overall.set(ylim=(0, 1), ylabel="share of tasks (fields: of fields)", title="Overall")
    overall.tick_params(axis="x", labelrotation=20)
    if report.by_tag:
        tag_names = list(report.by_tag)
        tags.bar(tag_names, [report.by_tag[tag].field_accuracy for tag in tag_names], color="tab:cyan")
        tags.tick_params(axis="x", labelrotation=45)
    tags.set(ylim=(0, 1), ylabel="field accuracy", title="Per tag")
    fig.suptitle(f"{report.options['label']} — {report.target}" + (f" ({report.model})" if report.model else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
