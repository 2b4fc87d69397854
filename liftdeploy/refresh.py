"""Regenerate the release knowledge bases (``liftdeploy/data/<engine>_releases.json``) from the
real package index.

The knowledge bases are *derived*, never typed: for every release of a serving engine (vLLM from
0.6.0 on, SGLang from 0.4.0 on) we read the core metadata (``METADATA``) of its Linux x86_64
wheel and keep what matters for a deployment: ``Requires-Python`` and the requirement specifiers
on the packages that engine's deployments pin (torch, transformers, xgrammar, ...), plus the
released and yanked versions of those packages, for hints.

An engine whose serving runtime sits behind an extra (``sglang[srt]`` up to 0.4.x, ``sglang[all]``)
gets, per such extra, the specifiers that the extra changes (with every extra it pulls in).

How the index is read is in :mod:`liftdeploy._index`: each release's METADATA comes from its PEP 658
metadata file, else from the wheel itself by HTTP range requests (its central directory and
that one member), else from pip. Fetching and parsing are separate, so
:func:`record_from_metadata` is testable offline on a recorded METADATA file.

    python -m liftdeploy.refresh                      # every engine
    python -m liftdeploy.refresh --project sglang     # one engine
    python -m liftdeploy.refresh --project vllm 0.9.2 0.12.0
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from ._index import (  # noqa: F401  (re-exported: the refresh's public surface)
    DEFAULT_INDEX_URL,
    CoreMetadata,
    Fetch,
    RefreshError,
    configured_index_url,
    default_fetch,
    describe_index,
    known_versions,
    metadata_text,
    parse_metadata,
    parse_simple_page,
    pip_report_metadata,
    project_files,
    releases_from_files,
    wheel_metadata,
    yanked_versions,
)

PYTHON_MINORS = tuple(f"3.{m}" for m in range(8, 16))

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Project:
    """A serving engine whose releases the knowledge base records."""

    name: str
    floor: str
    """Oldest release recorded (the oldest liftdeploy supports)."""
    tracked: tuple[str, ...]
    """Dependencies whose specifiers are recorded for each release."""
    known_versions_of: Mapping[str, str] = field(default_factory=dict)
    """Packages whose released versions (from this floor on) are recorded, for hints."""
    extras: tuple[str, ...] = ()
    """Extras whose effect on the tracked specifiers is recorded (with the extras they pull in)."""

    @property
    def data_file(self) -> Path:
        return DATA_DIR / f"{self.name}_releases.json"


VLLM = Project(
    "vllm",
    floor="0.6.0",
    tracked=("torch", "transformers", "xgrammar"),
    known_versions_of={"transformers": "4.40.0", "torch": "2.4.0", "xgrammar": "0.1.0"},
)
SGLANG = Project(
    "sglang",
    floor="0.4.0",  # the first release with the xgrammar grammar backend
    tracked=(
        "torch", "transformers", "xgrammar", "flashinfer-python", "sgl-kernel", "llguidance", "outlines",
        "torch-memory-saver",
    ),
    known_versions_of={
        "transformers": "4.40.0", "torch": "2.4.0", "xgrammar": "0.1.0", "flashinfer-python": "0.2.0",
        "sgl-kernel": "0.0.1", "llguidance": "0.6.0",
    },
    extras=("srt", "all"),  # `srt` held the runtime up to 0.4.x; the seeds install `sglang[all]`
)  # fmt: skip
PROJECTS: dict[str, Project] = {p.name: p for p in (VLLM, SGLANG)}

# Kept for callers of the vLLM-only refresh.
MIN_VLLM = Version(VLLM.floor)
TRACKED = VLLM.tracked
DATA_FILE = VLLM.data_file


# --------------------------------------------------------------------------------------------
# Records (pure)
# --------------------------------------------------------------------------------------------


def linux_x86_64_env(python_version: str) -> dict[str, str]:
    """Marker environment of CPython on Linux x86_64 (what a Modal GPU container runs)."""
    return {
        "implementation_name": "cpython",
        "implementation_version": python_version + ".0",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": python_version + ".0",
        "python_version": python_version,
        "sys_platform": "linux",
        "extra": "",
    }


def _supported_pythons(requires_python: str) -> list[str]:
    spec = SpecifierSet(requires_python or "")
    return [p for p in PYTHON_MINORS if spec.contains(p + ".0", prereleases=True)]


def _requirements(requires_dist: Iterable[str]) -> list[Requirement]:
    out = []
    for line in requires_dist:
        try:
            out.append(Requirement(line))
        except InvalidRequirement:
            continue  # not PEP 508: no pip could install it either
    return out


def _holds(req: Requirement, env: Mapping[str, str], extras: Iterable[str]) -> bool:
    """Whether ``req`` applies in ``env`` for an install with ``extras`` (base requirements always)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in ("", *extras))


def extra_closure(requires_dist: Iterable[str], project: str, extra: str, env: Mapping[str, str]) -> set[str]:
    """``extra`` and every extra it pulls in through self-references (``sglang[runtime_common]; extra == "srt"``)."""
    reqs = _requirements(requires_dist)
    want = canonicalize_name(project)
    found = {canonicalize_name(extra)}
    todo = list(found)
    while todo:
        current = todo.pop()
        for req in reqs:
            if canonicalize_name(req.name) != want or req.marker is None:
                continue
            if not req.marker.evaluate({**env, "extra": current}):
                continue
            for more in map(canonicalize_name, req.extras):
                if more not in found:
                    found.add(more)
                    todo.append(more)
    return found


def _specifier_for(
    requires_dist: Iterable[str], package: str, env: Mapping[str, str], extras: Iterable[str] = ()
) -> str | None:
    """The combined specifier of ``package`` among the requirements that hold in ``env`` for an
    install with ``extras``; ``None`` when it is not a dependency there."""
    want = canonicalize_name(package)
    extras = tuple(extras)
    parts: list[str] = []
    seen = False
    for req in _requirements(requires_dist):
        if canonicalize_name(req.name) != want or not _holds(req, env, extras):
            continue  # another package, platform-specific, another python, or another extra
        seen = True
        if str(req.specifier):
            parts.append(str(req.specifier))
    if not seen:
        return None
    return str(SpecifierSet(",".join(parts)))


def record_from_metadata(meta: CoreMetadata | str, project: Project = VLLM) -> dict[str, Any]:
    """One release record from core metadata (pure; no network).

    Markers are evaluated for CPython on Linux x86_64 at each Python minor that the release
    supports; the record keeps the specifier at the newest supported Python and, only when the
    specifier differs between Pythons, a ``by_python`` map. For a project with ``extras``, the
    record also lists the tracked packages the plain install requires (``requires``), the extras
    the release provides, and, per recorded extra it provides, the tracked packages whose
    specifier installing it adds or changes (``extras``).
    """
    if isinstance(meta, str):
        meta = parse_metadata(meta)
    pythons = _supported_pythons(meta.requires_python) or ["3.12"]
    record: dict[str, Any] = {
        "version": meta.version,
        "requires_python": str(SpecifierSet(meta.requires_python)) if meta.requires_python else "",
    }
    by_python: dict[str, dict[str, str]] = {}
    for package in project.tracked:
        per = {py: _specifier_for(meta.requires_dist, package, linux_x86_64_env(py)) for py in pythons}
        newest = per[pythons[-1]]
        record[package] = newest if newest is not None else ""
        if len(set(per.values())) > 1:
            by_python[package] = {py: (s if s is not None else "") for py, s in per.items()}
    if by_python:
        record["by_python"] = by_python
    if project.extras:
        env = linux_x86_64_env(pythons[-1])
        base = {package: _specifier_for(meta.requires_dist, package, env) for package in project.tracked}
        record["requires"] = [package for package, spec in base.items() if spec is not None]
        provided = sorted({canonicalize_name(e) for e in meta.provides_extras})
        record["provides_extras"] = provided
        changes: dict[str, dict[str, str]] = {}
        for extra in map(canonicalize_name, project.extras):
            if extra not in provided:
                continue
            closure = extra_closure(meta.requires_dist, project.name, extra, env)
            for package in project.tracked:
                spec = _specifier_for(meta.requires_dist, package, env, closure)
                if spec is not None and spec != base[package]:
                    changes.setdefault(extra, {})[package] = spec
        if changes:
            record["extras"] = changes
    return record


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def refresh(
    path: str | os.PathLike[str] | None = None,
    *,
    project: str | Project = "vllm",
    versions: Iterable[str] | None = None,
    index_url: str | None = None,
    fetch: Fetch | None = None,
    workers: int = 8,
    use_pip_fallback: bool = True,
) -> dict[str, Any]:
    """Read every release's real dependency metadata from the index and rewrite the project's
    data file (``path``, default the packaged ``data/<project>_releases.json``). ``versions``
    limits the refresh to those releases. Returns the written document."""
    started = time.perf_counter()
    proj = project if isinstance(project, Project) else PROJECTS[project]
    index_url = (index_url or configured_index_url()).rstrip("/")
    fetch = fetch or default_fetch()
    target = Path(path) if path is not None else proj.data_file

    files = project_files(index_url, proj.name, fetch)
    rels = releases_from_files(files, proj.name)
    if versions is not None:
        wanted = {Version(v) for v in versions}
        missing = wanted - set(rels)
        if missing:
            raise RefreshError(f"not on the index: {proj.name} {', '.join(sorted(map(str, missing)))}")
        rels = {v: f for v, f in rels.items() if v in wanted}
    else:
        rels = {v: f for v, f in rels.items() if v >= Version(proj.floor)}

    def one(item: tuple[Version, dict[str, Any]]) -> dict[str, Any]:
        version, file = item
        got = metadata_text(file, fetch)
        from_wheel = None if got is not None else wheel_metadata(file, fetch)
        if got is not None:
            meta, how = parse_metadata(got[0]), got[1]
        elif from_wheel is not None:
            meta, how = parse_metadata(from_wheel), "wheel-range"
        elif use_pip_fallback:
            meta, how = pip_report_metadata(proj.name, str(version), index_url), "pip-report"
        else:
            raise RefreshError(f"no metadata file for {proj.name} {version} and the pip fallback is off")
        if Version(meta.version) != version:
            raise RefreshError(f"metadata of {proj.name} {version} says version {meta.version}")
        record = record_from_metadata(meta, proj)
        record["wheel"] = file["filename"]
        record["metadata_from"] = how
        if file.get("upload-time"):
            record["uploaded"] = str(file["upload-time"])[:10]
        return record

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        records = list(pool.map(one, rels.items()))

    known: dict[str, list[str]] = {}
    yanked: dict[str, dict[str, str]] = {proj.name: yanked_versions(files, proj.name, proj.floor)}
    for package, floor in proj.known_versions_of.items():
        package_files = project_files(index_url, package, fetch)
        known[package] = known_versions(package_files, package, floor)
        yanked[package] = yanked_versions(package_files, package, floor)

    extras = f"; extras {', '.join(proj.extras)} recorded apart" if proj.extras else "; extras ignored"
    doc: dict[str, Any] = {
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "project": proj.name,
        "source": {
            "index": describe_index(index_url),
            "method": "Simple API (PEP 691/503) + PEP 658 core metadata of each release's Linux "
            "x86_64 wheel; markers evaluated for CPython on Linux x86_64" + extras,
            "generator": "liftdeploy.refresh",
        },
        "seconds": round(time.perf_counter() - started, 2),
        "releases": records,
        "known_versions": known,
        "yanked": yanked,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return doc


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--project",
        action="append",
        choices=sorted(PROJECTS),
        help="the engine to refresh (repeatable); default: every engine",
    )
    ap.add_argument("--path", default=None, help="where to write (one project only)")
    ap.add_argument("--index-url", default=None)
    ap.add_argument("versions", nargs="*", help="only these releases (one project only)")
    args = ap.parse_args(argv)
    names = args.project or sorted(PROJECTS)
    if (args.versions or args.path) and len(names) != 1:
        ap.error("versions and --path need exactly one --project")
    for name in names:
        doc = refresh(args.path, project=name, versions=args.versions or None, index_url=args.index_url)
        print(f"{name}: {len(doc['releases'])} releases from {doc['source']['index']} in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
