"""`decoding.whitespace = "spaced"` on the real engine: `liftdeploy serve --local --engine vllm`
(vLLM's CPU build, the random smoke model, guidance) writes exactly json.dumps's layout, through
`generate` and through vLLM's own OpenAI server."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.engine

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
                                           "who": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                   "required": ["ok"], "additionalProperties": False}},
          "required": ["n", "tags", "who"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.conftest import DEPLOYMENTS
    from tests.support.vllm_server import serve_vllm

    folder = tmp_path_factory.mktemp("spaced")
    manifest = folder / "spaced.toml"
    manifest.write_text((DEPLOYMENTS / "qwen3-8b.toml").read_text() + '\n[decoding]\nwhitespace = "spaced"\n')
    with serve_vllm(manifest, folder) as served:
        yield served


def test_generate_writes_json_dumps_layout(server):
    for temperature in (0.0, 1.0, 1.0):
        body = server.post("generate", {"prompt": "Fill in the fields.", "schema": SCHEMA, "max_tokens": 96,
                                        "temperature": temperature}).json()
        assert body["finish_reason"] == "stop", body
        assert json.dumps(json.loads(body["text"])) == body["text"]  # the raw text, not only the parsed value


def test_the_openai_route_writes_it_too(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.route('openai')}/v1", api_key=server.headers["Authorization"].split()[1])
    reply = client.chat.completions.create(
        model="Qwen/Qwen3-8B", messages=[{"role": "user", "content": "Fill in the fields."}], max_tokens=96,
        temperature=1.0, n=2, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice
        assert json.dumps(json.loads(choice.message.content)) == choice.message.content
