"""`decoding.whitespace`: what each setting lets the model write between JSON tokens, checked by
compiling the rendered module's schemas with the real llguidance as vLLM's guidance backend does
(`defaults={"whitespace_flexible": not disable_any_whitespace}`, then the schema's `x-guidance`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from liftdeploy.local.server import import_rendered
from liftdeploy.manifest import load
from tests.conftest import DEPLOYMENTS

llguidance = pytest.importorskip("llguidance")
pytest.importorskip("transformers")

SCHEMA = {"type": "object", "required": ["a"],
          "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {"type": "integer"}},
                         "c": {"type": "object", "properties": {"d": {"type": "string"}}}}}
SPACED = '{"a": 1, "b": [1, 2]}'


def rendered(folder: Path, whitespace: str):
    manifest = folder / f"{whitespace}.toml"
    manifest.write_text((DEPLOYMENTS / "qwen3-8b.toml").read_text() + f'\n[decoding]\nwhitespace = "{whitespace}"\n')
    return import_rendered(load(manifest))


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layouts")
    return {whitespace: rendered(folder, whitespace) for whitespace in ("compact", "spaced", "any")}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from liftdeploy.local.smoke import smoke_model_dir

    return AutoTokenizer.from_pretrained(smoke_model_dir("qwen2"))


def accepts(module, tokenizer, text: str, *, flexible: bool | None = None) -> bool:
    """Whether the grammar vLLM's guidance backend builds for `module` takes `text`, token by token
    (`flexible`: the engine's default whitespace_flexible, when not the module's own)."""
    import llguidance.hf

    flexible = not module.COMPACT_JSON if flexible is None else flexible
    grammar = llguidance.LLMatcher.grammar_from_json_schema(module.guidance_schema(SCHEMA),
                                                            defaults={"whitespace_flexible": flexible})
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), grammar)
    assert not matcher.is_error(), matcher.get_error()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


def test_spaced_is_json_dumps_layout_and_nothing_else(modules, tokenizer):
    spaced = modules["spaced"]
    assert spaced.JSON_LAYOUT == {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    assert spaced.ENGINE_ARGS["structured_outputs_config"]["disable_any_whitespace"] is True
    for text in (SPACED, '{"a": 1}', '{"a": 1, "b": []}', '{"a": 1, "c": {"d": "x y"}}'):
        assert text == json.dumps(json.loads(text)) and accepts(spaced, tokenizer, text), text
    for text in ('{"a":1}', '{"a" : 1}', '{"a":\n1}', '{"a": 1,"b": [1, 2]}', '{"a": 1, "b": [1,2]}', '{ "a": 1}',
                 '{"a": 1 }', '{"a":  1}', '{"a": 1, "b": [ ]}', '{"a": 1,\n"b": []}'):
        assert not accepts(spaced, tokenizer, text), text


def test_the_layout_holds_whatever_the_engine_default_and_with_lenient_options(modules, tokenizer):
    """x-guidance is read after vLLM's default, so the engine's whitespace flag cannot undo it; a
    schema served leniently keeps the layout."""
    spaced = modules["spaced"]
    for flexible in (True, False):
        assert accepts(spaced, tokenizer, SPACED, flexible=flexible)
        assert not accepts(spaced, tokenizer, '{"a":\n1}', flexible=flexible)
        assert not accepts(spaced, tokenizer, '{"a":1}', flexible=flexible)
    lenient = spaced.guidance_schema(SCHEMA, lenient=True)
    assert lenient["x-guidance"] == {**spaced.JSON_LAYOUT, "lenient": True, "coerce_one_of": True}
    assert "x-guidance" not in modules["compact"].guidance_schema(SCHEMA)


def test_compact_and_any_are_unchanged(modules, tokenizer):
    compact, free = modules["compact"], modules["any"]
    assert compact.JSON_LAYOUT is None and free.JSON_LAYOUT is None
    assert accepts(compact, tokenizer, '{"a":1,"b":[1,2]}')
    assert not accepts(compact, tokenizer, SPACED) and not accepts(compact, tokenizer, '{"a":\n1}')
    for text in ('{"a":1,"b":[1,2]}', SPACED, '{"a" :\n 1}'):
        assert accepts(free, tokenizer, text), text
    assert "disable_any_whitespace" not in free.ENGINE_ARGS["structured_outputs_config"]


def test_vllms_own_serializer_keeps_the_layout(modules):
    """The grammar vLLM 0.32's GuidanceBackend compiles (its own `serialize_guidance_grammar`, which
    merges its default into the schema's `x-guidance`) carries the separators; compact has none."""
    pytest.importorskip("vllm")
    from vllm.v1.structured_output.backend_guidance import serialize_guidance_grammar
    from vllm.v1.structured_output.backend_types import StructuredOutputOptions

    def grammar(module) -> str:
        return serialize_guidance_grammar(StructuredOutputOptions.JSON, json.dumps(module.guidance_schema(SCHEMA)),
                                          disable_any_whitespace=module.COMPACT_JSON)

    def options(module) -> dict:
        return json.loads(grammar(module))["grammars"][0]["json_schema"]["x-guidance"]

    assert options(modules["spaced"]) == {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    assert options(modules["compact"]) == {"whitespace_flexible": False}
    assert options(modules["any"]) == {"whitespace_flexible": True}


def test_the_openai_route_lays_out_every_schema_a_request_carries(modules):
    spaced, layout = modules["spaced"], modules["spaced"].JSON_LAYOUT
    body = {"messages": [], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
            "structured_outputs": {"json": json.dumps(SCHEMA)}, "guided_json": SCHEMA}
    out = spaced._with_defaults("/v1/chat/completions", body)
    assert out["response_format"]["json_schema"] == {"name": "x", "schema": {**SCHEMA, "x-guidance": layout}}
    assert json.loads(out["structured_outputs"]["json"]) == {**SCHEMA, "x-guidance": layout}
    assert out["guided_json"] == {**SCHEMA, "x-guidance": layout}
    assert body["guided_json"] == SCHEMA  # the request itself is not changed
    plain = {"messages": [], "response_format": {"type": "json_object"}, "max_tokens": 5}
    assert spaced._with_defaults("/v1/chat/completions", plain) == plain
    assert modules["compact"]._with_defaults("/v1/chat/completions", body) == {**body, "max_completion_tokens": 2048}


def test_the_local_stand_in_writes_the_layout(modules):
    """`serve --local`'s transformers engine compiles the module's schema as vLLM does: a random
    model, sampling freely, still writes exactly json.dumps's layout."""
    pytest.importorskip("torch")
    from liftdeploy.local import LocalEngine

    engine = LocalEngine(seed=0).for_module(modules["spaced"])
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "tags", "ok"], "additionalProperties": False}
    assert engine.prepare(schema)["x-guidance"] == modules["spaced"].JSON_LAYOUT
    messages = [{"role": "user", "content": "JSON please."}]
    for seed in range(3):
        engine.seed = seed
        result = asyncio.run(engine.generate(messages, schema, max_tokens=128, temperature=1.0, top_p=1.0))
        assert result["finish_reason"] == "stop", result
        assert json.dumps(json.loads(result["text"])) == result["text"]


def test_xgrammar_never_sees_the_layout(modules):
    """Why `check` refuses `spaced` with XGrammar: vLLM compiles its grammar from the engine's one
    flag (any_whitespace=False, separators `,` `:`), and XGrammar ignores `x-guidance`."""
    xgrammar = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    laid_out = json.dumps(modules["spaced"].guidance_schema(SCHEMA))
    grammar = xgrammar.Grammar.from_json_schema(laid_out, any_whitespace=False, separators=(",", ":"))
    assert _is_grammar_accept_string(grammar, '{"a":1,"b":[1,2]}') and not _is_grammar_accept_string(grammar, SPACED)
