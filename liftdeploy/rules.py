"""The rules of `liftdeploy check`: each looks at one target (the base or one env) and
yields `Diagnostic`s.

A rule is a function of a `Loaded` target, registered with `@rule`; it yields
`error(...)` or `warning(...)`, which name the rule's code, the key path it is about, the
message and the hint, and find the line in the manifest themselves:

    @rule
    def tiny_timeout(loaded: Loaded) -> Iterator[Diagnostic]:
        if loaded.manifest.scaling.timeout < 10:
            yield warning(loaded, "tiny-timeout", "scaling.timeout", "10 s cannot fit one request",
                          "raise `scaling.timeout`")

Errors fail the check (and block `apply` of that target); warnings fail it only with
`--strict`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from packaging.utils import canonicalize_name

from . import catalog, compat, sizing
from ._toml_lines import locate
from .errors import Diagnostic, Severity
from .installed import modal_client_problem
from .manifest import Auth, Loaded

Rule = Callable[[Loaded], Iterator[Diagnostic]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    """Register a rule: `check` and `apply` run every registered rule on every target."""
    RULES.append(fn)
    return fn


def diagnostic(loaded: Loaded, severity: Severity, code: str, path: str, message: str, hint: str) -> Diagnostic:
    """A diagnostic about `path` (a dotted key path, `compute.gpu[0]`) of one target, with its line:
    in the target's `[env.<name>]` table when the overlay sets the key, else in the base."""
    loc = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]", path) if p]
    line = locate(loaded.text, loc, loaded.env) or locate(loaded.text, loc, None)
    return Diagnostic(message, hint, str(loaded.path), line, path, loaded.env, severity, code)


def error(loaded: Loaded, code: str, path: str, message: str, hint: str) -> Diagnostic:
    return diagnostic(loaded, "error", code, path, message, hint)


def warning(loaded: Loaded, code: str, path: str, message: str, hint: str) -> Diagnostic:
    return diagnostic(loaded, "warning", code, path, message, hint)


@rule
def pins(loaded: Loaded) -> Iterator[Diagnostic]:
    """Pins against the knowledge base of the engine's releases and curated runtime conflicts."""
    m = loaded.manifest
    pinned = dict(m.image.pins)  # names keep their extras (`sglang[all]`): the checks read them
    for req in m.image.packages:
        name, _, version = req.partition("==")
        pinned.setdefault(name, version)
    keys: dict[str, str] = {canonicalize_name(name.split("[")[0]): name for name in m.image.pins}
    for f in compat.engine_pin_findings(str(m.engine.kind), pinned, m.image.python):
        path = f"image.pins.{keys[f.package]}" if f.package in keys else "image.pins"
        if f.code.startswith("python"):
            path = "image.python"
        yield diagnostic(loaded, "warning" if f.severity == "warning" else "error", f.code, path, f.message, f.hint)


@rule
def api_family(loaded: Loaded) -> Iterator[Diagnostic]:
    m = loaded.manifest
    if str(m.engine.kind) != "vllm":
        return  # SGLang's settings are matched to its release when the manifest validates
    family = compat.api_family(m.image.vllm)
    if family == "guided_options_request":
        yield error(loaded, "vllm-api-unsupported", "image.pins.vllm",
                    f"vllm {m.image.vllm} takes structured outputs only through"
                    " `LLM.generate(guided_options_request=...)`, which the async engine cannot use",
                    "pin vllm>=0.6.5 (XGrammar) or newer")
    if m.backend == "xgrammar" and not compat.supports_xgrammar(m.image.vllm):
        yield error(loaded, "xgrammar-unavailable", "decoding.backend",
                    f"vllm {m.image.vllm} has no xgrammar backend (added in 0.6.5)", "pin vllm>=0.6.5")


@rule
def decoding(loaded: Loaded) -> Iterator[Diagnostic]:
    """What the structured-output settings need from the pinned vLLM, and XGrammar's known defect."""
    m = loaded.manifest
    if str(m.engine.kind) != "vllm":
        return  # SGLang's settings are matched to its release when the manifest validates
    v1 = compat.v1_structured_output(m.image.vllm)
    if m.decoding.backend == "guidance" and not v1:
        yield error(loaded, "guidance-unavailable", "decoding.backend",
                    f"vllm {m.image.vllm} has no guidance backend that liftdeploy can pre-check (vLLM's V1 "
                    "structured outputs, 0.9 and later)", 'pin vllm>=0.9, or set `backend = "xgrammar"`')
    if m.decoding.whitespace == "compact" and not v1:
        yield error(loaded, "whitespace-unavailable", "decoding.whitespace",
                    f"vllm {m.image.vllm} cannot keep constrained JSON compact (disable_any_whitespace "
                    "came with vLLM's V1 structured outputs, 0.9 and later)",
                    'pin vllm>=0.9, or set `whitespace = "any"`')
    if m.decoding.whitespace == "spaced" and m.backend != "guidance":
        yield error(loaded, "whitespace-layout-unavailable", "decoding.whitespace",
                    "the `spaced` layout reaches only llguidance (as the schema's `x-guidance` options); vLLM "
                    f"gives {m.backend} just its on/off switch for free whitespace",
                    'set `backend = "guidance"` (vLLM 0.9 or later), or `whitespace = "compact"`')
    xgrammar = compat.xgrammar_version(m.image.pins, m.image.vllm)
    if m.backend == "xgrammar" and compat.xgrammar_bounded_strings_defect(xgrammar):
        yield warning(loaded, "xgrammar-bounded-strings", "decoding.backend",
                      f"xgrammar {xgrammar or '(the version vLLM pulls in)'} compiles strings with minLength/"
                      "maxLength to a rule that admits raw control characters, invalid JSON "
                      "(mlc-ai/xgrammar#800); the rendered app rewrites them as patterns, which also keeps "
                      "escapes (\\\" \\\\ \\n) out of such strings",
                      'set `backend = "guidance"` (the default), which has neither limit')


@rule
def gpu_memory(loaded: Loaded) -> Iterator[Diagnostic]:
    m = loaded.manifest
    for i, fit in enumerate(sizing.fits(m)):
        path = f"compute.gpu[{min(i, len(m.compute.gpu) - 1)}]"
        if not fit.fits:
            need = fit.needed_gib or 0
            bigger = [g.name for g in catalog.GPUS if g.memory_gib * m.model.gpu_memory_utilization >= need]
            known = m.model.known
            moe = (f" (a mixture of experts: {known.active_b:g}B parameters are active per token, but all "
                   f"{m.model.size_b:g}B stay in GPU memory)") if known and known.active_b else ""
            yield error(
                loaded, "gpu-memory", path,
                f"{m.model.id} needs ~{fit.needed_gib:.0f} GiB (weights + KV cache){moe} but `{fit.gpu}` offers "
                f"{fit.usable_gib:.0f} GiB at gpu_memory_utilization {m.model.gpu_memory_utilization}",
                f"use {bigger[0]}" if bigger
                else "quantize the model or add GPUs (`\"H100:2\"` with tensor_parallel_size = 2)",
            )
        if m.model.quantization == "fp8" and not fit.spec.gpu.fp8:
            yield warning(loaded, "fp8-emulated", path,
                          f"`{fit.gpu}` has no native FP8: vLLM falls back to slower weight-only kernels",
                          "prefer L4, L40S, H100, H200 or B200 for fp8")
    sizes = catalog.moe_sizes(m.model.id)
    if m.model.params_b is not None and sizes and m.model.params_b < (sizes[0] + sizes[1]) / 2:
        total = m.model.known.params_b if m.model.known else sizes[0]
        yield error(loaded, "moe-active-params", "model.params_b",
                    f"params_b = {m.model.params_b:g} counts the active parameters of a mixture of experts "
                    f"({m.model.id}); every expert stays in GPU memory, so memory is sized by all {total:g}B",
                    f"set `params_b = {total:g}` (or drop it: liftdeploy knows this model)"
                    if m.model.known else f"set `params_b` to the total parameter count (~{total:g})")
    if m.model.size_b is None:
        yield warning(loaded, "model-size-unknown", "model.params_b",
                      f"the size of {m.model.id} is unknown, so GPU memory cannot be checked",
                      "set `model.params_b` (parameters in billions)")


@rule
def cold_start(loaded: Loaded) -> Iterator[Diagnostic]:
    m = loaded.manifest
    estimate = sizing.cold_start(m)
    if estimate and m.scaling.startup_timeout < estimate.first_s:
        yield warning(loaded, "startup-timeout", "scaling.startup_timeout",
                      f"startup_timeout is {m.scaling.startup_timeout} s but the first cold start is estimated "
                      f"at {estimate.first_s:.0f} s", f"raise it to {int(estimate.first_s * 1.5)} or more")


@rule
def hygiene(loaded: Loaded) -> Iterator[Diagnostic]:
    m = loaded.manifest
    if not m.model.revision:
        yield warning(loaded, "unpinned-revision", "model.id",
                      f"{m.model.id} has no `revision`: a push to the model repo changes what you serve",
                      "pin `model.revision` to a commit hash")
    for i, ep in enumerate(m.endpoints):
        if ep.auth is Auth.none and ep.on_gpu:
            yield warning(loaded, "public-endpoint", f"endpoints[{i}].auth",
                          f"`{ep.label}` serves the model to anyone with the URL",
                          'use `auth = "proxy"` (Modal-Key/Modal-Secret) or `auth = "bearer"`')


@rule
def modal_client(loaded: Loaded) -> Iterator[Diagnostic]:
    """The installed modal client against the range liftdeploy declares: what the rendered module needs."""
    problem = modal_client_problem()
    if problem:
        yield error(loaded, "modal-client", "", *problem)
