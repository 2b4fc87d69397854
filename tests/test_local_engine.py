"""Real (unmocked) tests of the local CPU engine: an offline smoke model, XGrammar on CPU."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from liftdeploy.local import LocalEngine, smoke_model_dir
from liftdeploy.local.server import import_rendered
from liftdeploy.local.smoke import SMOKE_MARKER
from liftdeploy.manifest import load
from tests.conftest import DEPLOYMENTS

IR_SCHEMA = {
    "type": "object",
    "properties": {
        "intent": {
            "type": "object",
            "properties": {"summary": {"type": "string", "maxLength": 40}},
            "required": ["summary"],
        },
        "signature": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "parameters": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "maxLength": 10},
                            "type_hint": {"type": "string", "maxLength": 10},
                        },
                        "required": ["name", "type_hint"],
                    },
                    "maxItems": 3,
                },
                "returns": {"type": "string", "maxLength": 10},
            },
            "required": ["name", "parameters", "returns"],
        },
    },
    "required": ["intent", "signature"],
}

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 12},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["user"],
    },
    "array_min_max_items": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 8},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["tags"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
        },
        "required": ["color", "size"],
    },
    "bounded_integers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["age", "score"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "note": {"type": "string", "maxLength": 10},
            "flag": {"type": "boolean"},
        },
        "required": ["id"],
    },
    "scalars": {
        "type": "object",
        "properties": {
            "x": {"type": "number", "minimum": 0, "maximum": 1},
            "ok": {"type": "boolean"},
            "nothing": {"type": "null"},
        },
        "required": ["x", "ok", "nothing"],
    },
    "ir": IR_SCHEMA,
}

MESSAGES = [
    {"role": "system", "content": "Reply with JSON only."},
    {"role": "user", "content": "Describe def add(a: int, b: int) -> int."},
]


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory: pytest.TempPathFactory):
    """A fresh cache dir for this module, also used as $LIFTDEPLOY_CACHE."""
    root = tmp_path_factory.mktemp("liftdeploy-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("LIFTDEPLOY_CACHE", str(root))
    t0 = time.perf_counter()
    path = smoke_model_dir("qwen2")
    build_s = time.perf_counter() - t0
    yield {"root": root, "path": path, "build_s": build_s}
    mp.undo()


def rendered(tmp_path: Path, backend: str):
    """The rendered module of the qwen3-8b example with `backend`: what the engine stands in for. Compact
    JSON: the random smoke model would spend `any` whitespace's freedom on tabs until max_tokens."""
    manifest = tmp_path / f"{backend}.toml"
    manifest.write_text((DEPLOYMENTS / "qwen3-8b.toml").read_text()
                        + f'\n[decoding]\nbackend = "{backend}"\nwhitespace = "compact"\n')
    return import_rendered(load(manifest))


@pytest.fixture(scope="module")
def engine(smoke_cache, tmp_path_factory) -> LocalEngine:
    """The stand-in for a module with the default backend (guidance)."""
    eng = LocalEngine(seed=0).for_module(rendered(tmp_path_factory.mktemp("guidance"), "guidance"))
    assert not eng.ready and eng.load_seconds is None
    eng.start()
    return eng


@pytest.fixture(scope="module")
def xgrammar_engine(engine, tmp_path_factory) -> LocalEngine:
    """The same loaded model, standing in for a module with `backend = "xgrammar"`."""
    return engine.for_module(rendered(tmp_path_factory.mktemp("xgrammar"), "xgrammar"))


def _run(coro):
    return asyncio.run(coro)


def _assert_valid(result: dict, schema: dict) -> object:
    assert set(result) == {"text", "prompt_tokens", "completion_tokens", "finish_reason"}
    assert result["finish_reason"] == "stop", result
    doc = json.loads(result["text"])
    jsonschema.validate(doc, schema)
    return doc


# ---------------------------------------------------------------------- smoke model


def test_smoke_model_builds_offline_and_is_cached(smoke_cache):
    path = smoke_cache["path"]
    assert path.parent == Path(smoke_cache["root"]) / "smoke-models"
    assert path.name.startswith("qwen2-")
    marker = json.loads((path / SMOKE_MARKER).read_text())
    assert marker["smoke"] is True and marker["family"] == "qwen2"
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]  # temp dir renamed away

    t0 = time.perf_counter()
    again = smoke_model_dir("qwen2")
    assert again == path
    assert time.perf_counter() - t0 < 0.5
    # unknown families fall back to qwen2; an explicit cache_dir is honoured
    assert smoke_model_dir("no-such-family") == path
    assert smoke_model_dir("qwen2", cache_dir=path.parent) == path


def test_concurrent_builds_agree(tmp_path):
    """Builders racing on an empty cache end with one complete dir and no temp dirs."""
    import threading

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(smoke_model_dir("llama", cache_dir=tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]
    assert (results[0] / SMOKE_MARKER).is_file()


def test_smoke_model_loads_with_auto_classes(smoke_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smoke_cache["path"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    # any string tokenizes and round-trips (byte-level alphabet)
    text = ' {"k": [1, 2.5e-3, null]}\n\tdef f(x):  # café 漢字 🚀 \\ ~'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_llama_family_smoke_model(smoke_cache, engine):
    path = smoke_model_dir("llama")
    assert path.name.startswith("llama-") and path != smoke_cache["path"]
    eng = LocalEngine(family="llama", runtime=engine.runtime)
    assert eng.name == "smoke:llama" and eng.is_smoke
    eng.start()
    assert eng.model.config.model_type == "llama"
    res = _run(eng.generate(MESSAGES, SCHEMAS["enums"], max_tokens=64, temperature=0.7, top_p=0.9))
    _assert_valid(res, SCHEMAS["enums"])


# ---------------------------------------------------------------------- engine


def test_engine_interface(engine, smoke_cache):
    assert engine.ready is True
    assert engine.name == "smoke:qwen2"
    assert engine.is_smoke is True
    assert isinstance(engine.load_seconds, float) and engine.load_seconds > 0
    # a model dir passed explicitly: named after the dir, recognised as smoke by its marker
    by_path = LocalEngine(smoke_cache["path"])
    assert by_path.name == smoke_cache["path"].name
    assert by_path.is_smoke is True and by_path.ready is False


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
def test_constrained_generation_is_schema_valid(request, backend, name, temperature):
    engine = request.getfixturevalue("engine" if backend == "guidance" else "xgrammar_engine")
    schema = SCHEMAS[name]
    engine.prepare(schema)
    # every string is bounded, so the grammar must complete well within this budget
    res = _run(engine.generate(MESSAGES, schema, max_tokens=1024, temperature=temperature, top_p=0.95))
    _assert_valid(res, schema)
    assert res["prompt_tokens"] > 0
    assert 0 < res["completion_tokens"] <= 1024


def test_ir_schema_across_seeds(engine):
    before = engine.seed
    try:
        for seed in (1, 2):
            engine.seed = seed
            res = _run(engine.generate(MESSAGES, IR_SCHEMA, max_tokens=1024, temperature=0.9, top_p=0.95))
            doc = _assert_valid(res, IR_SCHEMA)
            assert len(doc["signature"]["parameters"]) <= 3
    finally:
        engine.seed = before


def test_generation_is_deterministic_for_a_seed(engine):
    kw = {"max_tokens": 200, "temperature": 1.0, "top_p": 0.9}
    a = _run(engine.generate(MESSAGES, SCHEMAS["optional_fields"], **kw))
    b = _run(engine.generate(MESSAGES, SCHEMAS["optional_fields"], **kw))
    assert a == b


@pytest.mark.parametrize(
    "schema",
    [
        {"type": 12},
        {"type": "object", "properties": {"a": {"type": "strin"}}},
        {"type": "string", "pattern": "(unclosed"},
        {"$ref": "#/definitions/missing"},  # valid to jsonschema, but XGrammar cannot compile it
        {"type": "integer", "minimum": 5, "maximum": 1},
    ],
)
def test_invalid_schema_raises_value_error(engine, schema):
    with pytest.raises(ValueError):
        engine.prepare(schema)
    with pytest.raises(ValueError):
        _run(engine.generate(MESSAGES, schema, max_tokens=8, temperature=0.0, top_p=1.0))


def test_grammar_cache_uses_canonical_schema(engine):
    schema = {"required": ["b"], "type": "object", "properties": {"b": {"type": "boolean"}}}
    reordered = {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}
    engine.prepare(schema)
    n = len(engine._grammars)
    engine.prepare(reordered)  # same canonical form: a cache hit, no new entry
    assert len(engine._grammars) == n


def test_tiny_max_tokens_finishes_with_length(engine):
    res = _run(engine.generate(MESSAGES, IR_SCHEMA, max_tokens=3, temperature=0.0, top_p=1.0))
    assert res["finish_reason"] == "length"
    assert res["completion_tokens"] == 3
    assert res["text"].startswith("{")


def test_unconstrained_generation(engine):
    res = _run(engine.generate(MESSAGES, None, max_tokens=16, temperature=1.0, top_p=1.0))
    assert res["finish_reason"] in ("stop", "length")
    assert 1 <= res["completion_tokens"] <= 16
    assert isinstance(res["text"], str)


def test_model_dir_with_padded_vocab(smoke_cache, tmp_path, engine):
    """Like real checkpoints (e.g. Qwen pads 151665 tokens to 151936 logits): the model's
    vocabulary is wider than the tokenizer's; the padding ids must never be sampled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smoke_cache["path"]
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    model.resize_token_embeddings(len(tok) + 123)
    model_dir = tmp_path / "padded-model"
    tok.save_pretrained(model_dir)
    model.save_pretrained(model_dir)

    eng = LocalEngine(model_dir, seed=3, runtime=engine.runtime)
    assert eng.name == "padded-model" and eng.is_smoke is False
    eng.start()
    assert eng.vocab_size == len(tok) + 123
    for schema in (SCHEMAS["optional_fields"], SCHEMAS["array_min_max_items"]):
        res = _run(eng.generate(MESSAGES, schema, max_tokens=200, temperature=1.0, top_p=1.0))
        _assert_valid(res, schema)


def test_prompt_longer_than_max_model_len_is_rejected(smoke_cache):
    eng = LocalEngine(max_model_len=8)
    with pytest.raises(ValueError):
        _run(eng.generate(MESSAGES, None, max_tokens=4, temperature=0.0, top_p=1.0))


def test_concurrent_generate_calls_complete_and_loop_stays_free(engine):
    schemas = [SCHEMAS["enums"], SCHEMAS["bounded_integers"], IR_SCHEMA, SCHEMAS["optional_fields"]]

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        results = await asyncio.gather(
            *(engine.generate(MESSAGES, s, max_tokens=1024, temperature=1.0, top_p=0.95) for s in schemas)
        )
        done.set()
        await tick_task
        return results, ticks

    results, ticks = _run(main())
    assert len(results) == len(schemas)
    for res, schema in zip(results, schemas, strict=True):
        _assert_valid(res, schema)
    assert ticks > 3  # the event loop kept running while the model worked in a thread


# ---------------------------------------------------------------------- formats and reasons


@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
@pytest.mark.parametrize("fmt", ["byte", "binary", "base64url"])
def test_an_unknown_format_is_dropped_for_the_backend_and_kept_for_validation(request, backend, fmt):
    """A format the backend does not enforce is the annotation JSON Schema makes it: the backend is
    given the schema without it (vLLM's validators refuse it otherwise), the output is judged by the
    schema with it."""
    engine = request.getfixturevalue("engine" if backend == "guidance" else "xgrammar_engine")
    schema = {"type": "object", "properties": {"data": {"type": "string", "format": fmt, "maxLength": 8}},
              "required": ["data"], "additionalProperties": False}
    with pytest.raises(ValueError):  # as it is, refused: xgrammar and llguidance do not know it
        engine.prepare(schema)
    served = engine.runtime.served_schema(schema)
    assert served["properties"]["data"] == {"type": "string", "maxLength": 8}
    res = _run(engine.generate(MESSAGES, engine.prepare(served), max_tokens=64, temperature=0.0, top_p=1.0))
    _assert_valid(res, schema)


@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
def test_a_known_format_is_still_given_to_the_backend(request, backend):
    engine = request.getfixturevalue("engine" if backend == "guidance" else "xgrammar_engine")
    schema = {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]}
    assert engine.prepare(engine.runtime.served_schema(schema))["properties"]["day"]["format"] == "date"


def test_a_refusal_keeps_the_backend_s_whole_reason(engine):
    with pytest.raises(ValueError, match="look-around") as caught:  # the reason is on llguidance's 2nd line
        engine.prepare({"type": "string", "pattern": "(?=x)abc"})
    assert "\n" not in str(caught.value)
