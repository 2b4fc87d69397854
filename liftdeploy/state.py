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


def settings(loaded: Loaded) -> dict[str, Any]:
    """Every deployed setting as a flat `key: value` map: what plans are compared on."""
    m = loaded.manifest
    out: dict[str, Any] = {
        "app.name": m.app.name,
        "app.environment": m.app.environment,
        "engine.kind": None if str(m.engine.kind) == "vllm" else str(m.engine.kind),  # vLLM: as before engines
        "model.id": m.model.id,
        "model.revision": m.model.revision,
        "model.dtype": m.model.dtype.value,
        "model.max_model_len": m.model.max_model_len,
        "model.quantization": m.model.quantization,
        "model.tensor_parallel_size": m.model.tensor_parallel_size,
        "model.thinking": m.model.thinking,
        "model.reasoning_parser": m.model.parser if m.model.thinking else None,
        "compute.gpu": " → ".join(m.gpu_chain()),
        "compute.cpu": m.compute.cpu,
        "compute.memory": m.compute.memory,
        "image.python": m.image.python,
        "image.base": m.image.base or "debian_slim",
    }
    out.update({f"image.{req.partition('==')[0]}": req.partition("==")[2] for req in m.image.requirements()})
    for role in ("weights", "compile_cache"):
        volume = getattr(m.volumes, role)
        if volume:
            out[f"volumes.{role}"] = f"{volume.name} at {volume.mount}"
    out.update({f"scaling.{k}": v for k, v in m.scaling.model_dump(exclude={"business_hours"}).items()})
    hours = m.scaling.business_hours
    if hours:
        out["scaling.business_hours"] = (f"{hours.start}–{hours.end} {hours.timezone}, days {hours.days}: "
                                         f"min_containers {hours.min_containers}"
                                         + (f", buffer_containers {hours.buffer_containers}"
                                            if hours.buffer_containers is not None else ""))
    out.update({f"concurrency.{k}": v for k, v in m.concurrency.model_dump().items()})
    out.update({f"cold_start.{k}": v for k, v in m.cold_start.model_dump().items()})
    out.update({f"endpoints.{ep.label}": f"{ep.kind.value}, auth={ep.auth.value}" for ep in m.endpoints})
    for name in m.secrets.all_names:
        keys = m.secrets.required_keys(name)
        out[f"secrets.{name}"] = f"required keys {', '.join(keys)}" if keys else "no required keys"
    return {k: v for k, v in out.items() if v is not None}


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
