"""The rules that hold on Modal and in vLLM, for `liftdeploy check`: what an app's URLs may be,
what a snapshot needs, what a reasoning model needs, what business hours can do.

Each rule looks at one target (the base or one env overlay) and yields `Issue`s; one more looks
across every target of every manifest checked: a label is one URL per Modal environment, so
two apps in one environment must not claim the same label. `checks` turns issues into
diagnostics with their file and line.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from . import compat, sizing, urls
from .manifest import Loaded, Manifest

SNAPSHOT_MEMORY_HEADROOM_GIB = 4.0  # Python, CUDA context and the engine beside the weights


@dataclass(frozen=True)
class Issue:
    severity: Literal["error", "warning"]
    code: str
    path: str  # key path in the manifest
    message: str
    hint: str


def error(code: str, path: str, message: str, hint: str) -> Issue:
    return Issue("error", code, path, message, hint)


def warning(code: str, path: str, message: str, hint: str) -> Issue:
    return Issue("warning", code, path, message, hint)


def hosts(m: Manifest) -> Iterator[Issue]:
    """A host is one DNS label: `<workspace>[-<web suffix>]--<label>` fits in 63 characters."""
    if not m.app.workspace:
        return
    suffix = m.app.assumed_web_suffix
    room = urls.room_for_label(m.app.workspace, suffix)
    for i, ep in enumerate(m.endpoints):
        host = urls.host(m.app.workspace, suffix, ep.label)
        if len(host) > urls.MAX_HOST_CHARS:
            yield error("host-too-long", f"endpoints[{i}].label",
                        f"`{host}.modal.run`: the host has {len(host)} characters, DNS allows "
                        f"{urls.MAX_HOST_CHARS}", f"give `{ep.kind}` a label of at most {room} characters")


def snapshot(m: Manifest) -> Iterator[Issue]:
    """What Modal's GPU memory snapshots of a sleeping vLLM engine need."""
    if not m.cold_start.snapshot:
        return
    vllm = str(m.engine.kind) == "vllm"  # SGLang's memory saver is matched to its release by `sglang_args`
    if vllm and not compat.has(m.image.vllm, compat.SLEEP_MODE_SINCE):
        yield error("snapshot-needs-sleep-mode", "cold_start.snapshot",
                    f"vllm {m.image.vllm} has no sleep mode, which puts the engine to sleep before the snapshot",
                    f"pin vllm>={compat.SLEEP_MODE_SINCE}, or set `cold_start.snapshot = false`")
    multi = [str(g) for g in m.gpus if g.count > 1]
    if m.model.tensor_parallel_size > 1 or multi:
        yield error("snapshot-multi-gpu", "cold_start.snapshot",
                    "GPU memory snapshots do not work with several GPUs per container "
                    f"({', '.join(multi) or 'tensor_parallel_size'}; https://modal.com/docs/guide/memory-snapshots)",
                    "serve on one GPU, or set `cold_start.snapshot = false`")
    weights = sizing.weights_gib(m.model)
    if weights is not None:
        need = int((weights + SNAPSHOT_MEMORY_HEADROOM_GIB) * 1024)
        if m.compute.memory is None or m.compute.memory < need:
            have = "no memory reserved" if m.compute.memory is None else f"{m.compute.memory} MiB reserved"
            yield warning("snapshot-memory", "compute.memory",
                          f"the sleeping engine keeps its weights (~{weights:.0f} GiB) in CPU memory for the snapshot; "
                          f"{have}", f"set `compute.memory = {need}` (MiB) or more")


def thinking(m: Manifest) -> Iterator[Issue]:
    """A reasoning model answers after it thinks: constrain only the answer, or turn thinking off."""
    model = m.model
    if model.thinking and str(m.engine.kind) != "vllm":
        yield error("thinking-unsupported", "model.thinking",
                    f"liftdeploy renders no reasoning parser for {m.engine.kind}: the schema would constrain the "
                    "thinking", "set `model.thinking = false`, or serve with `engine.kind = \"vllm\"`")
        return
    if model.thinking:
        if not model.parser:
            yield error("thinking-without-parser", "model.thinking",
                        f"{model.id} may think before its answer, but no reasoning parser separates the two: the "
                        "schema would constrain the thinking", 'set `model.reasoning_parser` (e.g. "qwen3", '
                        '"deepseek_r1"), or `model.thinking = false`')
        if not compat.has(m.image.vllm, compat.REASONING_SINCE):
            yield error("reasoning-unsupported", "image.pins.vllm",
                        f"vllm {m.image.vllm} has no reasoning parsers", f"pin vllm>={compat.REASONING_SINCE}")
        return
    if model.thinks == "always":
        yield error("thinking-cannot-be-off", "model.thinking",
                    f"{model.id} always thinks before it answers: with the schema on from the first token it "
                    "cannot think, and answers worse or not at all",
                    f"set `model.thinking = true` (reasoning parser `{model.parser}`)")
    if model.reasoning_parser:
        yield warning("parser-unused", "model.reasoning_parser",
                      "a reasoning parser is set but `model.thinking` is false, so it is not used",
                      "set `model.thinking = true`, or remove `reasoning_parser`")


def business_hours(m: Manifest) -> Iterator[Issue]:
    hours = m.scaling.business_hours
    if hours and hours.min_containers <= m.scaling.min_containers:
        yield warning("business-hours-idle", "scaling.business_hours.min_containers",
                      f"business hours keep {hours.min_containers} container(s) warm, no more than "
                      f"`scaling.min_containers` ({m.scaling.min_containers}) always does",
                      "raise `business_hours.min_containers`, or remove `[scaling.business_hours]`")


RULES = (hosts, snapshot, thinking, business_hours)


def issues(loaded: Loaded) -> Iterator[Issue]:
    for rule in RULES:
        yield from rule(loaded.manifest)


def label_collisions(targets: Iterable[Loaded]) -> Iterator[tuple[Loaded, Issue]]:
    """Labels claimed twice in one Modal environment, across every manifest checked: each claimant
    is told which other app (file, env) claims its label."""
    claims: dict[tuple[str, str], list[tuple[Loaded, int]]] = defaultdict(list)
    for loaded in targets:
        for i, ep in enumerate(loaded.manifest.endpoints):
            claims[(loaded.manifest.app.environment, ep.label)].append((loaded, i))
    for (environment, label), claimants in claims.items():
        apps = {(c.manifest.app.name, str(c.path)) for c, _ in claimants}
        if len(apps) < 2:  # one app (the base and an overlay deploying the same app): not a collision
            continue
        for loaded, i in claimants:
            others = sorted({f"`{c.manifest.app.name}` ({c.label})" for c, _ in claimants
                             if (c.manifest.app.name, str(c.path)) != (loaded.manifest.app.name, str(loaded.path))})
            yield loaded, error("label-collision", f"endpoints[{i}].label",
                                f"label `{label}` is claimed in Modal environment `{environment}` also by "
                                + ", ".join(others) + ": one of them would take the other's URL",
                                "give the endpoint its own `label`, or deploy to another `app.environment`")
