"""After a deploy: warm the model up, then smoke-test every endpoint.

`warmup` polls the warm-up endpoint until the model reports loaded or the deadline
passes (600 s by default: the seeds' 32B took 7 minutes). `smoke` checks health,
warm-up and one schema-constrained generation validated against its schema.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .client import Client, ClientError, Timeouts
from .errors import StepError

SMOKE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "arity": {"type": "integer", "minimum": 0, "maximum": 8},
        "pure": {"type": "boolean"},
    },
    "required": ["name", "arity", "pure"],
    "additionalProperties": False,
}
SMOKE_PROMPT = "Describe the function add(a, b) as JSON."


def warmup(client: Client, *, deadline: float = 600.0, poll: float = 5.0,
           progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Poll until the model is loaded; returns the warm-up answer, raises StepError at the deadline."""
    started = time.monotonic()
    last = "no answer yet"
    while True:
        elapsed = time.monotonic() - started
        remaining = deadline - elapsed
        if remaining <= 0:
            raise StepError("warm-up", f"the model was not ready after {deadline:.0f} s ({last})",
                            "raise --timeout, or check the container logs: modal app logs APP")
        try:
            answer = client.call("warmup", read_timeout=max(1.0, min(remaining, 120.0)))
            if answer.get("model_loaded"):
                return answer
            last = f"status {answer.get('status')}"
        except ClientError as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                raise StepError("warm-up", exc.message, exc.hint) from None
            last = exc.message
        if progress:
            progress(time.monotonic() - started, last)
        time.sleep(min(poll, max(0.0, deadline - (time.monotonic() - started))))


@dataclass
class SmokeResult:
    health: dict[str, Any]
    warmup: dict[str, Any]
    generation: Any
    seconds: float


def smoke(client: Client) -> SmokeResult:
    """Health, warm-up, then one constrained generation that must match its schema."""
    import jsonschema  # only smoke needs it

    started = time.monotonic()
    kinds = set(client.kinds.values())
    try:
        health = client.health() if "health" in kinds else {"status": "healthy"}
        warm = client.warmup() if "warmup" in kinds else {}
        generation = client.generate(SMOKE_PROMPT, SMOKE_SCHEMA, max_tokens=256, temperature=0.0)
    except ClientError as exc:
        raise StepError("smoke test", exc.message, exc.hint) from None
    if health.get("status") != "healthy":
        raise StepError("smoke test", f"health answered {health!r}")
    if generation.complete:
        try:
            jsonschema.validate(generation.ir_json, SMOKE_SCHEMA)
        except jsonschema.ValidationError as exc:
            raise StepError("smoke test", f"the output does not match its schema: {exc.message}",
                            "constrained decoding is not in effect; check the vLLM pin and decoding backend") from None
    elif generation.finish_reason != "length":
        raise StepError("smoke test", f"incomplete output with finish_reason {generation.finish_reason!r}")
    return SmokeResult(health, warm, generation, time.monotonic() - started)


def client_for(target: str, env: str | None = None, *, timeout: float = 600.0, cls: type = Client,
               **kwargs: Any) -> Any:
    """A client (`cls`: Client or AsyncClient) for a manifest (URLs derived) or a base URL (`serve --local`)."""
    timeouts = Timeouts(cold_read=timeout)
    if target.startswith(("http://", "https://")):
        return cls.for_url(target, timeouts=timeouts, **kwargs)
    return cls.for_manifest(target, env, timeouts=timeouts, **kwargs)
