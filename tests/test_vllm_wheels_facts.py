"""Facts about vLLM's structured-output API, checked against the real wheels on CPU.

One release per API family:

* 0.6.5, 0.9.2  -- ``SamplingParams(guided_decoding=GuidedDecodingParams(json=...))``,
  engine arg ``guided_decoding_backend``;
* 0.11.0        -- transitional: ``StructuredOutputsParams`` + ``structured_outputs=``; the old
  names still exist, warn, and are moved onto ``structured_outputs``; engine args have both
  ``structured_outputs_config`` and ``guided_decoding_backend``;
* 0.32.0        -- newest release: ``StructuredOutputsParams`` only, ``structured_outputs_config``.

The engine-argument checks import ``vllm.engine.arg_utils`` for real (it imports on CPU); a
second, source-level check greps the installed ``arg_utils.py`` as a cross-check.
"""

from __future__ import annotations

import importlib.util
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.vllm_wheels import (
    HOST_MODULES,
    VllmRunError,
    api_family,
    prefetch,
    run_with_vllm,
    sampling_params_probe,
    vllm_site,
)

pytestmark = pytest.mark.slow

VERSIONS = ["0.6.5", "0.9.2", "0.11.0", "0.32.0"]

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}

_FACTS = r"""
import dataclasses, json, warnings
import vllm
import vllm.sampling_params as sp

SCHEMA = json.loads(SCHEMA_JSON)
out = {"vllm_version": vllm.__version__}
out["classes"] = sorted(n for n in ("GuidedDecodingParams", "StructuredOutputsParams") if hasattr(sp, n))
out["sampling_params_fields"] = sorted(
    n for n in ("guided_decoding", "structured_outputs") if n in getattr(sp.SamplingParams, "__struct_fields__", ())
)

def describe(params):
    d = {}
    for field in ("guided_decoding", "structured_outputs"):
        obj = getattr(params, field, None)
        d[field] = None if obj is None else {"class": type(obj).__name__, "json": obj.json}
    return d

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if hasattr(sp, "GuidedDecodingParams"):
        out["via_guided_decoding"] = describe(
            sp.SamplingParams(guided_decoding=sp.GuidedDecodingParams(json=SCHEMA), max_tokens=7)
        )
    out["guided_warnings"] = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if hasattr(sp, "StructuredOutputsParams"):
        out["via_structured_outputs"] = describe(
            sp.SamplingParams(structured_outputs=sp.StructuredOutputsParams(json=SCHEMA), max_tokens=7)
        )
    out["structured_warnings"] = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]

try:
    sp.SamplingParams(guided_json=SCHEMA)
    out["guided_json"] = "accepted"
except Exception as exc:
    out["guided_json"] = f"{type(exc).__name__}: {exc}"

import vllm.engine.arg_utils as au
assert dataclasses.is_dataclass(au.AsyncEngineArgs)
names = [f.name for f in dataclasses.fields(au.AsyncEngineArgs)]
out["engine_fields"] = sorted(n for n in names if n.startswith(("guided_decoding", "structured_outputs")))
for kw in ({"guided_decoding_backend": "xgrammar"}, {"structured_outputs_config": {"backend": "xgrammar"}}):
    key = next(iter(kw))
    try:
        args = au.AsyncEngineArgs(model="some/model", **kw)
        value = getattr(args, key)
        out["engine_" + key] = {"accepted": True, "stored_type": type(value).__name__}
    except TypeError as exc:
        out["engine_" + key] = {"accepted": False, "error": str(exc)}
try:
    from vllm.config import StructuredOutputsConfig
    cfg = StructuredOutputsConfig(backend="xgrammar")
    args = au.AsyncEngineArgs(model="some/model", structured_outputs_config=cfg)
    out["structured_outputs_config_class"] = {"backend": args.structured_outputs_config.backend}
except ImportError as exc:
    out["structured_outputs_config_class"] = None
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def wheels() -> None:
    """Skip unless the host interpreter can import vllm's heavy deps; install all versions at once."""
    for mod in ("torch", "transformers"):
        pytest.importorskip(mod)
    missing = [m for m in HOST_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"host interpreter lacks {missing}")
    prefetch(VERSIONS)


@pytest.fixture(scope="module")
def facts(wheels) -> dict[str, dict]:
    import json

    code = f"SCHEMA_JSON = {json.dumps(json.dumps(SCHEMA))}\n" + _FACTS
    with ThreadPoolExecutor(max_workers=len(VERSIONS)) as pool:
        results = pool.map(lambda v: run_with_vllm(v, code, timeout=300), VERSIONS)
        return dict(zip(VERSIONS, results, strict=True))


@pytest.mark.parametrize("version", VERSIONS)
def test_installed_version_is_the_one_asked_for(facts, version):
    assert facts[version]["vllm_version"] == version


@pytest.mark.parametrize(
    ("version", "classes", "fields"),
    [
        ("0.6.5", ["GuidedDecodingParams"], ["guided_decoding"]),
        ("0.9.2", ["GuidedDecodingParams"], ["guided_decoding"]),
        (
            "0.11.0",
            ["GuidedDecodingParams", "StructuredOutputsParams"],
            ["guided_decoding", "structured_outputs"],
        ),
        ("0.32.0", ["StructuredOutputsParams"], ["structured_outputs"]),
    ],
)
def test_param_classes_and_sampling_params_fields(facts, version, classes, fields):
    assert facts[version]["classes"] == classes
    assert facts[version]["sampling_params_fields"] == fields


@pytest.mark.parametrize("version", ["0.6.5", "0.9.2"])
def test_guided_decoding_family_carries_schema(facts, version):
    f = facts[version]
    assert f["via_guided_decoding"]["guided_decoding"] == {"class": "GuidedDecodingParams", "json": SCHEMA}
    assert f["via_guided_decoding"]["structured_outputs"] is None
    assert f["guided_warnings"] == []
    assert "via_structured_outputs" not in f


@pytest.mark.parametrize("version", ["0.11.0", "0.32.0"])
def test_structured_outputs_family_carries_schema(facts, version):
    f = facts[version]
    assert f["via_structured_outputs"]["structured_outputs"] == {
        "class": "StructuredOutputsParams",
        "json": SCHEMA,
    }
    assert f["via_structured_outputs"]["guided_decoding"] is None
    assert f["structured_warnings"] == []


def test_transitional_release_moves_old_names_and_warns(facts):
    f = facts["0.11.0"]
    # guided_decoding= is accepted but moved onto structured_outputs, with DeprecationWarnings.
    assert f["via_guided_decoding"]["guided_decoding"] is None
    assert f["via_guided_decoding"]["structured_outputs"] == {"class": "GuidedDecodingParams", "json": SCHEMA}
    assert any("GuidedDecodingParams is deprecated" in w for w in f["guided_warnings"])
    assert any("guided_decoding is deprecated" in w for w in f["guided_warnings"])


@pytest.mark.parametrize("version", VERSIONS)
def test_guided_json_keyword_is_rejected(facts, version):
    # The seeds' error: no release in any family takes SamplingParams(guided_json=...).
    assert facts[version]["guided_json"] == "TypeError: Unexpected keyword argument 'guided_json'"


@pytest.mark.parametrize(
    ("version", "fields"),
    [
        ("0.6.5", ["guided_decoding_backend"]),
        (
            "0.9.2",
            [
                "guided_decoding_backend",
                "guided_decoding_disable_additional_properties",
                "guided_decoding_disable_any_whitespace",
                "guided_decoding_disable_fallback",
            ],
        ),
        (
            "0.11.0",
            [
                "guided_decoding_backend",
                "guided_decoding_disable_additional_properties",
                "guided_decoding_disable_any_whitespace",
                "guided_decoding_disable_fallback",
                "structured_outputs_config",
            ],
        ),
        ("0.32.0", ["structured_outputs_config"]),
    ],
)
def test_async_engine_args_fields_imported(facts, version, fields):
    """Import-level check: dataclasses.fields(AsyncEngineArgs) of the real class."""
    f = facts[version]
    assert f["engine_fields"] == fields
    family = api_family(version)
    gd, so = f["engine_guided_decoding_backend"], f["engine_structured_outputs_config"]
    assert gd["accepted"] is (family != "structured_outputs")
    assert so["accepted"] is (family != "guided_decoding")
    if so["accepted"]:
        # AsyncEngineArgs does not convert a dict (only LLM(...) does): pass the config object.
        assert so["stored_type"] == "dict"
        assert f["structured_outputs_config_class"] == {"backend": "xgrammar"}
    else:
        assert "structured_outputs_config" in so["error"]


@pytest.mark.parametrize(
    ("version", "present", "absent"),
    [
        ("0.6.5", ["guided_decoding_backend:"], ["structured_outputs_config:"]),
        ("0.9.2", ["guided_decoding_backend:"], ["structured_outputs_config:"]),
        ("0.11.0", ["guided_decoding_backend:", "structured_outputs_config:"], []),
        ("0.32.0", ["structured_outputs_config:"], ["guided_decoding_backend:"]),
    ],
)
def test_async_engine_args_fields_source_level(facts, version, present, absent):
    """Source-level cross-check (no import): the field annotations in the installed arg_utils.py."""
    text = (vllm_site(version) / "vllm" / "engine" / "arg_utils.py").read_text()
    for needle in present:
        assert needle in text
    for needle in absent:
        assert needle not in text


# --- sampling_params_probe, with hand-written stand-ins for a rendered module -------------------

_MODULE_HEAD = """
import modal

app = modal.App("liftdeploy-probe-standin")
"""

GUIDED_MODULE = _MODULE_HEAD + textwrap.dedent(
    """
    def sampling_params(schema, *, max_tokens, temperature, top_p):
        from vllm.sampling_params import GuidedDecodingParams, SamplingParams

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            guided_decoding=GuidedDecodingParams(json=schema),
        )
    """
)

STRUCTURED_MODULE = _MODULE_HEAD + textwrap.dedent(
    """
    def sampling_params(schema, *, max_tokens, temperature, top_p):
        from vllm.sampling_params import SamplingParams, StructuredOutputsParams

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            structured_outputs=StructuredOutputsParams(json=schema),
        )
    """
)


PROBE_CASES = {
    # name: (version, module source)
    "0.6.5-guided": ("0.6.5", GUIDED_MODULE),
    "0.9.2-guided": ("0.9.2", GUIDED_MODULE),
    "0.11.0-structured": ("0.11.0", STRUCTURED_MODULE),
    "0.32.0-structured": ("0.32.0", STRUCTURED_MODULE),
    "0.11.0-guided": ("0.11.0", GUIDED_MODULE),
    "0.32.0-guided": ("0.32.0", GUIDED_MODULE),
    "0.9.2-structured": ("0.9.2", STRUCTURED_MODULE),
}
PROBE_KWARGS = {"max_tokens": 321, "temperature": 0.25, "top_p": 0.9}


@pytest.fixture(scope="module")
def probes(facts, tmp_path_factory) -> dict[str, dict | VllmRunError]:
    """sampling_params_probe for every case, run concurrently (each is a ~5-15 s subprocess)."""
    root = tmp_path_factory.mktemp("rendered")
    paths = {}
    for name, (_, source) in PROBE_CASES.items():
        paths[name] = root / f"{name.replace('.', '_').replace('-', '_')}.py"
        paths[name].write_text(source)

    def one(name: str) -> dict | VllmRunError:
        version = PROBE_CASES[name][0]
        try:
            return sampling_params_probe(version, paths[name], SCHEMA, timeout=300, **PROBE_KWARGS)
        except VllmRunError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(PROBE_CASES, pool.map(one, PROBE_CASES), strict=True))


def _ok(probes, name) -> dict:
    got = probes[name]
    if isinstance(got, Exception):
        raise got
    return got


@pytest.mark.parametrize(
    ("case", "carried_by", "carrier_class"),
    [
        ("0.6.5-guided", "guided_decoding", "GuidedDecodingParams"),
        ("0.9.2-guided", "guided_decoding", "GuidedDecodingParams"),
        ("0.11.0-structured", "structured_outputs", "StructuredOutputsParams"),
        ("0.32.0-structured", "structured_outputs", "StructuredOutputsParams"),
    ],
)
def test_probe_matching_family(probes, case, carried_by, carrier_class):
    got = _ok(probes, case)
    assert got["vllm_version"] == PROBE_CASES[case][0]
    assert got["class"] == "vllm.sampling_params.SamplingParams"
    assert (got["max_tokens"], got["temperature"], got["top_p"]) == (321, 0.25, 0.9)
    assert got["carried_by"] == carried_by
    assert got["carrier_class"] == carrier_class
    assert got["schema"] == SCHEMA
    assert got["schema_type"] == "dict"
    assert not [w for w in got["warnings"] if "deprecated" in w.lower()]


def test_probe_old_names_on_transitional_release(probes):
    got = _ok(probes, "0.11.0-guided")
    assert got["carried_by"] == "structured_outputs"  # moved there by SamplingParams
    assert got["carrier_class"] == "GuidedDecodingParams"  # a subclass of StructuredOutputsParams
    assert got["schema"] == SCHEMA
    assert any("guided_decoding is deprecated" in w for w in got["warnings"])


def test_probe_old_names_fail_on_newest_release(probes):
    err = probes["0.32.0-guided"]
    assert isinstance(err, VllmRunError)
    assert "cannot import name 'GuidedDecodingParams'" in str(err)


def test_probe_new_names_fail_on_guided_family(probes):
    err = probes["0.9.2-structured"]
    assert isinstance(err, VllmRunError)
    assert "cannot import name 'StructuredOutputsParams'" in str(err)


def test_api_family():
    assert [api_family(v) for v in ["0.6.3", "0.10.1.1", "0.11.2", "0.12.0", "1.0.0"]] == [
        "guided_decoding",
        "guided_decoding",
        "transitional",
        "structured_outputs",
        "structured_outputs",
    ]
