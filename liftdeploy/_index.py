"""Reading a package index the way pip does: which index, its Simple API pages, and each
release's core metadata (``METADATA``), without downloading wheels.

* The index is pip's configured one (``PIP_INDEX_URL`` or ``index-url`` in pip's config files);
  with nothing configured pip uses PyPI's public Simple API, and so do we.
* Project pages are read with the Simple API, asking for PEP 691 JSON and accepting the
  PEP 503 HTML form too (``file://`` mirrors serve HTML).
* Each wheel's ``METADATA`` is read from its PEP 658 ``.metadata`` file. Some mirrors serve the
  ``.metadata`` file without advertising it (``core-metadata`` missing from the listing); we try
  it anyway when not advertised.
* If the index has no metadata file for a release, ``pip install --dry-run --report`` reads it.

Parsing (:func:`parse_metadata`, :func:`parse_simple_page`, :func:`releases_from_files`) is
pure; fetching goes through a ``Fetch`` callable, so everything is testable offline.
"""

from __future__ import annotations

import configparser
import email.parser
import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

DEFAULT_INDEX_URL = "https://pypi.org/simple"
"""What pip uses when no index is configured."""

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
    provides_extras: list[str] = field(default_factory=list)


def parse_metadata(text: str) -> CoreMetadata:
    """Parse a wheel's METADATA (RFC 822 headers; the body is the long description)."""
    msg = email.parser.HeaderParser().parsestr(text)
    return CoreMetadata(
        name=str(msg.get("Name", "")).strip(),
        version=str(msg.get("Version", "")).strip(),
        requires_python=str(msg.get("Requires-Python", "") or "").strip(),
        requires_dist=[str(v).strip() for v in msg.get_all("Requires-Dist") or []],
        provides_extras=[str(v).strip() for v in msg.get_all("Provides-Extra") or []],
    )


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
            body = path.read_bytes()  # FileNotFoundError is the 404
            first, last = _byte_range(headers.get("Range", ""), len(body))
            return body[first : last + 1]
        resp = client.get(url, headers=dict(headers))
        if resp.status_code == 404:
            raise FileNotFoundError(url)
        resp.raise_for_status()
        return resp.content

    return fetch


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """``(first, last)`` of an HTTP ``Range: bytes=a-b`` / ``bytes=-n`` header; the whole body without one."""
    if not header.startswith("bytes="):
        return 0, size - 1
    first, _, last = header[len("bytes=") :].partition("-")
    if not first:
        return max(0, size - int(last)), size - 1
    return int(first), min(size - 1, int(last)) if last else size - 1


class _RangeFile(io.RawIOBase):
    """A remote file read with HTTP range requests, in blocks: enough for :mod:`zipfile` to read
    a wheel's central directory and one member without downloading the wheel."""

    BLOCK = 256 * 1024

    def __init__(self, url: str, size: int, fetch: Fetch) -> None:
        self.url, self.size, self.fetch = url, size, fetch
        self.pos = 0
        self.blocks: dict[int, bytes] = {}
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _block(self, index: int) -> bytes:
        if index not in self.blocks:
            first = index * self.BLOCK
            last = min(self.size, first + self.BLOCK) - 1
            body = self.fetch(self.url, {"Range": f"bytes={first}-{last}"})
            self.requests += 1
            if len(body) == self.size and self.size > last - first + 1:  # the server ignored Range
                body = body[first : last + 1]
            self.blocks[index] = body
        return self.blocks[index]

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self.pos)
        out = bytearray()
        while len(out) < want:
            index, skip = divmod(self.pos + len(out), self.BLOCK)
            out += self._block(index)[skip : skip + want - len(out)]
        buffer[: len(out)] = out
        self.pos += len(out)
        return len(out)


def wheel_metadata(file: Mapping[str, Any], fetch: Fetch) -> str | None:
    """The ``METADATA`` of a wheel read from the wheel itself with HTTP range requests (the
    central directory and one member: a few hundred KB of a wheel of any size). ``None`` when
    the listing gives no size (PEP 691's ``size``) or the wheel has no METADATA."""
    size = file.get("size")
    if not isinstance(size, int) or not str(file["filename"]).endswith(".whl"):
        return None
    with zipfile.ZipFile(io.BufferedReader(_RangeFile(file["url"], size, fetch), 64 * 1024)) as wheel:
        names = [n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            return None
        return wheel.read(names[0]).decode("utf-8")


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
    """Last resort: ask pip (which downloads the wheel) for the release's metadata."""
    import tempfile

    target = tempfile.mkdtemp(prefix="liftdeploy-refresh-")  # pip takes --platform only with --target
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
        "--ignore-requires-python", "--quiet", "--report", "-",
        "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux1_x86_64",
        "--target", target, f"{project}=={version}",
    ]  # fmt: skip
    if index_url:
        cmd[4:4] = ["--index-url", index_url]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    finally:
        import shutil

        shutil.rmtree(target, ignore_errors=True)  # --dry-run writes nothing there
    if proc.returncode != 0:
        raise RefreshError(f"pip could not report {project}=={version}: {proc.stderr.strip()[-2000:]}")
    report = json.loads(proc.stdout)
    meta = report["install"][0]["metadata"]
    return CoreMetadata(
        name=meta.get("name", project),
        version=meta.get("version", version),
        requires_python=meta.get("requires_python", "") or "",
        requires_dist=list(meta.get("requires_dist", []) or []),
        provides_extras=list(meta.get("provides_extra", []) or []),
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
