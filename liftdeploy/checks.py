"""`liftdeploy check`: the PR check, before anything is built or reaches a GPU.

Each rule takes a loaded manifest (base or one env) and yields `Finding`s. Errors fail
the check (exit 1); warnings are printed and fail it only with `--strict`. A manifest
that does not validate is invalid input (exit 2).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from . import catalog, compat, sizing
from ._toml_lines import locate
from .errors import ManifestError, UsageError
from .manifest import Auth, Loaded, load_targets, read
from .render import drift, output_path

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    severity: Severity
    code: str  # short kebab-case rule id
    message: str
    hint: str | None
    file: str
    path: str = ""  # key path in the manifest
    line: int | None = None
    env: str | None = None

    def text(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "") + (f" [env {self.env}]" if self.env else "")
        key = f" `{self.path}`:" if self.path else ""
        out = f"{self.severity}[{self.code}]: {where}:{key} {self.message}"
        return out + (f"\nhint: {self.hint}" if self.hint else "")

    def github(self) -> str:
        """A GitHub Actions workflow command: an annotation on the manifest line."""
        level = "error" if self.severity == "error" else "warning"
        props = f"file={_gh(self.file, True)}" + (f",line={self.line}" if self.line else "")
        props += f",title={_gh('liftdeploy ' + self.code, True)}"
        body = (f"[env {self.env}] " if self.env else "") + self.message + (f" (hint: {self.hint})" if self.hint else "")
        return f"::{level} {props}::{_gh(body)}"


def _gh(value: str, prop: bool = False) -> str:
    value = value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return value.replace(":", "%3A").replace(",", "%2C") if prop else value


Rule = Callable[[Loaded, str], Iterator[Finding]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def _finding(loaded: Loaded, text: str, severity: Severity, code: str, path: str, message: str,
             hint: str | None = None) -> Finding:
    loc = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]", path) if p]
    line = locate(text, loc, loaded.env) or locate(text, loc, None)
    return Finding(severity, code, message, hint, str(loaded.path), path, line, loaded.env)


@rule
def pins(loaded: Loaded, text: str) -> Iterator[Finding]:
    """Pins against the knowledge base of vLLM releases and curated runtime conflicts."""
    m = loaded.manifest
    pinned = {name.split("[")[0].lower().replace("_", "-"): v for name, v in m.image.pins.items()}
    for req in m.image.packages:
        name, _, version = req.partition("==")
        pinned.setdefault(name.split("[")[0].lower().replace("_", "-"), version)
    for f in compat.pin_findings(pinned, m.image.python):
        path = f"image.pins.{f.package}" if f.package in m.image.pins else "image.pins"
        if f.code.startswith("python"):
            path = "image.python"
        yield _finding(loaded, text, f.severity, f.code, path, f.message, f.hint)


@rule
def api_family(loaded: Loaded, text: str) -> Iterator[Finding]:
    m = loaded.manifest
    family = compat.api_family(m.image.vllm)
    if family == "guided_options_request":
        yield _finding(loaded, text, "error", "vllm-api-unsupported", "image.pins.vllm",
                       f"vllm {m.image.vllm} takes structured outputs only through `LLM.generate(guided_options_request=...)`,"
                       " which the async engine cannot use", "pin vllm>=0.6.5 (XGrammar) or newer")
    if m.decoding.backend == "xgrammar" and not compat.supports_xgrammar(m.image.vllm):
        yield _finding(loaded, text, "error", "xgrammar-unavailable", "decoding.backend",
                       f"vllm {m.image.vllm} has no xgrammar backend (added in 0.6.5)",
                       "pin vllm>=0.6.5, or choose `backend = \"outlines\"`")


@rule
def gpu_memory(loaded: Loaded, text: str) -> Iterator[Finding]:
    m = loaded.manifest
    for i, fit in enumerate(sizing.fits(m)):
        path = f"compute.gpu[{min(i, len(m.compute.gpu) - 1)}]"
        if not fit.fits:
            bigger = [g.name for g in catalog.GPUS if g.memory_gib * m.model.gpu_memory_utilization >= (fit.needed_gib or 0)]
            yield _finding(
                loaded, text, "error", "gpu-memory", path,
                f"{m.model.id} needs ~{fit.needed_gib:.0f} GiB (weights + KV cache) but `{fit.gpu}` offers "
                f"{fit.usable_gib:.0f} GiB at gpu_memory_utilization {m.model.gpu_memory_utilization}",
                f"use {bigger[0]}" if bigger else "quantize the model or add GPUs (`\"H100:2\"` with tensor_parallel_size = 2)",
            )
        if m.model.quantization == "fp8" and not fit.spec.gpu.fp8:
            yield _finding(loaded, text, "warning", "fp8-emulated", path,
                           f"`{fit.gpu}` has no native FP8: vLLM falls back to slower weight-only kernels",
                           "prefer L4, L40S, H100, H200 or B200 for fp8")
    if m.model.size_b is None:
        yield _finding(loaded, text, "warning", "model-size-unknown", "model.params_b",
                       f"the size of {m.model.id} is unknown, so GPU memory cannot be checked",
                       "set `model.params_b` (parameters in billions)")


@rule
def cold_start(loaded: Loaded, text: str) -> Iterator[Finding]:
    m = loaded.manifest
    estimate = sizing.cold_start(m)
    if estimate and m.scaling.startup_timeout < estimate.first_s:
        yield _finding(loaded, text, "warning", "startup-timeout", "scaling.startup_timeout",
                       f"startup_timeout is {m.scaling.startup_timeout} s but the first cold start is estimated "
                       f"at {estimate.first_s:.0f} s", f"raise it to {int(estimate.first_s * 1.5)} or more")


@rule
def hygiene(loaded: Loaded, text: str) -> Iterator[Finding]:
    m = loaded.manifest
    if not m.model.revision:
        yield _finding(loaded, text, "warning", "unpinned-revision", "model.id",
                       f"{m.model.id} has no `revision`: a push to the model repo changes what you serve",
                       "pin `model.revision` to a commit hash")
    for i, ep in enumerate(m.endpoints):
        if ep.auth is Auth.none and ep.on_gpu:
            yield _finding(loaded, text, "warning", "public-endpoint", f"endpoints[{i}].auth",
                           f"`{ep.label}` serves the model to anyone with the URL",
                           'use `auth = "proxy"` (Modal-Key/Modal-Secret) or `auth = "bearer"`')


_TOKEN = re.compile(
    r"\b(hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|(?:ak|as|wk|ws)-[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|AKIA[0-9A-Z]{16}|xox[abp]-[A-Za-z0-9-]{10,})"
)
_SECRET_KEY = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY)", re.IGNORECASE)


def secret_values(path: Path, text: str) -> Iterator[Finding]:
    """Anything that looks like a credential written into the manifest (checked on the raw text)."""
    for number, line in enumerate(text.splitlines(), start=1):
        match = _TOKEN.search(line)
        key = re.match(r"\s*([A-Za-z0-9_.\"-]+)\s*=\s*\"([^\"]{8,})\"", line)
        if match or (key and _SECRET_KEY.search(key.group(1))):
            shown = (match.group(0) if match else key.group(2))[:6] + "…"
            yield Finding("error", "secret-value", f"a secret value (`{shown}`) is written into the manifest",
                          "store it in a Modal Secret (`modal secret create NAME KEY=...`) and list the name "
                          "in `secrets.names`", str(path), "", number)


def overlay_collisions(base: Loaded, envs: list[Loaded], text: str) -> Iterator[Finding]:
    for env in envs:
        if (env.manifest.app.name, env.manifest.app.environment) == (base.manifest.app.name, base.manifest.app.environment):
            yield _finding(env, text, "warning", "env-collision", "app.name",
                           f"env `{env.env}` deploys to the same app and Modal environment as the base",
                           f"set `app.environment` or `app.name` under `[env.{env.env}]`")


def drift_findings(loaded: Loaded) -> Iterator[Finding]:
    path = output_path(loaded)
    if path.exists() and drift(loaded, path):
        yield Finding("error", "render-drift", f"{path} differs from a fresh render of this manifest",
                      f"liftdeploy render {loaded.path}" + (f" --env {loaded.env}" if loaded.env else ""),
                      str(loaded.path), "", None, loaded.env)


@functools.lru_cache(maxsize=64)
def _resolved(requirements: tuple[str, ...], python: str):
    from .resolve import resolve

    return resolve(list(requirements), python_version=python)


def resolve_findings(loaded: Loaded, text: str) -> Iterator[Finding]:
    m = loaded.manifest
    result = _resolved(tuple(m.image.requirements()), m.image.python)
    if not result.ok:
        first = result.output.strip().splitlines()
        yield _finding(loaded, text, "error", "resolve", "image.pins",
                       f"the pins do not resolve for linux x86_64, Python {m.image.python}: "
                       + " ".join(line.strip() for line in first[:6]),
                       "change the pins named above; `uv pip compile` shows the whole chain")


def manifests(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to their `*.toml` files."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(path.glob("*.toml")))
        elif path.exists():
            found.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}", "pass manifest files or folders (default: deployments/)")
    if not found:
        raise UsageError(f"no manifests (*.toml) in {', '.join(map(str, paths))}")
    return found


@dataclass
class Report:
    findings: list[Finding]
    invalid: list[Finding]
    checked: list[str]

    def exit_code(self, strict: bool = False) -> int:
        if self.invalid:
            return 2
        if any(f.severity == "error" or strict for f in self.findings):
            return 1
        return 0

    def format(self, fmt: str) -> str:
        everything = self.invalid + self.findings
        if fmt == "json":
            return json.dumps({"checked": self.checked, "findings": [asdict(f) for f in everything]}, indent=2)
        if fmt == "github":
            return "\n".join(f.github() for f in everything)
        lines = [f.text() for f in everything]
        errors = sum(f.severity == "error" for f in everything)
        warnings = len(everything) - errors
        summary = f"checked {len(self.checked)} manifest(s) and env(s): {errors} error(s), {warnings} warning(s)"
        return "\n".join([*lines, summary])


def check(paths: list[Path], *, resolve: bool = False, drift_check: bool = True) -> Report:
    report = Report([], [], [])
    for path in manifests(paths):
        try:
            source = read(path)
        except ManifestError as exc:
            report.invalid.extend(_invalid(exc))
            continue
        report.findings.extend(secret_values(path, source.text))
        try:
            targets = load_targets(source)
        except ManifestError as exc:
            report.invalid.extend(_invalid(exc))
            continue
        text = source.text
        seen: set[tuple[str, str, str]] = set()  # an env repeats none of the base's findings
        for loaded in targets.all:
            report.checked.append(loaded.label)
            found = [f for each in RULES for f in each(loaded, text)]
            if drift_check:
                found.extend(drift_findings(loaded))
            if resolve:
                found.extend(resolve_findings(loaded, text))
            for f in found:
                key = (f.code, f.path, f.message)
                if loaded.env is None or key not in seen:
                    report.findings.append(f)
                seen.add(key)
        report.findings.extend(overlay_collisions(targets.base, list(targets.envs), text))
    return report


def _invalid(exc: ManifestError) -> list[Finding]:
    return [Finding("error", "invalid", p.message, p.hint, p.file, p.path, p.line) for p in exc.problems]
