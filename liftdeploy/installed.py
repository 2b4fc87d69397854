"""What is installed here, against what liftdeploy declares in its own metadata (pyproject).

The core install (`pip install liftdeploy`) carries what validate, render, schema, check, plan,
apply, destroy, warmup, smoke and bench import. `serve --local` needs the `local` extra and
`bench` draws its plot with the `bench` extra: a package missing from one of them is an install
to make, reported with the extra that brings it, not a liftdeploy bug. The `modal` client must
be recent enough for the options the rendered modules pass (the floor is measured against real
releases by tests/test_modal_floor.py).

Only the standard library and `packaging` are imported; nothing here imports modal or torch.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

__all__ = ["declared", "extra_of", "extras", "missing", "modal_client_problem"]


def declared() -> list[Requirement]:
    """liftdeploy's requirements as installed; [] for a source tree that was never installed."""
    try:
        lines = metadata.requires("liftdeploy") or []
    except metadata.PackageNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(Requirement(line))
        except InvalidRequirement:
            continue
    return out


def extras() -> list[str]:
    """liftdeploy's extras in pyproject's order, `dev` (everything for the tests) last."""
    try:
        provided = metadata.metadata("liftdeploy").get_all("Provides-Extra") or []
    except metadata.PackageNotFoundError:
        return []
    return sorted(provided, key=lambda extra: extra == "dev")


def _in_extra(req: Requirement, extra: str) -> bool:
    return req.marker is not None and req.marker.evaluate({"extra": extra}) and not req.marker.evaluate({"extra": ""})


def extra_of(module: str) -> str | None:
    """The first extra that brings top-level module `module`, None for a core dependency or unknown."""
    name = canonicalize_name(module.split(".")[0])
    reqs = [r for r in declared() if canonicalize_name(r.name) == name]
    if any(r.marker is None or r.marker.evaluate({"extra": ""}) for r in reqs):
        return None  # a core dependency
    return next((e for e in extras() if any(_in_extra(r, e) for r in reqs)), None)


def missing(extra: str) -> list[str]:
    """The packages of `extra` that cannot be imported here (module name = package name)."""
    names = {canonicalize_name(r.name) for r in declared() if _in_extra(r, extra)}
    return sorted(n for n in names if importlib.util.find_spec(n.replace("-", "_")) is None)


def modal_client_problem() -> tuple[str, str] | None:
    """(message, hint) when the installed `modal` is outside the range liftdeploy declares."""
    spec = next((r.specifier for r in declared() if canonicalize_name(r.name) == "modal" and r.marker is None), None)
    if spec is None:
        return None
    wanted = "modal" + ",".join(sorted(map(str, spec), key=lambda s: not s.startswith(">")))  # floor first
    try:
        version = Version(metadata.version("modal"))
    except metadata.PackageNotFoundError:
        return "the `modal` client is not installed", f"pip install '{wanted}'"
    except InvalidVersion:
        return None
    if spec.contains(version, prereleases=True):
        return None
    floor = min((Version(s.version) for s in spec if s.operator == ">="), default=None)
    why = " (older clients lack options it passes)" if floor and version < floor else ""
    message = f"the installed `modal` client is {version}; the rendered module needs `{wanted}`{why}"
    return message, f"pip install '{wanted}'"
