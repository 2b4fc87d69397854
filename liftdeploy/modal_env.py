"""What Modal says about the environment a manifest deploys into: does it exist, what is its
web suffix, which workspace do the credentials belong to.

`plan` and `apply` ask before they promise URLs or deploy; nothing is asked without Modal
credentials (`modal token new`, or MODAL_TOKEN_ID / MODAL_TOKEN_SECRET), so `plan` still
works offline. The calls are the `modal` client's own: `Environment.from_name(...).hydrate()`
(Modal answers NOT_FOUND for an environment that was never created), `list_environments()`
(each environment's web suffix) and `Workspace.from_context()` (the workspace's name).
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

LOOKUP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class ModalEnvironment:
    name: str
    exists: bool | None  # None: Modal could not be asked (see `error`)
    web_suffix: str | None = None
    workspace: str | None = None
    error: str | None = None

    @property
    def create_hint(self) -> str:
        return f"create it with `modal environment create {self.name}`, or set `app.environment`"

    def describe(self) -> str:
        if self.exists is None:
            return f"not checked ({self.error})"
        if not self.exists:
            return f"does not exist in workspace `{self.workspace}`: {self.create_hint}"
        suffix = f"web suffix `{self.web_suffix}`" if self.web_suffix else "no web suffix"
        return f"exists in workspace `{self.workspace}` ({suffix})"


def credentials() -> bool:
    """Whether a Modal token is configured (profile or environment variables)."""
    from modal.config import config

    return bool(config.get("token_id") and config.get("token_secret"))


def lookup(name: str, timeout: float = LOOKUP_TIMEOUT_S) -> ModalEnvironment:
    """Ask Modal about environment `name`; never raises, never waits longer than `timeout`."""
    if not credentials():
        return ModalEnvironment(name, None, error="no Modal credentials: run `modal token new`")
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="modal-env")
    try:
        return pool.submit(_ask, name).result(timeout)
    except concurrent.futures.TimeoutError:
        return ModalEnvironment(name, None, error=f"Modal did not answer within {timeout:.0f} s")
    except Exception as exc:  # modal's, grpclib's and OS errors: the check could not be made
        return ModalEnvironment(name, None, error=f"{type(exc).__name__}: {exc}")
    finally:
        pool.shutdown(wait=False)


def _ask(name: str) -> ModalEnvironment:
    import modal
    import modal.environments
    import modal.exception

    workspace = modal.Workspace.from_context()
    workspace.hydrate()
    try:
        modal.Environment.from_name(name).hydrate()
    except modal.exception.NotFoundError:
        return ModalEnvironment(name, False, workspace=workspace.name)
    suffixes = {item.name: item.webhook_suffix for item in modal.environments.list_environments()}
    return ModalEnvironment(name, True, suffixes.get(name), workspace.name)
