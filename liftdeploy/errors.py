"""The errors and diagnostics liftdeploy shows to users.

Every user-facing error prints as one `error:` line saying what and where, then a
`hint:` line; never a traceback. One type, `Diagnostic`, describes anything said about
a manifest (a key that does not validate, or a finding of `check`), with one renderer
per format: text (uv's style), JSON and GitHub workflow annotations.

    LiftdeployError                 anything the CLI prints and exits on
    ├── ManifestError               a manifest that cannot be read or is invalid (exit 2)
    │                               carries one Diagnostic per mistake
    ├── UsageError                  a command used wrongly (exit 2)
    └── StepError                   a step of apply/deploy/warm-up/smoke that failed (exit 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Diagnostic:
    """One thing wrong with a manifest: what, where (file, line, key path, env), how to fix it.

    Text, as uv writes it, with the rule's code when a `check` rule found it:

        error[gpu-memory]: deployments/m.toml [env dev]:8: `compute.gpu[0]`: ... does not fit
        hint: use A100-80GB
    """

    message: str
    hint: str | None = None
    file: str = ""  # the manifest, as the user named it; "" for none
    line: int | None = None
    path: str = ""  # dotted key path, e.g. `compute.gpu[1]`; "" for the whole file
    env: str | None = None  # the env overlay it is about; None: the base or the whole file
    severity: Severity = "error"
    code: str | None = None  # the `check` rule's id (kebab-case); None for one that does not validate

    def __post_init__(self) -> None:
        # Messages quote manifest values and keys, and a file name is whatever the user named
        # the file: escape what a terminal would act on (newlines, ANSI escapes, NUL, ...), so
        # a diagnostic always prints as one `error:` line and one `hint:` line.
        for name in ("message", "hint", "file", "path", "env"):
            value = getattr(self, name)
            if value is not None and not value.isprintable():
                object.__setattr__(self, name, printable(value))

    @property
    def where(self) -> str:
        """`file [env dev]:12`: the file, the env it is about, the line."""
        out = self.file + (f" [env {self.env}]" if self.env else "")
        return out + (f":{self.line}" if self.line else "")

    def render(self) -> str:
        """The text form: `error[code]: file:line: `key`: message`, then `hint: ...`."""
        head = self.severity + (f"[{self.code}]" if self.code else "")
        where = f" {self.where}:" if self.where else ""
        key = f" `{self.path}`:" if self.path else ""
        return f"{head}:{where}{key} {self.message}" + (f"\nhint: {self.hint}" if self.hint else "")

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "code": self.code, "message": self.message, "hint": self.hint,
                "file": self.file, "path": self.path, "line": self.line, "env": self.env}

    def github(self) -> str:
        """A GitHub Actions workflow command: an annotation on the manifest's line."""
        props = f"file={_gh(self.file, True)}" + (f",line={self.line}" if self.line else "")
        props += f",title={_gh('liftdeploy ' + (self.code or self.severity), True)}"
        body = (f"[env {self.env}] " if self.env else "") + (f"`{self.path}`: " if self.path else "")
        body += self.message + (f" (hint: {self.hint})" if self.hint else "")
        return f"::{self.severity} {props}::{_gh(body)}"

    @property
    def key(self) -> tuple[str | None, str, str]:
        """What makes two diagnostics on different targets the same (printing shows it once)."""
        return (self.code, self.path, self.message)


def _gh(value: str, prop: bool = False) -> str:
    value = value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return value.replace(":", "%3A").replace(",", "%2C") if prop else value


def printable(text: str) -> str:
    """`text` with each non-printable character written as its Python escape (`\\n`, `\\x1b`)."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class LiftdeployError(Exception):
    """Base of every error the CLI reports without a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        return f"error: {self.message}" + (f"\nhint: {self.hint}" if self.hint else "")


class UsageError(LiftdeployError):
    exit_code = 2


class ManifestError(LiftdeployError):
    """A manifest that cannot be loaded; `problems` lists every mistake found."""

    exit_code = 2

    def __init__(self, problems: list[Diagnostic]):
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems

    @classmethod
    def single(cls, file: Path | str, message: str, hint: str, *, path: str = "",
               line: int | None = None) -> ManifestError:
        return cls([Diagnostic(message, hint, str(file), line, path)])

    def render(self) -> str:
        return "\n".join(p.render() for p in self.problems)


class StepError(LiftdeployError):
    """A step of a pipeline (render, deploy, warm-up, smoke) that failed."""

    def __init__(self, step: str, message: str, hint: str | None = None):
        super().__init__(f"{step} failed: {message}", hint)
        self.step = step
