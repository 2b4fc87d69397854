"""Where each vLLM release keeps its OpenAI-compatible server, and how it is built on an engine.

The `openai` endpoint of a rendered module is vLLM's own OpenAI server, built in-process on the
engine that serves `generate`. Its entry points moved between releases; this table says, for
each range of releases, what the rendered code imports and calls. Read from the wheels of every
release range (the first release of each row, and its neighbours, were checked); the contract
tests run the rendered code against the real wheels of 0.6.5, 0.9.2, 0.11.0 and 0.32.0.

Only the standard library and `packaging` are imported: `render` runs without vLLM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from packaging.version import Version

__all__ = ["TOOL_CALL_PARSERS", "OpenAIServerApi", "openai_server_api"]


@dataclass(frozen=True)
class OpenAIServerApi:
    """The entry points of vLLM's OpenAI server in a range of releases."""

    first: str  # the first release of the range
    # How the app's state is initialised on an engine client:
    #   "model_config_sync"  init_app_state(engine_client, model_config, state, args)
    #   "model_config"       await init_app_state(engine_client, model_config, state, args)
    #   "vllm_config"        await init_app_state(engine_client, vllm_config, state, args)
    #   "state"              await init_app_state(engine_client, state, args)
    #   "tasks"              await init_app_state(engine_client, state, args, supported_tasks)
    init: str
    build: str  # "args": build_app(args); "tasks": (args, tasks); "tasks_config": (args, tasks, model_config)
    modules: str  # "openai": vllm.entrypoints.openai.api_server; "launchers": vllm.entrypoints.launchers
    parser: str  # make_arg_parser's module: vllm.entrypoints.{openai,launchers,common}.cli_args
    argparse: str  # where FlexibleArgumentParser lives: "utils" (vllm.utils) or "argparse_utils"
    protocol: str  # request models: "single" (openai.protocol) or "split" (openai.chat_completion.protocol, ...)
    flat_errors: bool  # ErrorResponse is {"object": "error", "message", ...} rather than {"error": {...}}
    ignored: tuple[str, ...]  # request fields vLLM accepts and does not act on

    def context(self) -> dict[str, object]:
        return asdict(self)


# `user` is ignored by every release; `parallel_tool_calls` (ignored "-- the model determines the
# behavior") is honoured from 0.12.0 on.
_USER = ("user",)
_BOTH = ("parallel_tool_calls", "user")

# Newest first. Each row was read from the wheel of its first release and of the release before it.
_Api = OpenAIServerApi
_APIS: tuple[OpenAIServerApi, ...] = (
    _Api("0.33.0", "tasks", "tasks_config", "launchers", "common", "argparse_utils", "split", False, _USER),
    _Api("0.29.0", "tasks", "tasks_config", "launchers", "launchers", "argparse_utils", "split", False, _USER),
    _Api("0.19.0", "tasks", "tasks_config", "openai", "openai", "argparse_utils", "split", False, _USER),
    _Api("0.16.0", "tasks", "tasks", "openai", "openai", "argparse_utils", "split", False, _USER),
    _Api("0.15.0", "state", "args", "openai", "openai", "argparse_utils", "split", False, _USER),
    _Api("0.12.0", "state", "args", "openai", "openai", "argparse_utils", "single", False, _USER),
    _Api("0.11.1", "state", "args", "openai", "openai", "argparse_utils", "single", False, _BOTH),
    _Api("0.10.1", "vllm_config", "args", "openai", "openai", "utils", "single", False, _BOTH),
    _Api("0.8.5", "vllm_config", "args", "openai", "openai", "utils", "single", True, _BOTH),
    _Api("0.7.0", "model_config", "args", "openai", "openai", "utils", "single", True, _BOTH),
    _Api("0.6.3", "model_config_sync", "args", "openai", "openai", "utils", "single", True, _BOTH),
)


def openai_server_api(vllm_version: str) -> OpenAIServerApi:
    """The OpenAI-server entry points of a vLLM release (0.6.3 on)."""
    version = Version(vllm_version)
    for api in _APIS:
        if version >= Version(api.first):
            return api
    raise ValueError(f"vllm {vllm_version} predates 0.6.3: its OpenAI server cannot be built on a shared engine")


# vLLM's tool-call parser for each model family it knows the output format of (vLLM's tool-calling
# docs); a model of another family gets none, and vLLM refuses `tools` with `tool_choice` then.
TOOL_CALL_PARSERS: dict[str, str] = {
    "qwen2": "hermes",
    "qwen3": "hermes",
    "llama": "llama3_json",
    "mistral": "mistral",
}
