"""What the last apply deployed, beside the manifest: what `plan` compares against and
`apply` records.

    .liftdeploy/<module>.state.json     one file per target (the base or an env)

`settings(loaded)` is every deployed setting as a flat map; `plan` diffs the state's
settings against a fresh one, and `apply` writes the fresh one after Modal accepted it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._files import write_atomic
from .errors import StepError
from .manifest import Loaded

STATE_DIR = ".liftdeploy"


@dataclass
class State:
    manifest: str
    env: str | None
    manifest_sha256: str
    app_name: str
    environment: str
    tag: str
    app_id: str | None
    urls: dict[str, str]
    settings: dict[str, Any]  # what `plan` compares against
    applied_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


# Manifest keys that do not reach Modal: where `plan` predicts URLs, and the overlays themselves.
NOT_DEPLOYED = {"app.workspace", "app.web_suffix", "env"}


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flat(f"{prefix}.{key}", inner))
        return out
    if isinstance(value, list):
        return {prefix: ", ".join(map(str, value))}
    return {prefix: value}


def settings(loaded: Loaded) -> dict[str, Any]:
    """Every deployed setting as a flat `key: value` map: what plans are compared on, and what
    `apply` trusts when it updates the autoscaler in place, so every key that reaches the
    rendered module is here (a few in a more readable form than the manifest's)."""
    m = loaded.manifest
    out = {k: v for k, v in _flat("", m.model_dump(mode="json", exclude={"endpoints", "secrets"})).items()}
    out = {k.lstrip("."): v for k, v in out.items()}
    out = {k: v for k, v in out.items() if not any(k == n or k.startswith(n + ".") for n in NOT_DEPLOYED)}
    for key in [k for k in out if k.startswith(("image.pins.", "image.packages", "volumes.", "scaling.business_hours",
                                                "compute.gpu"))]:
        del out[key]
    if out.get("engine.kind") == "vllm":
        del out["engine.kind"]  # vLLM: as before there were engines, so earlier states still match
    out["compute.gpu"] = " → ".join(m.gpu_chain())  # `any` expanded: what Modal gets
    out["image.base"] = m.image.base or "debian_slim"
    out["model.reasoning_parser"] = m.model.parser if m.model.thinking else None
    out.update({f"image.{req.partition('==')[0]}": req.partition("==")[2] for req in m.image.requirements()})
    for role in ("weights", "compile_cache"):
        volume = getattr(m.volumes, role)
        if volume:
            out[f"volumes.{role}"] = f"{volume.name} at {volume.mount}" + (
                "" if volume.create_if_missing else " (must exist)")
    hours = m.scaling.business_hours
    if hours:
        out["scaling.business_hours"] = (f"{hours.start}–{hours.end} {hours.timezone}, days {hours.days}: "
                                         f"min_containers {hours.min_containers}"
                                         + (f", buffer_containers {hours.buffer_containers}"
                                            if hours.buffer_containers is not None else ""))
    out.update({f"endpoints.{ep.label}": f"{ep.kind.value}, auth={ep.auth.value}" for ep in m.endpoints})
    for name in m.secrets.all_names:
        keys = m.secrets.required_keys(name)
        out[f"secrets.{name}"] = f"required keys {', '.join(keys)}" if keys else "no required keys"
    return dict(sorted((k, v) for k, v in out.items() if v is not None))


def tag_for(loaded: Loaded) -> str:
    """The deployment tag: the manifest's content hash, so Modal's history names the manifest."""
    return f"manifest-{loaded.sha256[:12]}"


def state_path(loaded: Loaded) -> Path:
    """`.liftdeploy/<module>.state.json` beside the manifest; commit it or ignore it."""
    return loaded.path.parent / STATE_DIR / f"{loaded.module_name}.state.json"


def read_state(loaded: Loaded) -> State | None:
    path = state_path(loaded)
    try:
        return State(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise StepError("read state", f"{path} is unreadable ({exc})", f"delete {path} to plan from scratch") from None


def record(loaded: Loaded, app_id: str | None, urls: dict[str, str]) -> State:
    """Write the state of an apply that Modal accepted."""
    m = loaded.manifest
    state = State(str(loaded.path), loaded.env, loaded.sha256, m.app.name, m.app.environment, tag_for(loaded),
                  app_id, urls, settings(loaded))
    write_atomic(state_path(loaded), json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")
    return state


def forget(loaded: Loaded) -> None:
    """After `destroy`: nothing is deployed, so no state."""
    state_path(loaded).unlink(missing_ok=True)
