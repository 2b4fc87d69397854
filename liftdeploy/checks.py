"""`liftdeploy check`: the PR check, before anything is built or reaches a GPU.

`diagnose(loaded)` is everything found on one target (the base or one env): the raw
text's secrets, every rule of `rules.py`, drift of the committed render and, on request,
a resolve of the pins. `check` diagnoses every target of every manifest; `apply`
diagnoses exactly the target it deploys. A finding that an env shares with the base is
kept on both, and shown once when printed. Errors fail the check (exit 1); warnings fail
it only with `--strict`. A manifest that does not validate is invalid input (exit 2).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import modal_rules
from ._tokens import find_token
from .errors import Diagnostic, ManifestError, UsageError
from .manifest import Loaded, load_targets, read
from .render import drift, output_path
from .rules import RULES, diagnostic, error, warning

_SECRET_KEY = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY)", re.IGNORECASE)


def secret_values(path: Path, text: str) -> Iterator[Diagnostic]:
    """Anything that looks like a credential written into the manifest (checked on the raw text,
    so it concerns every target of the file)."""
    for number, line in enumerate(text.splitlines(), start=1):
        token = find_token(line)
        key = re.match(r"\s*([A-Za-z0-9_.\"-]+)\s*=\s*\"([^\"]{8,})\"", line)
        if token or (key and _SECRET_KEY.search(key.group(1))):
            shown = (token or (key.group(2) if key else ""))[:6] + "…"
            yield Diagnostic(f"a secret value (`{shown}`) is written into the manifest",
                             "store it in a Modal Secret (`modal secret create NAME KEY=...`) and list the name "
                             "in `secrets.names`", str(path), number, code="secret-value")


def drift_findings(loaded: Loaded) -> Iterator[Diagnostic]:
    path = output_path(loaded)
    if path.exists() and drift(loaded, path):
        yield Diagnostic(f"{path} differs from a fresh render of this manifest",
                         f"liftdeploy render {loaded.path}" + (f" --env {loaded.env}" if loaded.env else ""),
                         str(loaded.path), env=loaded.env, code="render-drift")


@functools.lru_cache(maxsize=64)
def _resolved(requirements: tuple[str, ...], python: str) -> Any:
    from .resolve import resolve

    return resolve(list(requirements), python_version=python)


def resolve_findings(loaded: Loaded) -> Iterator[Diagnostic]:
    m = loaded.manifest
    result = _resolved(tuple(m.image.requirements()), m.image.python)
    if not result.checked:
        yield error(loaded, "resolve-unchecked", "image.pins",
                    f"the pins were not resolved: {result.output.strip().splitlines()[0]}",
                    "re-run `liftdeploy check --resolve` once the package index answers; "
                    "uv's own settings (UV_INDEX_URL, ...) choose the index")
    elif not result.ok:
        first = result.output.strip().splitlines()
        yield error(loaded, "resolve", "image.pins",
                    f"the pins do not resolve for linux x86_64, Python {m.image.python}: "
                    + " ".join(line.strip() for line in first[:6]),
                    "change the pins named above; `uv pip compile` shows the whole chain")


def diagnose(loaded: Loaded, *, drift_check: bool = True, resolve: bool = False) -> list[Diagnostic]:
    """Everything found on one target: what `apply` of exactly this target must pass."""
    found = list(secret_values(loaded.path, loaded.text))
    found += [d for each in RULES for d in each(loaded)]
    found += [_diagnostic(loaded, issue) for issue in modal_rules.issues(loaded)]
    if drift_check:
        found += drift_findings(loaded)
    if resolve:
        found += resolve_findings(loaded)
    return found


def _diagnostic(loaded: Loaded, issue: modal_rules.Issue) -> Diagnostic:
    return diagnostic(loaded, issue.severity, issue.code, issue.path, issue.message, issue.hint)


def overlay_collisions(base: Loaded, envs: tuple[Loaded, ...]) -> Iterator[tuple[Loaded, Diagnostic]]:
    """Envs that deploy where the base does (a relation between targets, not a rule of one)."""
    for env in envs:
        where = (env.manifest.app.name, env.manifest.app.environment)
        if where == (base.manifest.app.name, base.manifest.app.environment):
            yield env, warning(env, "env-collision", "app.name",
                               f"env `{env.env}` deploys to the same app and Modal environment as the base",
                               f"set `app.environment` or `app.name` under `[env.{env.env}]`")


def manifests(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to their `*.toml` files."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(path.glob("*.toml")))
        elif path.exists():
            found.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}",
                             "pass manifest files or folders (default: deployments/)")
    if not found:
        raise UsageError(f"no manifests (*.toml) in {', '.join(map(str, paths))}",
                         "pass manifest files or folders (default: deployments/)")
    return found


@dataclass(frozen=True)
class Checked:
    """One target and everything found on it."""

    label: str
    file: str
    diagnostics: list[Diagnostic]


@dataclass
class Report:
    targets: list[Checked] = field(default_factory=list)
    invalid: list[Diagnostic] = field(default_factory=list)

    @property
    def checked(self) -> list[str]:
        return [t.label for t in self.targets]

    @property
    def findings(self) -> list[Diagnostic]:
        """Every finding of every target, repeats included."""
        return [d for t in self.targets for d in t.diagnostics]

    def shown(self) -> list[Diagnostic]:
        """What to print: invalid manifests, then each finding once. A finding that an env
        shares with the base (or an earlier env) of the same file is shown with the first."""
        out = list(self.invalid)
        seen: dict[str, set[tuple[str | None, str, str]]] = {}
        for target in self.targets:
            before = seen.setdefault(target.file, set())
            out += [d for d in target.diagnostics if d.key not in before]
            before.update(d.key for d in target.diagnostics)
        return out

    def exit_code(self, strict: bool = False) -> int:
        if self.invalid:
            return 2
        if any(f.severity == "error" or strict for f in self.findings):
            return 1
        return 0

    def format(self, fmt: str) -> str:
        shown = self.shown()
        if fmt == "json":
            return json.dumps({"checked": self.checked, "findings": [d.to_json() for d in shown]}, indent=2)
        if fmt == "github":
            return "\n".join(d.github() for d in shown)
        errors = sum(d.severity == "error" for d in shown)
        summary = (f"checked {len(self.checked)} manifest(s) and env(s): "
                   f"{errors} error(s), {len(shown) - errors} warning(s)")
        return "\n".join([*(d.render() for d in shown), summary])


def check(paths: list[Path], *, resolve: bool = False, drift_check: bool = True) -> Report:
    report = Report()
    every: list[Loaded] = []  # every target of every manifest: a label is claimed per Modal environment
    for path in manifests(paths):
        try:
            source = read(path)
        except ManifestError as exc:
            report.invalid += [replace(p, code="invalid") for p in exc.problems]
            continue
        try:
            targets = load_targets(source)
        except ManifestError as exc:  # invalid; and it may hold a token too
            report.invalid += [replace(p, code="invalid") for p in exc.problems]
            report.invalid += secret_values(path, source.text)
            continue
        found = {t.env: diagnose(t, drift_check=drift_check, resolve=resolve) for t in targets.all}
        for env, collision in overlay_collisions(targets.base, targets.envs):
            found[env.env].append(collision)
        report.targets += [Checked(t.label, str(path), found[t.env]) for t in targets.all]
        every += targets.all
    checked = {(c.file, c.label): c for c in report.targets}
    for loaded, issue in modal_rules.label_collisions(every):
        checked[(str(loaded.path), loaded.label)].diagnostics.append(_diagnostic(loaded, issue))
    return report
