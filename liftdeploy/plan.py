"""`liftdeploy plan`: what will be deployed, what it costs, how long a cold start takes, and
what changed since the last apply.

Like a terraform plan: a fixed symbol column (`+` add, `-/+` replace, `~` change in place,
`-` remove), one summary line, and an explicit sentence when nothing changes. On Modal every
deploy rolls the GPU class over to new containers, so a change is either a replacement (a new
image, or new containers: a cold start either way) or in place (autoscaler settings, which
`apply` hands to Modal's autoscaler without deploying).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import catalog, sglang_args, sizing, urls
from .manifest import Loaded, Manifest
from .modal_env import ModalEnvironment
from .state import State, read_state, settings

NEW_IMAGE = "new image → cold start"
NEW_CONTAINERS = "new containers → cold start"
IN_PLACE = "in place"
# What goes into the GPU image: its pins, its base, and the environment variables rendered from
# the volumes and the cold-start switches (HF_HOME, VLLM_CACHE_ROOT, snapshot settings).
IMAGE_KEYS = ("image.", "volumes.", "cold_start.fast_download", "cold_start.snapshot", "cold_start.compile_cache")
# What Modal's autoscaler takes without a deploy (`update_autoscaler`).
AUTOSCALER_KEYS = ("scaling.min_containers", "scaling.max_containers", "scaling.buffer_containers",
                   "scaling.scaledown_window")


@dataclass(frozen=True)
class Change:
    symbol: str  # + ~ - (as diffed); `line` shows a replacement as -/+
    key: str
    old: Any
    new: Any
    effect: str = ""  # NEW_IMAGE, NEW_CONTAINERS or IN_PLACE, for a `~`

    def line(self) -> str:
        if self.symbol == "+":
            return f"  +   {self.key}: {self.new}"
        if self.symbol == "-":
            return f"  -   {self.key}: {self.old}"
        mark = "~  " if self.effect == IN_PLACE else "-/+"
        return f"  {mark} {self.key}: {self.old} → {self.new}   ({self.effect})"


def effect(key: str, m: Manifest) -> str:
    """What applying a change of `key` does to the running app."""
    if key.startswith(IMAGE_KEYS):
        return NEW_IMAGE
    if key in AUTOSCALER_KEYS and m.scaling.business_hours is None:
        # with business hours, the scheduled functions carry these values: a deploy must change them
        return IN_PLACE
    return NEW_CONTAINERS


def diff(old: dict[str, Any], new: dict[str, Any], m: Manifest | None = None) -> list[Change]:
    changes = [Change("~", k, old[k], new[k], effect(k, m) if m else "") for k in new if k in old and old[k] != new[k]]
    changes += [Change("+", k, None, new[k]) for k in new if k not in old]
    changes += [Change("-", k, old[k], None) for k in old if k not in new]
    return sorted(changes, key=lambda c: c.key)


def in_place(changes: list[Change]) -> bool:
    """Whether every change can be applied without a deploy (and there is at least one)."""
    return bool(changes) and all(c.symbol == "~" and c.effect == IN_PLACE for c in changes)


def summary(changes: list[Change]) -> str:
    count = {s: sum(c.symbol == s for c in changes) for s in "+~-"}
    changed = [c for c in changes if c.symbol == "~"]
    how = ""
    if changed:
        cold = sum(c.effect != IN_PLACE for c in changed)
        how = f" ({cold} with a cold start, {len(changed) - cold} in place)"
    return f"Plan: {count['+']} to add, {count['~']} to change{how}, {count['-']} to remove."


def _money(low: float, high: float) -> str:
    return f"${low:.2f}/h" if abs(high - low) < 0.005 else f"${low:.2f}–${high:.2f}/h"


def cost_lines(m: Manifest) -> list[str]:
    """What a container costs on each GPU of the chain (Modal takes whichever is free)."""
    prices = [sizing.hourly_usd(spec, m) for spec in m.gpus]
    low, high = min(prices), max(prices)
    region = catalog.region_multiplier(m.compute.region)
    where = f", ×{region:g} for region {m.compute.region}" if region != 1.0 else ""
    lines = [f"  cost         {_money(low, high)} per busy container, by GPU of the chain{where}"]
    s = m.scaling
    lines.append(f"               idle {_money(low * s.min_containers, high * s.min_containers)} "
                 f"(min_containers {s.min_containers})")
    hours = s.business_hours
    if hours:
        week = weekly_hours(hours.days, hours.start, hours.end) * (hours.min_containers - s.min_containers)
        lines.append(f"               business hours +${low * week:.0f}–${high * week:.0f} a week "
                     f"({hours.min_containers} warm {hours.start}–{hours.end} {hours.timezone}, days {hours.days})")
    return lines


def weekly_hours(days: str, start: str, end: str) -> float:
    """Hours a week inside `start`–`end` on cron `days` (an end before the start runs overnight)."""
    weekdays: set[int] = set()
    for part in days.split(","):
        if part == "*":
            weekdays.update(range(7))
            continue
        first, _, last = part.partition("-")
        weekdays.update(d % 7 for d in range(int(first), int(last or first) + 1))
    minutes = [int(t[:2]) * 60 + int(t[3:]) for t in (start, end)]
    length = (minutes[1] - minutes[0]) % (24 * 60)
    return len(weekdays) * length / 60


def endpoint_urls(m: Manifest, env: ModalEnvironment | None = None) -> tuple[dict[str, str], str]:
    """Each label's predicted URL, and where the workspace and web suffix came from."""
    workspace = m.app.workspace or (env.workspace if env else None)
    if env is not None and env.exists and env.web_suffix is not None:
        suffix, said = env.web_suffix, "web suffix from Modal"
    elif m.app.web_suffix is not None:
        suffix, said = m.app.web_suffix, "web suffix from `app.web_suffix`"
    else:
        suffix = m.app.assumed_web_suffix
        said = f"web suffix assumed: {'none' if not suffix else f'`{suffix}`'} (set `app.web_suffix`)"
    if workspace:
        return {ep.label: urls.url(workspace, suffix, ep.label) for ep in m.endpoints}, said
    source = "<workspace>" + (f"-{suffix}" if suffix else "")
    return {ep.label: f"https://{source}--{ep.label}.modal.run" for ep in m.endpoints}, said + "; set `app.workspace`"


def describe(loaded: Loaded, state: State | None = None, env: ModalEnvironment | None = None) -> str:
    """The plan as text; `env` is what Modal said about the environment, when it was asked."""
    m = loaded.manifest
    state = state if state is not None else read_state(loaded)
    lines = [f"liftdeploy plan: {loaded.label}", ""]
    lines.append(f"  app          {m.app.name} in Modal environment `{m.app.environment}`"
                 + (f": {env.describe()}" if env is not None else ""))
    revision = f" @ {m.model.revision[:12]}" if m.model.revision else " (unpinned)"
    thinks = (f"; thinks first (reasoning parser {m.model.parser})" if m.model.thinking
              else "; thinking off (enable_thinking=False)" if m.model.thinks == "hybrid" else "")
    lines.append(f"  model        {m.model.id}{revision}{thinks}")
    backend = sglang_args.grammar_backend(m) if str(m.engine.kind) == "sglang" else m.backend
    engine = {"vllm": "vLLM", "sglang": "SGLang"}[str(m.engine.kind)]
    lines.append(f"  engine       {engine} {m.engine_version}, grammar backend {backend}, whitespace {m.whitespace}")
    fits = sizing.fits(m)
    gpus = ", ".join(f"{f.spec} (${sizing.hourly_usd(f.spec, m):.2f}/h{'' if f.fits else ', too small'})" for f in fits)
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
    most = s.max_containers if s.max_containers is not None else "∞"
    lines.append(f"  scaling      containers {s.min_containers}–{most}"
                 + (f" (+{s.buffer_containers} buffer while busy)" if s.buffer_containers else "")
                 + f", scaledown after {s.scaledown_window} s idle, timeout {s.timeout} s, "
                 f"startup {s.startup_timeout} s")
    graphs = sizing.capture_sizes(c.max_inputs) if not m.cold_start.fast_boot else []
    lines.append(f"  concurrency  {c.max_inputs} requests per container" + (f" (autoscaler target {c.target_inputs})"
                 if c.target_inputs else "") + "; more wait in Modal's queue for another container")
    batch = "max_num_seqs" if engine == "vLLM" else "max running requests"
    lines.append(f"  batching     {engine} {batch} {c.max_inputs}; "
                 + (f"CUDA graphs for {len(graphs)} batch sizes ({graphs[0]}–{graphs[-1]})" if graphs
                    else "no CUDA graphs (fast_boot)")
                 + ("; sleeps for a memory + GPU snapshot" if m.cold_start.snapshot else ""))
    lines.extend(cost_lines(m))
    estimate = sizing.cold_start(m)
    if estimate:
        lines.append(f"  cold start   {estimate.describe()}")
    found, said = endpoint_urls(m, env)
    lines.append(f"  endpoints    ({said})")
    for ep in m.endpoints:
        where = "no GPU" if not ep.on_gpu else "GPU class"
        lines.append(f"    {ep.kind.value:<9} {found[ep.label]}  auth={ep.auth.value}  ({where})")
    lines.append("")
    current = settings(loaded)
    if state is None:
        lines.append("No previous apply is recorded: the whole deployment will be created (a cold start).")
        changes = diff({}, current)
        lines.extend(c.line() for c in changes)
        lines.append("")
    else:
        changes = diff(state.settings, current, m)
        if not changes:
            lines.append(f"No changes. The deployment matches the last apply ({state.applied_at}, {state.tag}).")
            return "\n".join(lines)
        lines.append(f"Changes since the last apply ({state.applied_at}, {state.tag}):")
        lines.extend(c.line() for c in changes)
        if in_place(changes):
            lines.append("Every change is in place: `apply` updates Modal's autoscaler without a deploy.")
        lines.append("")
    lines.append(summary(changes))
    return "\n".join(lines)
