"""The rendered module's schema rewrites, checked against the real XGrammar and llguidance:
what each backend is given instead of the user's schema, and why."""

from __future__ import annotations

import json

import pytest

xgrammar = pytest.importorskip("xgrammar")
llguidance = pytest.importorskip("llguidance")

BOUNDED = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}}, "required": ["name"],
           "additionalProperties": False}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """qwen3-8b's module with compact JSON: the rewrites on their own, without a layout (tests/test_json_layouts.py)."""
    from tests.test_json_layouts import rendered

    return rendered(tmp_path_factory.mktemp("rewrites"), "compact")


def xgrammar_accepts(schema: dict, text: str) -> bool:
    from xgrammar.testing import _is_grammar_accept_string

    grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
    return _is_grammar_accept_string(grammar, text)  # compiled as vLLM compiles it for compact JSON


def test_xgrammar_lets_control_characters_into_bounded_strings():
    """The defect itself (mlc-ai/xgrammar#800), on the installed XGrammar: if this fails, the
    release fixed it; raise compat.XGRAMMAR_BOUNDED_STRINGS_CHECKED_TO past it."""
    assert xgrammar_accepts(BOUNDED, '{"name":"a\x07b"}')  # a raw BEL: not JSON
    assert not xgrammar_accepts({"type": "object", "properties": {"name": {"type": "string"}}}, '{"name":"a\x07b"}')


def test_bounded_strings_become_patterns_that_xgrammar_compiles_correctly(runtime):
    safe = runtime.xgrammar_safe(BOUNDED)
    assert safe["properties"]["name"] == {"type": "string", "pattern": '^[^\\u0000-\\u001f"\\\\]{0,5}$'}
    assert not xgrammar_accepts(safe, '{"name":"a\x07b"}')
    assert not xgrammar_accepts(safe, '{"name":"a\x00b"}')
    assert xgrammar_accepts(safe, '{"name":"héllo"}') and xgrammar_accepts(safe, '{"name":""}')
    assert not xgrammar_accepts(safe, '{"name":"abcdef"}')  # the bound still holds
    bounded_below = runtime.xgrammar_safe({"type": "string", "minLength": 2})
    assert bounded_below["pattern"] == '^[^\\u0000-\\u001f"\\\\]{2,}$'


def test_rewrites_touch_schemas_never_values(runtime):
    value = {"type": "string", "maxLength": 3, "properties": {}}
    schema = {"enum": [value], "const": value, "default": value, "examples": [value],
              "properties": {"maxLength": {"type": "string", "maxLength": 3}}}
    safe = runtime.xgrammar_safe(schema)
    assert safe["enum"] == [value] and safe["const"] == value and safe["default"] == value
    assert safe["properties"]["maxLength"]["pattern"]  # a property *named* maxLength is still a schema
    closed = runtime.guidance_schema({"default": {"properties": {}}, "properties": {"a": {"type": "object",
                                                                                           "properties": {}}}})
    assert closed["default"] == {"properties": {}} and closed["properties"]["a"]["additionalProperties"] is False


def test_strings_with_a_pattern_or_format_keep_their_bounds(runtime):
    for schema in ({"type": "string", "maxLength": 4, "pattern": "^a+$"}, {"type": "string", "maxLength": 40,
                                                                             "format": "email"}):
        assert runtime.xgrammar_safe(schema) == schema


def test_guidance_closes_objects_as_xgrammar_does(runtime):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}},
              "$defs": {"x": {"properties": {"b": {}}, "additionalProperties": True}}}
    closed = runtime.guidance_schema(schema)
    assert closed["additionalProperties"] is False
    assert closed["$defs"]["x"]["additionalProperties"] is True  # what the schema says stays
    assert runtime.guidance_schema({"type": "object"}) == {"type": "object"}  # no properties listed: left open


def llguidance_accepts(schema: dict, text: str) -> bool:
    import llguidance.hf
    from transformers import AutoTokenizer

    from liftdeploy.local.smoke import smoke_model_dir

    tokenizer = AutoTokenizer.from_pretrained(smoke_model_dir("qwen2"))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), grammar)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


def test_lenient_guidance_enforces_property_dependencies(runtime):
    """llguidance refuses `dependencies`; rewritten to the anyOf it means, it is enforced."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
                                               "c": {"type": "integer"}},
              "dependencies": {"b": ["a"], "c": {"required": ["a"]}}}
    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(schema))
    assert "dependencies" in error
    lenient = runtime.guidance_schema(schema, lenient=True)
    assert "dependencies" not in lenient and lenient["x-guidance"] == {"lenient": True, "coerce_one_of": True}
    assert llguidance_accepts(lenient, '{"a":1,"b":2}')
    assert not llguidance_accepts(lenient, '{"b":2}')  # b without a
    assert not llguidance_accepts(lenient, '{"c":3}')  # c without a
    assert llguidance_accepts(lenient, '{"a":1}')


def test_not_anything_becomes_false(runtime):
    lenient = runtime.guidance_schema({"properties": {"gone": {"not": {}}, "kept": {"type": "boolean"}}},
                                      lenient=True)
    assert lenient["properties"]["gone"] is False
    assert not llguidance_accepts(lenient, '{"gone":1}') and llguidance_accepts(lenient, '{"kept":true}')


# ## Formats: what each backend enforces, the rest dropped before compiling

FORMATS = ["email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
           "uri-reference", "uri-template", "json-pointer", "relative-json-pointer", "iri", "idn-email", "regex",
           "byte", "binary", "base64url", "int32", "password"]


def test_llguidance_enforces_exactly_the_guidance_formats(runtime):
    def known(fmt: str) -> bool:
        grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "string", "format": fmt})
        return not llguidance.LLMatcher.validate_grammar(grammar)

    assert {fmt for fmt in FORMATS if known(fmt)} == runtime.ENFORCED_FORMATS["guidance"]


def test_vllm_s_xgrammar_validator_takes_exactly_the_xgrammar_formats(runtime):
    backend = pytest.importorskip("vllm.v1.structured_output.backend_xgrammar")
    assert runtime.ENFORCED_FORMATS["xgrammar"] == backend.STRING_SUPPORTED_FORMATS


def test_unknown_formats_are_dropped_everywhere_and_nothing_else(runtime):
    schema = {"type": "object", "properties": {
        "format": {"type": "string", "format": "byte"},  # a property named `format` stays
        "day": {"type": "string", "format": "date"},
        "list": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "value": {"enum": [{"format": "byte"}]},  # a value, not a schema
    }, "$defs": {"b": {"anyOf": [{"type": "string", "format": "base64url"}, {"type": "null"}]}}}
    served = runtime.served_schema(schema)
    assert served["properties"]["format"] == {"type": "string"}
    assert served["properties"]["day"] == {"type": "string", "format": "date"}
    assert served["properties"]["list"]["items"] == {"type": "string"}
    assert served["properties"]["value"] == {"enum": [{"format": "byte"}]}
    assert served["$defs"]["b"]["anyOf"][0] == {"type": "string"}
    assert schema["properties"]["format"]["format"] == "byte"  # the schema outputs are judged by keeps it


def test_a_reason_is_kept_whole_on_one_line(runtime):
    reason = runtime.whole_reason("regex parse error:\n    (?=x)abc\n    ^^^\nerror: look-around is not supported\n")
    assert reason == "regex parse error: (?=x)abc ^^^ error: look-around is not supported"
    assert len(runtime.whole_reason("x" * 5000)) == runtime.MAX_REASON_CHARS
