"""Placeholder until the knowledge base lands: the vLLM structured-output API families."""

from packaging.version import Version


def api_family(vllm_version: str) -> str:
    v = Version(vllm_version)
    if v < Version("0.6.3"):
        return "guided_options_request"
    if v < Version("0.11"):
        return "guided_decoding"
    if v < Version("0.12"):
        return "structured_outputs_compat"
    return "structured_outputs"
