"""Where Modal serves a web endpoint: the URL predicted from the workspace, environment and label.

`plan`, `apply` (when Modal returns no URL) and the client (`Client.for_manifest`) predict
URLs here, from one rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Labelled(Protocol):
    @property
    def label(self) -> str: ...


def modal_url(workspace: str, environment: str, label: str) -> str:
    """Modal's URL scheme: `https://<workspace>[-<env>]--<label>.modal.run`."""
    prefix = workspace if environment == "main" else f"{workspace}-{environment}"
    return f"https://{prefix}--{label}.modal.run"


def modal_urls(workspace: str, environment: str, endpoints: Iterable[Labelled]) -> dict[str, str]:
    return {ep.label: modal_url(workspace, environment, ep.label) for ep in endpoints}
