"""Deploy through Modal's Python API; `state` records what each apply deployed.

`apply` = check → render → deploy → record state → warm-up → smoke test. The module is
rendered into a temporary folder and deployed from there; only after Modal accepted it
are the rendered file beside the manifest and the state file replaced (atomically), so a
failure at any step leaves the previous render and state as they were. When every change
since the last apply is an autoscaler setting, `apply` hands them to Modal's autoscaler
(`update_autoscaler`) instead of deploying: no new containers, no cold start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .errors import StepError
from .manifest import Endpoint, EndpointKind, Loaded
from .render import ident, output_path, render, write_atomic
from .state import forget, read_state, record, state_path, tag_for
from .urls import modal_urls

# ## Deploying


def import_module(path: Path) -> ModuleType:
    name = f"liftdeploy_deploy_{path.stem}_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise StepError("import", f"the rendered module does not import: {type(exc).__name__}: {exc}",
                        "check that `python -c 'import modal'` works here; if it does, report a liftdeploy bug"
                        ) from None
    return module


@contextlib.contextmanager
def rendered_module(loaded: Loaded) -> Iterator[tuple[Path, str]]:
    """The fresh render in a temporary folder, under its final file name."""
    with tempfile.TemporaryDirectory(prefix="liftdeploy-apply-") as tmp:
        text = render(loaded)
        path = Path(tmp) / f"{loaded.module_name}.py"
        write_atomic(path, text)
        yield path, text


def web_urls(module: ModuleType, endpoints: list[Endpoint]) -> dict[str, str]:
    """The URL Modal assigned to each endpoint label, read from the deployed functions."""
    urls = {}
    for ep in endpoints:
        name = ident(ep.label)
        try:
            target = getattr(module, name) if ep.kind is EndpointKind.health else getattr(module.Inference(), name)
            url = target.get_web_url()
        except Exception:  # an older client or an unhydrated handle: fall back to the manifest's scheme
            url = None
        if url:
            urls[ep.label] = url
    return urls


def deploy(loaded: Loaded, path: Path) -> tuple[str | None, dict[str, str]]:
    """`app.deploy()` of the module at `path`; returns the app id and the endpoint URLs."""
    import modal
    import modal.exception

    module = import_module(path)
    app = module.app
    m = loaded.manifest
    try:
        with modal.enable_output():
            app.deploy(name=m.app.name, environment_name=m.app.environment, tag=tag_for(loaded))
    except modal.exception.AuthError as exc:
        raise StepError("deploy", f"Modal refused the credentials: {exc}", "run `modal token new`") from None
    except Exception as exc:  # modal's errors, OSError, grpclib's: a failed deploy, not a crash
        raise StepError("deploy", f"{type(exc).__name__}: {exc}",
                        "nothing was changed locally; fix and re-run apply") from None
    return app.app_id, web_urls(module, m.endpoints)


def update_autoscaler(loaded: Loaded) -> str:
    """Give the GPU class of the deployed app [scaling]'s autoscaler settings, without a deploy
    (https://modal.com/docs/guide/scale#dynamic-autoscaler-updates); returns what Modal now has."""
    import warnings

    import modal
    import modal.exception

    m, s = loaded.manifest, loaded.manifest.scaling
    wanted = {"min_containers": s.min_containers, "max_containers": s.max_containers,
              "buffer_containers": s.buffer_containers, "scaledown_window": s.scaledown_window}
    try:
        inference = modal.Cls.from_name(m.app.name, "Inference", environment_name=m.app.environment)()
        with warnings.catch_warnings():  # modal's Cls method calls its own deprecated Function method
            warnings.simplefilter("ignore", modal.exception.DeprecationError)
            now = inference.update_autoscaler(**{k: v for k, v in wanted.items() if v is not None})
    except modal.exception.NotFoundError as exc:
        raise StepError("autoscaler", f"the deployed app has no GPU class to update: {exc}",
                        "deploy it first: delete the state file and re-run apply") from None
    except Exception as exc:  # modal's errors, grpclib's: nothing changed locally
        raise StepError("autoscaler", f"{type(exc).__name__}: {exc}",
                        "nothing was changed locally; re-run apply") from None
    return ", ".join(f"{k} {getattr(now, k)}" for k in wanted if getattr(now, k, None) is not None)


def modal_serve(loaded: Loaded) -> int:
    """`modal serve` of the rendered module, with hot reload."""
    path = output_path(loaded)
    write_atomic(path, render(loaded))
    cmd = [sys.executable, "-m", "modal", "serve", str(path)]
    if loaded.manifest.app.environment:
        cmd += ["--env", loaded.manifest.app.environment]
    return subprocess.call(cmd)


def destroy(loaded: Loaded) -> int:
    """Stop the Modal app (`modal app stop`); once it is stopped, forget the last apply's state,
    so that `plan` no longer claims the deployment matches."""
    m = loaded.manifest
    stop = [sys.executable, "-m", "modal", "app", "stop", m.app.name, "--env", m.app.environment, "--yes"]
    code = subprocess.call(stop)
    if code == 0:
        forget(loaded)
    return code


# ## apply


@dataclass
class Step:
    name: str
    seconds: float
    detail: str = ""


def apply(loaded: Loaded, *, verify: bool = True, warmup_timeout: float = 600.0, in_place: bool = False,
          on_step: Callable[[Step], None] = lambda step: None,
          progress: Callable[[float, str], None] | None = None) -> list[Step]:
    """Render → deploy (or, `in_place`, update the autoscaler) → record state → warm-up → smoke.
    The caller has run `check` first, and planned `in_place` (`plan.in_place`)."""
    from . import verify as verifying
    from .client import Client, Endpoints, Timeouts

    steps: list[Step] = []

    def done(name: str, started: float, detail: str = "") -> None:
        steps.append(Step(name, time.monotonic() - started, detail))
        on_step(steps[-1])

    with rendered_module(loaded) as (path, text):
        started = time.monotonic()
        previous = read_state(loaded) if in_place else None
        if previous is not None:
            done("update autoscaler", started, update_autoscaler(loaded))
            app_id, urls = previous.app_id, previous.urls
        else:
            app_id, urls = deploy(loaded, path)
            done("deploy", started, app_id or "")
        started = time.monotonic()
        write_atomic(output_path(loaded), text)
        record(loaded, app_id, urls)
        done("record state", started, str(state_path(loaded)))
    if not verify:
        return steps
    m = loaded.manifest
    missing = [ep.label for ep in m.endpoints if ep.label not in urls]
    if missing:
        if not m.app.workspace:
            raise StepError("warm-up", f"Modal returned no URL for {', '.join(missing)}",
                            "set `app.workspace`, or run `liftdeploy warmup URL` yourself")
        urls = {**modal_urls(m.app.workspace, m.app.assumed_web_suffix, m.endpoints), **urls}
    client = Client(Endpoints.at(urls, m.endpoints), Endpoints.kinds(m.endpoints),
                    timeouts=Timeouts(cold_read=warmup_timeout))
    with client:
        started = time.monotonic()
        if any(ep.kind == "warmup" for ep in m.endpoints):
            answer = verifying.warmup(client, deadline=warmup_timeout, progress=progress)
            done("warm-up", started, f"model loaded in {answer.get('load_seconds') or 0:.1f} s")
        started = time.monotonic()
        result = verifying.smoke(client)
        done("smoke test", started, f"finish_reason={result.generation.finish_reason}")
    return steps
