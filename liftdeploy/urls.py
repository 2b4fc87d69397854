"""Where Modal serves a web endpoint, by Modal's documented rules
(https://modal.com/docs/guide/webhook-urls):

    https://<source>--<label>.modal.run      source = <workspace>[-<web suffix>]

The web suffix belongs to the Modal environment: one environment per workspace may have
none (usually `main`), every other one has its own (`modal environment list` shows them;
`modal environment update NAME --set-web-suffix ...` changes one). A label is claimed for
the whole environment, not per app. The host is one DNS label: at most 63 characters.
Modal shortens only labels it generates; liftdeploy always sets the label, so a longer
host is an error, not a URL to guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol

MAX_HOST_CHARS = 63  # one DNS label (RFC 1035)
DEFAULT_ENVIRONMENT = "main"  # every workspace starts with it, usually without a web suffix
WEB_SUFFIX = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def slug(text: str) -> str:
    """Modal's normalisation of a name into a URL part: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def assumed_web_suffix(environment: str) -> str:
    """The web suffix to assume when nobody said and Modal was not asked: none for `main`,
    the environment's name for any other (what `modal environment create` gives it)."""
    return "" if environment == DEFAULT_ENVIRONMENT else slug(environment)


def source(workspace: str, web_suffix: str) -> str:
    """`<workspace>[-<web suffix>]`: which workspace and environment a host belongs to."""
    return slug(workspace) + (f"-{web_suffix}" if web_suffix else "")


def host(workspace: str, web_suffix: str, label: str) -> str:
    return f"{source(workspace, web_suffix)}--{label}"


def url(workspace: str, web_suffix: str, label: str) -> str:
    return f"https://{host(workspace, web_suffix, label)}.modal.run"


class Labelled(Protocol):
    @property
    def label(self) -> str: ...


def modal_urls(workspace: str, web_suffix: str, endpoints: Iterable[Labelled]) -> dict[str, str]:
    """Each endpoint's URL: the one rule `plan`, `apply` and `Client.for_manifest` predict with."""
    return {ep.label: url(workspace, web_suffix, ep.label) for ep in endpoints}


def room_for_label(workspace: str, web_suffix: str) -> int:
    """How long a label may be in this workspace and environment."""
    return MAX_HOST_CHARS - len(source(workspace, web_suffix)) - 2
