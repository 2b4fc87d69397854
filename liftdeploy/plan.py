"""`liftdeploy plan`: what will be deployed, and what changed since the last apply.

Like a terraform plan: a fixed symbol column (`+` add, `~` change, `-` remove), one
summary line, and an explicit sentence when nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import sglang_args, sizing
from .manifest import Loaded
from .state import State, read_state, settings
from .urls import modal_urls


@dataclass(frozen=True)
class Change:
    symbol: str  # + ~ -
    key: str
    old: Any
    new: Any

    def line(self) -> str:
        if self.symbol == "+":
            return f"  + {self.key}: {self.new}"
        if self.symbol == "-":
            return f"  - {self.key}: {self.old}"
        return f"  ~ {self.key}: {self.old} → {self.new}"


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    changes = [Change("~", k, old[k], new[k]) for k in new if k in old and old[k] != new[k]]
    changes += [Change("+", k, None, new[k]) for k in new if k not in old]
    changes += [Change("-", k, old[k], None) for k in old if k not in new]
    return sorted(changes, key=lambda c: c.key)


def summary(changes: list[Change]) -> str:
    count = {s: sum(c.symbol == s for c in changes) for s in "+~-"}
    return f"Plan: {count['+']} to add, {count['~']} to change, {count['-']} to remove."


def describe(loaded: Loaded, state: State | None = None) -> str:
    """The plan as text."""
    m = loaded.manifest
    state = state if state is not None else read_state(loaded)
    lines = [f"liftdeploy plan: {loaded.label}", ""]
    lines.append(f"  app          {m.app.name} in Modal environment `{m.app.environment}`")
    revision = f" @ {m.model.revision[:12]}" if m.model.revision else " (unpinned)"
    lines.append(f"  model        {m.model.id}{revision}")
    backend = sglang_args.grammar_backend(m) if str(m.engine.kind) == "sglang" else m.decoding.backend
    engine = {"vllm": "vLLM", "sglang": "SGLang"}[str(m.engine.kind)]
    lines.append(f"  engine       {engine} {m.engine_version}, grammar backend {backend}")
    fits = sizing.fits(m)
    gpus = ", ".join(f"{f.spec} (${f.spec.usd_per_hour:.2f}/h{'' if f.fits else ', too small'})" for f in fits)
    lines.append(f"  gpu          {gpus}  — tried in this order")
    need = sizing.needed_gib(m.model)
    if need is not None:
        active = m.model.known.active_b if m.model.known else None
        moe = f"; a mixture of experts: {active:g}B active per token, all {m.model.size_b:g}B held" if active else ""
        lines.append(f"  memory       ~{need:.0f} GiB needed (weights + KV reserve{moe})")
    pins = ", ".join(m.image.requirements())
    lines.append(f"  image        Python {m.image.python} on {m.image.base or 'debian_slim'}: {pins}")
    for role in ("weights", "compile_cache"):
        volume = getattr(m.volumes, role)
        if volume:
            lines.append(f"  volume       {volume.name} at {volume.mount} ({role.replace('_', ' ')})")
    s, c = m.scaling, m.concurrency
    lines.append(f"  scaling      scaledown {s.scaledown_window} s, containers {s.min_containers}–"
                 f"{s.max_containers if s.max_containers is not None else '∞'}"
                 + (f" (+{s.buffer_containers} buffer)" if s.buffer_containers else "")
                 + f", timeout {s.timeout} s, startup {s.startup_timeout} s")
    lines.append(f"  concurrency  {c.max_inputs} inputs per container"
                 + (f" (target {c.target_inputs})" if c.target_inputs else "")
                 + (f", queue {c.queue}" if c.queue else ""))
    first = m.gpus[0]
    idle = s.min_containers * first.usd_per_hour
    lines.append(f"  cost         ${first.usd_per_hour:.2f}/h per busy container on {first}; "
                 f"idle ${idle:.2f}/h (min_containers {s.min_containers})")
    estimate = sizing.cold_start(m)
    if estimate:
        lines.append(f"  cold start   {estimate.describe()}")
    urls = (modal_urls(m.app.workspace, m.app.environment, m.endpoints) if m.app.workspace
            else {ep.label: f"https://<workspace>--{ep.label}.modal.run" for ep in m.endpoints})
    lines.append("  endpoints")
    for ep in m.endpoints:
        where = "no GPU" if not ep.on_gpu else "GPU class"
        lines.append(f"    {ep.kind.value:<9} {urls[ep.label]}  auth={ep.auth.value}  ({where})")
    lines.append("")
    current = settings(loaded)
    if state is None:
        lines.append("No previous apply is recorded: the whole deployment will be created.")
        changes = diff({}, current)
        lines.extend(c.line() for c in changes)
        lines.append("")
    else:
        changes = diff(state.settings, current)
        if not changes:
            lines.append(f"No changes. The deployment matches the last apply ({state.applied_at}, {state.tag}).")
            return "\n".join(lines)
        lines.append(f"Changes since the last apply ({state.applied_at}, {state.tag}):")
        lines.extend(c.line() for c in changes)
        lines.append("")
    lines.append(summary(changes))
    return "\n".join(lines)
