"""Regenerate ``liftdeploy/data/vllm_releases.json`` from the real package index.

The knowledge base is *derived*, never typed: for every vLLM release from 0.6.0 on, we read
the core metadata (``METADATA``) of its Linux x86_64 wheel and keep what matters for a
deployment: ``Requires-Python`` and the requirement specifiers on torch, transformers and
xgrammar.

How the index is reached
------------------------
Only through pip's configured index (``PIP_INDEX_URL`` or ``index-url`` in pip's config
files); with nothing configured pip uses PyPI's public Simple API, and so do we.

* Project pages are read with the Simple API, asking for PEP 691 JSON and accepting the
  PEP 503 HTML form too (``file://`` mirrors serve HTML).
* Each wheel's ``METADATA`` is read from its PEP 658 ``.metadata`` file, so no 380 MB wheel is
  downloaded. Some mirrors serve the ``.metadata`` file without advertising it
  (``core-metadata`` missing from the listing); we try it anyway when not advertised.
* If the index has no metadata file for a release, we fall back to
  ``pip install --dry-run --no-deps --ignore-installed --report - vllm==X``.

Fetching (network) and parsing (:func:`parse_metadata`, :func:`record_from_metadata`) are
separate, so the parsing is testable offline on a recorded METADATA file.
"""

from __future__ import annotations

import configparser
import datetime as _dt
import email.parser
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

DEFAULT_INDEX_URL = "https://pypi.org/simple"
"""What pip uses when no index is configured."""

MIN_VLLM = Version("0.6.0")
TRACKED = ("torch", "transformers", "xgrammar")
"""Dependencies whose specifiers are recorded for each release."""

KNOWN_VERSIONS_OF = {"transformers": "4.40.0", "torch": "2.4.0", "xgrammar": "0.1.0"}
"""Packages whose released versions (from this floor on) are recorded, for hints."""

PYTHON_MINORS = tuple(f"3.{m}" for m in range(8, 16))

DATA_FILE = Path(__file__).resolve().parent / "data" / "vllm_releases.json"

SIMPLE_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
)

Fetch = Callable[[str, Mapping[str, str]], bytes]
"""``fetch(url, headers) -> body``; raises :class:`FileNotFoundError` on a 404."""


class RefreshError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# pip configuration
# --------------------------------------------------------------------------------------------


def _pip_config_files() -> list[Path]:
    """pip's config files in increasing priority (global, user, site), as pip documents them."""
    if os.environ.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    files: list[Path] = []
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep)
    files += [Path(d) / "pip" / "pip.conf" for d in xdg_dirs if d]
    files.append(Path("/etc/pip.conf"))
    home = Path.home()
    files.append(home / ".pip" / "pip.conf")
    xdg_home = os.environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    files.append(Path(xdg_home) / "pip" / "pip.conf")
    files.append(Path(sys.prefix) / "pip.conf")
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    return files


def configured_index_url(env: Mapping[str, str] | None = None, files: Iterable[Path] | None = None) -> str:
    """The index pip would use: ``PIP_INDEX_URL``, else ``index-url`` from pip's config files
    (``[install]`` over ``[global]``, later files over earlier ones), else PyPI's Simple API."""
    env = os.environ if env is None else env
    if env.get("PIP_INDEX_URL"):
        return env["PIP_INDEX_URL"].split()[0].rstrip("/")
    found: str | None = None
    for path in _pip_config_files() if files is None else files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (OSError, configparser.Error):
            continue
        for section in ("global", "install"):
            if parser.has_option(section, "index-url"):
                found = parser.get(section, "index-url").split()[0]
    return (found or DEFAULT_INDEX_URL).rstrip("/")


# --------------------------------------------------------------------------------------------
# Parsing (pure)
# --------------------------------------------------------------------------------------------


@dataclass
class CoreMetadata:
    name: str
    version: str
    requires_python: str
    requires_dist: list[str] = field(default_factory=list)


def parse_metadata(text: str) -> CoreMetadata:
    """Parse a wheel's METADATA (RFC 822 headers; the body is the long description)."""
    msg = email.parser.HeaderParser().parsestr(text)
    return CoreMetadata(
        name=str(msg.get("Name", "")).strip(),
        version=str(msg.get("Version", "")).strip(),
        requires_python=str(msg.get("Requires-Python", "") or "").strip(),
        requires_dist=[str(v).strip() for v in msg.get_all("Requires-Dist") or []],
    )


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


def _specifier_for(requires_dist: Iterable[str], package: str, env: Mapping[str, str]) -> str | None:
    """The combined specifier of ``package`` among base (non-extra) requirements whose markers
    hold in ``env``; ``None`` when it is not a dependency there."""
    want = canonicalize_name(package)
    parts: list[str] = []
    seen = False
    for line in requires_dist:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != want:
            continue
        if req.marker is not None and not req.marker.evaluate(dict(env)):
            continue  # platform-specific, another python, or only in an extra
        seen = True
        if str(req.specifier):
            parts.append(str(req.specifier))
    if not seen:
        return None
    return str(SpecifierSet(",".join(parts)))


def record_from_metadata(meta: CoreMetadata | str) -> dict[str, Any]:
    """One release record from core metadata (pure; no network).

    Markers are evaluated for CPython on Linux x86_64 at each Python minor that the release
    supports; the record keeps the specifier at the newest supported Python and, only when the
    specifier differs between Pythons, a ``by_python`` map.
    """
    if isinstance(meta, str):
        meta = parse_metadata(meta)
    pythons = _supported_pythons(meta.requires_python) or ["3.12"]
    record: dict[str, Any] = {
        "version": meta.version,
        "requires_python": str(SpecifierSet(meta.requires_python)) if meta.requires_python else "",
    }
    by_python: dict[str, dict[str, str]] = {}
    for package in TRACKED:
        per = {py: _specifier_for(meta.requires_dist, package, linux_x86_64_env(py)) for py in pythons}
        newest = per[pythons[-1]]
        record[package] = newest if newest is not None else ""
        if len(set(per.values())) > 1:
            by_python[package] = {py: (s if s is not None else "") for py, s in per.items()}
    if by_python:
        record["by_python"] = by_python
    return record


class _AnchorParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.files: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "a":
            return
        a = dict(attrs)
        href = a.get("href") or ""
        entry: dict[str, Any] = {"url": href, "filename": ""}
        core = a.get("data-core-metadata") or a.get("data-dist-info-metadata")
        if core is not None:
            entry["core-metadata"] = _hash_attr(core)
        if a.get("data-requires-python") is not None:
            entry["requires-python"] = a["data-requires-python"]
        if "data-yanked" in a:
            entry["yanked"] = a["data-yanked"] or True
        frag = urllib.parse.urlsplit(href).fragment
        if "=" in frag:
            algo, digest = frag.split("=", 1)
            entry["hashes"] = {algo: digest}
        self._current = entry

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self._current["filename"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._current is not None:
            self._current["filename"] = self._current["filename"].strip()
            self.files.append(self._current)
            self._current = None


def _hash_attr(value: str) -> bool | dict[str, str]:
    if value in ("", "true"):
        return True
    if "=" in value:
        algo, digest = value.split("=", 1)
        return {algo: digest}
    return True


def parse_simple_page(body: bytes, page_url: str) -> list[dict[str, Any]]:
    """Files of a Simple API project page (PEP 691 JSON or PEP 503 HTML), with absolute URLs."""
    text = body.decode("utf-8")
    if text.lstrip().startswith("{"):
        files = json.loads(text)["files"]
    else:
        parser = _AnchorParser()
        parser.feed(text)
        files = parser.files
    base = page_url if page_url.endswith("/") else page_url + "/"
    out = []
    for f in files:
        f = dict(f)
        f["url"] = urllib.parse.urljoin(base, f["url"]).split("#", 1)[0]
        if not f.get("filename"):
            f["filename"] = urllib.parse.unquote(f["url"].rsplit("/", 1)[-1])
        out.append(f)
    return out


def _wheel_rank(filename: str) -> int | None:
    """Higher is better for Linux x86_64; ``None`` for a wheel that cannot run there."""
    try:
        _, _, _, tags = parse_wheel_filename(filename)
    except (InvalidWheelFilename, InvalidVersion):
        return None
    platforms = {t.platform for t in tags}
    if any(p.endswith("_x86_64") and ("manylinux" in p or p.startswith("linux")) for p in platforms):
        return 2
    if "any" in platforms:
        return 1
    return None


def releases_from_files(files: Iterable[Mapping[str, Any]], project: str) -> dict[Version, dict[str, Any]]:
    """Per final release, the best file to read metadata from: a Linux x86_64 (or pure) wheel,
    else the sdist (metadata only via the pip fallback). Yanked files are skipped."""
    best: dict[Version, tuple[int, dict[str, Any]]] = {}
    want = canonicalize_name(project)
    for f in files:
        if f.get("yanked"):
            continue
        name = f["filename"]
        if name.endswith(".whl"):
            try:
                pname, version, _, _ = parse_wheel_filename(name)
            except (InvalidWheelFilename, InvalidVersion):
                continue  # not a wheel of a PEP 440 version: not one we can use
            rank = _wheel_rank(name)
            if rank is None or pname != want:
                continue
        elif name.endswith((".tar.gz", ".zip")):
            stem = name[: -len(".tar.gz")] if name.endswith(".tar.gz") else name[: -len(".zip")]
            pname_s, _, ver_s = stem.rpartition("-")
            if canonicalize_name(pname_s) != want:
                continue
            try:
                version = Version(ver_s)
            except InvalidVersion:
                continue
            rank = 0
        else:
            continue
        if version.is_prerelease or version.is_devrelease or version.local:
            continue
        if version not in best or rank > best[version][0]:
            best[version] = (rank, dict(f))
    return {v: f for v, (_, f) in sorted(best.items())}


# --------------------------------------------------------------------------------------------
# Fetching (network)
# --------------------------------------------------------------------------------------------


def default_fetch(timeout: float = 30.0) -> Fetch:
    """A fetcher for ``http(s)://`` (httpx, honouring pip's ``PIP_CERT``) and ``file://`` URLs."""
    import httpx  # only refresh needs it

    verify: Any = True
    if os.environ.get("PIP_CERT"):
        import ssl

        verify = ssl.create_default_context(cafile=os.environ["PIP_CERT"])
    client = httpx.Client(timeout=timeout, follow_redirects=True, verify=verify)

    def fetch(url: str, headers: Mapping[str, str]) -> bytes:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "file":
            path = Path(urllib.parse.unquote(parts.path))
            if path.is_dir():
                path = path / "index.html"
            return path.read_bytes()  # FileNotFoundError is the 404
        resp = client.get(url, headers=dict(headers))
        if resp.status_code == 404:
            raise FileNotFoundError(url)
        resp.raise_for_status()
        return resp.content

    return fetch


def project_files(index_url: str, project: str, fetch: Fetch) -> list[dict[str, Any]]:
    page = f"{index_url.rstrip('/')}/{canonicalize_name(project)}/"
    return parse_simple_page(fetch(page, {"Accept": SIMPLE_ACCEPT}), page)


def metadata_text(file: Mapping[str, Any], fetch: Fetch) -> tuple[str, str] | None:
    """``(METADATA text, how)`` from the file's PEP 658 metadata file, or ``None`` when the
    index has none. Verifies the advertised hash."""
    advertised = file.get("core-metadata", file.get("data-dist-info-metadata"))
    if advertised is False or not str(file["filename"]).endswith(".whl"):
        return None
    try:
        body = fetch(file["url"] + ".metadata", {})
    except FileNotFoundError:
        return None
    if isinstance(advertised, dict):
        for algo, digest in advertised.items():
            if algo in hashlib.algorithms_available and hashlib.new(algo, body).hexdigest() != digest:
                raise RefreshError(f"hash mismatch for {file['url']}.metadata")
    how = "pep658" if advertised else "pep658-unadvertised"
    return body.decode("utf-8"), how


def pip_report_metadata(
    project: str, version: str, index_url: str | None = None, timeout: float = 900
) -> CoreMetadata:
    """Fallback: ask pip (which may download the wheel) for the release's metadata."""
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
        "--ignore-requires-python", "--quiet", "--report", "-",
        "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux1_x86_64",
        f"{project}=={version}",
    ]  # fmt: skip
    if index_url:
        cmd[4:4] = ["--index-url", index_url]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RefreshError(f"pip could not report {project}=={version}: {proc.stderr.strip()[-2000:]}")
    report = json.loads(proc.stdout)
    meta = report["install"][0]["metadata"]
    return CoreMetadata(
        name=meta.get("name", project),
        version=meta.get("version", version),
        requires_python=meta.get("requires_python", "") or "",
        requires_dist=list(meta.get("requires_dist", []) or []),
    )


def describe_index(index_url: str) -> str:
    """How the data file names its source index: credentials never recorded; the default index
    by name."""
    if index_url.rstrip("/") == DEFAULT_INDEX_URL:
        return "PyPI (pip's default index)"
    parts = urllib.parse.urlsplit(index_url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    return urllib.parse.urlunsplit(parts)


def known_versions(files: Iterable[Mapping[str, Any]], project: str, floor: str) -> list[str]:
    """Final releases from ``floor`` on that have a non-yanked Linux x86_64 (or pure) wheel or sdist."""
    rels = releases_from_files(files, project)
    return [str(v) for v in rels if v >= Version(floor)]


def yanked_versions(files: Iterable[Mapping[str, Any]], project: str, floor: str) -> dict[str, str]:
    """Final releases from ``floor`` on whose files are all yanked, with the yank reason."""
    want = canonicalize_name(project)
    status: dict[Version, list[Any]] = {}
    for f in files:
        name = str(f.get("filename", ""))
        try:
            if name.endswith(".whl"):
                pname, version, _, _ = parse_wheel_filename(name)
            elif name.endswith(".tar.gz"):
                pname_s, _, ver_s = name[: -len(".tar.gz")].rpartition("-")
                pname, version = canonicalize_name(pname_s), Version(ver_s)
            else:
                continue
        except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
            continue  # a file we cannot name: not a release we can use
        if pname != want or version.is_prerelease or version.is_devrelease or version < Version(floor):
            continue
        status.setdefault(version, []).append(f.get("yanked") or False)
    out = {}
    for version, flags in sorted(status.items()):
        if all(flags):
            reasons = [x for x in flags if isinstance(x, str) and x]
            out[str(version)] = reasons[0] if reasons else ""
    return out


def refresh(
    path: str | os.PathLike[str] | None = None,
    *,
    versions: Iterable[str] | None = None,
    index_url: str | None = None,
    fetch: Fetch | None = None,
    workers: int = 8,
    use_pip_fallback: bool = True,
) -> dict[str, Any]:
    """Read every vLLM release's real dependency metadata from the index and rewrite the data
    file (``path``, default the packaged ``data/vllm_releases.json``). ``versions`` limits the
    refresh to those releases. Returns the written document."""
    started = time.perf_counter()
    index_url = (index_url or configured_index_url()).rstrip("/")
    fetch = fetch or default_fetch()
    target = Path(path) if path is not None else DATA_FILE

    vllm_files = project_files(index_url, "vllm", fetch)
    rels = releases_from_files(vllm_files, "vllm")
    if versions is not None:
        wanted = {Version(v) for v in versions}
        missing = wanted - set(rels)
        if missing:
            raise RefreshError(f"not on the index: vllm {', '.join(sorted(map(str, missing)))}")
        rels = {v: f for v, f in rels.items() if v in wanted}
    else:
        rels = {v: f for v, f in rels.items() if v >= MIN_VLLM}

    def one(item: tuple[Version, dict[str, Any]]) -> dict[str, Any]:
        version, file = item
        got = metadata_text(file, fetch)
        if got is not None:
            meta, how = parse_metadata(got[0]), got[1]
        elif use_pip_fallback:
            meta, how = pip_report_metadata("vllm", str(version), index_url), "pip-report"
        else:
            raise RefreshError(f"no metadata file for vllm {version} and the pip fallback is off")
        if Version(meta.version) != version:
            raise RefreshError(f"metadata of vllm {version} says version {meta.version}")
        record = record_from_metadata(meta)
        record["wheel"] = file["filename"]
        record["metadata_from"] = how
        if file.get("upload-time"):
            record["uploaded"] = str(file["upload-time"])[:10]
        return record

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        records = list(pool.map(one, rels.items()))

    known: dict[str, list[str]] = {}
    yanked: dict[str, dict[str, str]] = {"vllm": yanked_versions(vllm_files, "vllm", str(MIN_VLLM))}
    for package, floor in KNOWN_VERSIONS_OF.items():
        files = project_files(index_url, package, fetch)
        known[package] = known_versions(files, package, floor)
        yanked[package] = yanked_versions(files, package, floor)

    doc: dict[str, Any] = {
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "source": {
            "index": describe_index(index_url),
            "method": "Simple API (PEP 691/503) + PEP 658 core metadata of each release's Linux "
            "x86_64 wheel; markers evaluated for CPython on Linux x86_64; extras ignored",
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
    ap.add_argument("--path", default=None)
    ap.add_argument("--index-url", default=None)
    ap.add_argument("versions", nargs="*")
    args = ap.parse_args(argv)
    doc = refresh(args.path, versions=args.versions or None, index_url=args.index_url)
    print(f"{len(doc['releases'])} releases from {doc['source']['index']} in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
