"""The refresh: parsing on a recorded METADATA file (offline), the whole pipeline against a fake
in-memory index (offline), and one live refresh of a few releases (network)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest
from packaging.version import Version

from liftdeploy import refresh as rf

FIXTURE = Path(__file__).parent / "fixtures" / "vllm-0.9.2.METADATA"


# ------------------------------------------------------------------------------ parsing


def test_parse_recorded_vllm_0_9_2_metadata() -> None:
    meta = rf.parse_metadata(FIXTURE.read_text())
    assert meta.name == "vllm" and meta.version == "0.9.2"
    assert meta.requires_python == "<3.13,>=3.9"
    assert len(meta.requires_dist) == 63
    assert "transformers>=4.51.1" in meta.requires_dist


def test_record_from_recorded_metadata() -> None:
    rec = rf.record_from_metadata(FIXTURE.read_text())
    assert rec == {
        "version": "0.9.2",
        "requires_python": "<3.13,>=3.9",
        "torch": "==2.7.0",
        "transformers": ">=4.51.1",
        # 'xgrammar==0.1.19; platform_machine == "x86_64" or ...' holds on linux x86_64
        "xgrammar": "==0.1.19",
    }


SYNTHETIC = """\
Metadata-Version: 2.4
Name: vllm
Version: 9.0.0
Requires-Python: >=3.10,<3.13
Requires-Dist: torch==2.9.0; platform_machine == "x86_64"
Requires-Dist: torch==2.8.0; platform_machine == "aarch64"
Requires-Dist: transformers>=4.56.0
Requires-Dist: transformers<5
Requires-Dist: transformers>=9; extra == "bench"
Requires-Dist: xgrammar==0.1.25; python_version < "3.12"
Requires-Dist: xgrammar==0.1.27; python_version >= "3.12"
Provides-Extra: bench

Long description mentioning Requires-Dist: nonsense==1
"""


def test_markers_extras_and_python_dependent_specifiers() -> None:
    rec = rf.record_from_metadata(SYNTHETIC)
    assert rec["torch"] == "==2.9.0"  # the aarch64 line is dropped
    assert rec["transformers"] == "<5,>=4.56.0"  # lines combined, the extra ignored
    assert rec["xgrammar"] == "==0.1.27"  # at the newest supported Python (3.12)
    assert rec["by_python"] == {"xgrammar": {"3.10": "==0.1.25", "3.11": "==0.1.25", "3.12": "==0.1.27"}}


def test_missing_dependency_is_empty() -> None:
    rec = rf.record_from_metadata(
        "Name: vllm\nVersion: 0.6.0\nRequires-Python: >=3.8\nRequires-Dist: torch==2.4.0\n"
    )
    assert rec["xgrammar"] == "" and rec["transformers"] == "" and rec["torch"] == "==2.4.0"


def test_parse_simple_page_json_and_html() -> None:
    page = "https://index.example/simple/vllm/"
    body = json.dumps(
        {
            "files": [
                {"filename": "vllm-0.9.2-cp38-abi3-manylinux1_x86_64.whl", "url": "../../f/vllm-0.9.2.whl",
                 "core-metadata": {"sha256": "ab"}, "yanked": False},
            ]
        }
    ).encode()  # fmt: skip
    (f,) = rf.parse_simple_page(body, page)
    assert f["url"] == "https://index.example/f/vllm-0.9.2.whl"
    html = (
        b'<html><body><a href="../../f/vllm-0.9.2-cp38-abi3-manylinux1_x86_64.whl#sha256=cd" '
        b'data-requires-python="&lt;3.13,&gt;=3.9" data-core-metadata="sha256=ef">'
        b"vllm-0.9.2-cp38-abi3-manylinux1_x86_64.whl</a>"
        b'<a href="x/vllm-0.9.1.tar.gz" data-yanked="broken">vllm-0.9.1.tar.gz</a></body></html>'
    )
    a, b = rf.parse_simple_page(html, page)
    assert a["filename"] == "vllm-0.9.2-cp38-abi3-manylinux1_x86_64.whl"
    assert a["url"].endswith("/f/vllm-0.9.2-cp38-abi3-manylinux1_x86_64.whl")
    assert a["core-metadata"] == {"sha256": "ef"} and a["requires-python"] == "<3.13,>=3.9"
    assert b["yanked"] == "broken"


def test_releases_from_files_prefers_linux_x86_64_and_skips_yanked_and_pre() -> None:
    files = [
        {"filename": "vllm-0.33.0-cp38-abi3-manylinux_2_28_aarch64.whl", "url": "a"},
        {"filename": "vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl", "url": "x"},
        {"filename": "vllm-0.33.0.tar.gz", "url": "s"},
        {"filename": "vllm-0.32.0.tar.gz", "url": "s32"},
        {"filename": "vllm-0.31.0-cp38-abi3-manylinux_2_28_x86_64.whl", "url": "y", "yanked": "bad"},
        {"filename": "vllm-0.34.0rc1-cp38-abi3-manylinux_2_28_x86_64.whl", "url": "rc"},
        {"filename": "vllm-0.34.0+cu118-cp38-abi3-manylinux_2_28_x86_64.whl", "url": "local"},
    ]
    rels = rf.releases_from_files(files, "vllm")
    assert [str(v) for v in rels] == ["0.32.0", "0.33.0"]
    assert rels[next(iter(v for v in rels if str(v) == "0.33.0"))]["url"] == "x"
    assert rf.yanked_versions(files, "vllm", "0.6.0") == {"0.31.0": "bad"}


def test_describe_index_hides_credentials() -> None:
    assert rf.describe_index(rf.DEFAULT_INDEX_URL + "/") == "PyPI (pip's default index)"
    assert (
        rf.describe_index("https://u:secret@mirror.example:8443/simple")
        == "https://mirror.example:8443/simple"
    )


def test_configured_index_url(tmp_path: Path) -> None:
    assert (
        rf.configured_index_url({"PIP_INDEX_URL": "https://mirror.example/simple/"}, [])
        == "https://mirror.example/simple"
    )
    glob = tmp_path / "global.conf"
    glob.write_text("[global]\nindex-url = https://a.example/simple\nextra-index-url = file:///x\n")
    user = tmp_path / "user.conf"
    user.write_text("[install]\nindex-url = https://b.example/simple\n")
    assert rf.configured_index_url({}, [glob]) == "https://a.example/simple"
    assert rf.configured_index_url({}, [glob, user]) == "https://b.example/simple"
    only_extra = tmp_path / "extra.conf"
    only_extra.write_text("[global]\nextra-index-url = file:///opt/pypi/simple\n")
    assert rf.configured_index_url({}, [only_extra]) == rf.DEFAULT_INDEX_URL


# ------------------------------------------------------------------ pipeline on a fake index

INDEX = "https://index.example/simple"


def _fake_index(metadata: Mapping[str, bytes], advertise: bool) -> tuple[dict[str, bytes], list[str]]:
    files = []
    blobs: dict[str, bytes] = {}
    for version, body in metadata.items():
        url = f"https://files.example/vllm-{version}-cp38-abi3-manylinux1_x86_64.whl"
        entry: dict[str, object] = {"filename": url.rsplit("/", 1)[1], "url": url, "yanked": False}
        if advertise:
            entry["core-metadata"] = {"sha256": hashlib.sha256(body).hexdigest()}
        files.append(entry)
        blobs[url + ".metadata"] = body
    files.append(
        {"filename": "vllm-0.5.5-cp38-abi3-manylinux1_x86_64.whl", "url": "https://files.example/old.whl"}
    )
    pages = {f"{INDEX}/vllm/": json.dumps({"files": files}).encode()}
    for pkg, versions in {
        "transformers": ["4.53.0", "4.53.3", "4.57.0"],
        "torch": ["2.7.0"],
        "xgrammar": ["0.1.19"],
    }.items():
        pfiles = [
            {"filename": f"{pkg}-{v}-py3-none-any.whl", "url": f"https://files.example/{pkg}-{v}.whl"}
            for v in versions
        ]
        pfiles[-1]["yanked"] = "oops" if pkg == "transformers" else False
        pages[f"{INDEX}/{pkg}/"] = json.dumps({"files": pfiles}).encode()
    pages.update(blobs)
    calls: list[str] = []
    return pages, calls


def _fetcher(pages: dict[str, bytes], calls: list[str]):
    def fetch(url: str, headers: Mapping[str, str]) -> bytes:
        calls.append(url)
        if url not in pages:
            raise FileNotFoundError(url)
        return pages[url]

    return fetch


@pytest.mark.parametrize("advertise", [True, False])
def test_refresh_pipeline_offline(tmp_path: Path, advertise: bool) -> None:
    meta = FIXTURE.read_bytes()
    meta_060 = (b"Name: vllm\nVersion: 0.6.0\nRequires-Python: >=3.8\nRequires-Dist: torch==2.4.0\n"
                b"Requires-Dist: transformers>=4.43.2\n")
    pages, calls = _fake_index({"0.9.2": meta, "0.6.0": meta_060}, advertise)
    out = tmp_path / "releases.json"
    doc = rf.refresh(out, index_url=INDEX, fetch=_fetcher(pages, calls), use_pip_fallback=False)
    assert json.loads(out.read_text()) == doc
    assert [r["version"] for r in doc["releases"]] == ["0.6.0", "0.9.2"]  # 0.5.5 is below the floor
    r092 = doc["releases"][1]
    assert (r092["torch"], r092["transformers"], r092["xgrammar"]) == ("==2.7.0", ">=4.51.1", "==0.1.19")
    assert r092["metadata_from"] == ("pep658" if advertise else "pep658-unadvertised")
    assert doc["known_versions"]["transformers"] == ["4.53.0", "4.53.3"]
    assert doc["yanked"]["transformers"] == {"4.57.0": "oops"}
    assert doc["source"]["index"] == INDEX and doc["generated"]
    assert all(u.startswith(("https://index.example/", "https://files.example/")) for u in calls)


def test_refresh_rejects_bad_metadata_hash(tmp_path: Path) -> None:
    pages, calls = _fake_index({"0.9.2": FIXTURE.read_bytes()}, advertise=True)
    pages["https://files.example/vllm-0.9.2-cp38-abi3-manylinux1_x86_64.whl.metadata"] = (
        b"Name: vllm\nVersion: 0.9.2\n"
    )
    with pytest.raises(rf.RefreshError, match="hash mismatch"):
        rf.refresh(tmp_path / "x.json", index_url=INDEX, fetch=_fetcher(pages, calls), use_pip_fallback=False)


def test_refresh_without_metadata_file_and_no_fallback(tmp_path: Path) -> None:
    pages, calls = _fake_index({"0.9.2": FIXTURE.read_bytes()}, advertise=False)
    del pages["https://files.example/vllm-0.9.2-cp38-abi3-manylinux1_x86_64.whl.metadata"]
    with pytest.raises(rf.RefreshError, match="no metadata file"):
        rf.refresh(tmp_path / "x.json", index_url=INDEX, fetch=_fetcher(pages, calls), use_pip_fallback=False)


def test_refresh_unknown_version(tmp_path: Path) -> None:
    pages, calls = _fake_index({"0.9.2": FIXTURE.read_bytes()}, advertise=True)
    with pytest.raises(rf.RefreshError, match="not on the index"):
        rf.refresh(tmp_path / "x.json", versions=["0.9.3"], index_url=INDEX, fetch=_fetcher(pages, calls))


def test_packaged_data_agrees_with_fixture() -> None:
    doc = json.loads((Path(rf.__file__).parent / "data" / "vllm_releases.json").read_text())
    (r,) = [r for r in doc["releases"] if r["version"] == "0.9.2"]
    rec = rf.record_from_metadata(FIXTURE.read_text())
    assert {k: r[k] for k in rec} == rec


# ----------------------------------------------------------------------------- live index


@pytest.mark.network
def test_refresh_live_index(tmp_path: Path) -> None:
    out = tmp_path / "live.json"
    doc = rf.refresh(out, versions=["0.6.0", "0.9.2", "0.12.0"])
    assert out.exists()
    by = {r["version"]: r for r in doc["releases"]}
    assert set(by) == {"0.6.0", "0.9.2", "0.12.0"}
    assert by["0.9.2"]["requires_python"] == "<3.13,>=3.9"
    assert (by["0.9.2"]["torch"], by["0.9.2"]["transformers"], by["0.9.2"]["xgrammar"]) == (
        "==2.7.0",
        ">=4.51.1",
        "==0.1.19",
    )
    assert by["0.12.0"]["transformers"] == "<5,>=4.56.0"
    assert by["0.6.0"]["xgrammar"] == ""
    assert "4.53.0" in doc["known_versions"]["transformers"]


# ------------------------------------------------------------------------ SGLang, with extras

SGLANG_046 = Path(__file__).parent / "fixtures" / "sglang-0.4.6.post5.METADATA"
SGLANG_053 = Path(__file__).parent / "fixtures" / "sglang-0.5.3.post1.METADATA"


def test_sglang_0_5_3_post1_pins_the_seeds_stack() -> None:
    rec = rf.record_from_metadata(SGLANG_053.read_text(), rf.SGLANG)
    assert rec["requires_python"] == ">=3.10"
    assert (rec["torch"], rec["transformers"], rec["xgrammar"], rec["flashinfer-python"]) == (
        "==2.8.0", "==4.57.0", "==0.1.25", "==0.4.0",
    )  # fmt: skip
    assert rec["sgl-kernel"] == "==0.3.15" and rec["torch-memory-saver"] == "==0.0.9rc2"
    assert "torch" in rec["requires"]
    assert "all" in rec["provides_extras"] and "srt" not in rec["provides_extras"]
    assert "extras" not in rec  # `all` adds only test and decord packages, none tracked


def test_sglang_0_4_runtime_sits_behind_the_srt_extra() -> None:
    rec = rf.record_from_metadata(SGLANG_046.read_text(), rf.SGLANG)
    assert rec["torch"] == "" and rec["requires"] == []  # plain `sglang` installs no runtime
    srt = rec["extras"]["srt"]  # srt pulls in runtime_common (transformers, xgrammar) itself
    assert (srt["torch"], srt["transformers"], srt["xgrammar"], srt["flashinfer-python"]) == (
        "==2.6.0", "==4.51.1", "==0.1.19", "==0.2.5",
    )  # fmt: skip
    assert "torch-memory-saver" not in srt
    assert rec["extras"]["all"]["torch-memory-saver"] == ">=0.0.4"  # all -> srt + torch_memory_saver


def test_extra_closure_follows_self_references() -> None:
    meta = rf.parse_metadata(SGLANG_046.read_text())
    env = rf.linux_x86_64_env("3.12")
    assert rf.extra_closure(meta.requires_dist, "sglang", "srt", env) == {"srt", "runtime-common"}
    assert {"srt", "runtime-common", "openai", "torch-memory-saver"} <= rf.extra_closure(
        meta.requires_dist, "sglang", "all", env
    )


def test_vllm_records_are_unchanged_by_extras() -> None:
    assert "provides_extras" not in rf.record_from_metadata(FIXTURE.read_text())


def test_packaged_sglang_data_agrees_with_fixtures() -> None:
    doc = json.loads((Path(rf.__file__).parent / "data" / "sglang_releases.json").read_text())
    assert doc["project"] == "sglang" and doc["source"]["generator"] == "liftdeploy.refresh"
    by = {r["version"]: r for r in doc["releases"]}
    for fixture in (SGLANG_046, SGLANG_053):
        rec = rf.record_from_metadata(fixture.read_text(), rf.SGLANG)
        assert {k: by[rec["version"]][k] for k in rec} == rec
    assert min(by, key=Version) == "0.4.0"


def _wheel(tmp_path: Path, metadata: str, filler: int) -> Path:
    path = tmp_path / "sglang-9.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        whl.writestr("sglang/big.bin", os.urandom(filler))  # incompressible: the wheel stays large
        whl.writestr("sglang-9.0.0.dist-info/METADATA", metadata)
        whl.writestr("sglang-9.0.0.dist-info/RECORD", "")
    return path


def test_wheel_metadata_by_range_requests(tmp_path: Path) -> None:
    """With no PEP 658 file, METADATA comes from the wheel's central directory and one member."""
    wheel = _wheel(tmp_path, "Name: sglang\nVersion: 9.0.0\nRequires-Dist: torch==2.8.0\n", 3 * 2**20)
    fetched: list[tuple[str, str]] = []
    inner = rf.default_fetch()

    def fetch(url: str, headers: Mapping[str, str]) -> bytes:
        fetched.append((url, headers.get("Range", "")))
        return inner(url, headers)

    file = {"filename": wheel.name, "url": wheel.as_uri(), "size": wheel.stat().st_size}
    text = rf.wheel_metadata(file, fetch)
    assert text is not None and "torch==2.8.0" in text
    assert all(r.startswith("bytes=") for _, r in fetched) and len(fetched) <= 3
    assert rf.wheel_metadata({**file, "size": None}, fetch) is None  # no size listed: pip's turn


@pytest.mark.network
def test_refresh_live_sglang(tmp_path: Path) -> None:
    doc = rf.refresh(tmp_path / "sglang.json", project="sglang", versions=["0.4.6.post5", "0.5.3.post1"])
    by = {r["version"]: r for r in doc["releases"]}
    assert by["0.5.3.post1"]["torch"] == "==2.8.0" and by["0.5.3.post1"]["flashinfer-python"] == "==0.4.0"
    assert by["0.4.6.post5"]["extras"]["srt"]["torch"] == "==2.6.0"
