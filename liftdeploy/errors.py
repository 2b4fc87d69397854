"""The errors liftdeploy shows to users.

Every user-facing error prints as one `error:` line saying what and where, then a
`hint:` line; never a traceback.

    LiftdeployError                 anything the CLI prints and exits on
    ├── ManifestError               a manifest that cannot be read or is invalid (exit 2)
    │                               carries one Problem per mistake
    ├── UsageError                  a command used wrongly (exit 2)
    └── StepError                   a step of apply/deploy/warm-up/smoke that failed (exit 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One mistake in a manifest: where (file, line, key path), what, and how to fix it."""

    file: str
    path: str  # dotted key path, e.g. `compute.gpu[1]`; "" for the whole file
    message: str
    hint: str | None = None
    line: int | None = None

    def render(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        key = f" `{self.path}`:" if self.path else ""
        text = f"error: {where}:{key} {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text

    def __post_init__(self) -> None:
        # Messages quote manifest values and keys, and a file name is whatever the user named
        # the file: escape what a terminal would act on (newlines, ANSI escapes, NUL, ...), so
        # a problem always prints as one `error:` line and one `hint:` line.
        for name in ("file", "path", "message", "hint"):
            value = getattr(self, name)
            if value is not None and not value.isprintable():
                object.__setattr__(self, name, printable(value))


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
        text = f"error: {self.message}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class UsageError(LiftdeployError):
    exit_code = 2


class ManifestError(LiftdeployError):
    """A manifest that cannot be loaded; `problems` lists every mistake found."""

    exit_code = 2

    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems

    @classmethod
    def single(cls, file: Path | str, message: str, hint: str | None = None, *, path: str = "",
               line: int | None = None) -> ManifestError:
        return cls([Problem(str(file), path, message, hint, line)])

    def render(self) -> str:
        return "\n".join(p.render() for p in self.problems)


class StepError(LiftdeployError):
    """A step of a pipeline (render, deploy, warm-up, smoke) that failed."""

    def __init__(self, step: str, message: str, hint: str | None = None):
        super().__init__(f"{step} failed: {message}", hint)
        self.step = step
