"""What every manifest section shares: named defaults, name patterns, errors with hints."""

from __future__ import annotations

import difflib
import re
from enum import Enum
from typing import Final

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

# ## Named defaults

DEFAULT_PYTHON: Final = "3.12"
DEFAULT_UV = "0.13.9"  # the uv that `check --resolve` resolves with, installing in the image
DEFAULT_SCALEDOWN_WINDOW = 300  # seconds: the seeds' 5-minute keep-warm period
DEFAULT_TIMEOUT = 600  # seconds: the seeds' measured worst case for one request
DEFAULT_STARTUP_TIMEOUT = 1200  # seconds: a 32B model took 7 minutes to load cold
DEFAULT_MAX_INPUTS = 20
MODAL_SCALEDOWN_RANGE = (2, 3600)  # Modal rejects scaledown_window outside this range
MODAL_MAX_TIMEOUT = 24 * 3600

# Every pattern ends in `\Z`, not `$`: `$` also matches before a trailing newline, and a value
# such as "generate\n" would pass (a label becomes a function name in the rendered module).
LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")  # a DNS label: Modal URLs use it
APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
SECRET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?\Z")
VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!-]*\Z")
ENV_VAR = re.compile(r"^[A-Z_][A-Z0-9_]*\Z")
POSIX_PATH = re.compile(r"^/[A-Za-z0-9._/-]*\Z")
REASONING_PARSER = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
TIME_OF_DAY = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]\Z")  # HH:MM, 24-hour clock
TIME_ZONE = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]{0,29}(/[A-Za-z0-9_+-]{1,30}){0,2}\Z")  # an IANA name's form
CRON_DAYS = re.compile(r"^[0-7*](-[0-7])?(,[0-7](-[0-7])?)*\Z")  # cron's day-of-week field


def invalid(message: str, hint: str | None = None, at: tuple[str | int, ...] = ()) -> PydanticCustomError:
    """A validation error with a hint, raised from inside the models.

    `at` is the key path below the validated value that the mistake is in (e.g. the entry
    of a list, or the field a whole-section check blames), so errors name the exact key.
    """
    return PydanticCustomError("liftdeploy", "{message}", {"message": message, "hint": hint, "at": at})


def did_you_mean(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.upper().startswith(word.upper()[:3])][:1]
    return f"did you mean `{close[0]}`?" if close else None


class Choice(str, Enum):
    """A closed set of names; `str()` of a member is its name as the manifest writes it."""

    def __str__(self) -> str:
        return str(self.value)


class Section(BaseModel):
    """Base of every manifest section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
