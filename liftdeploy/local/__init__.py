"""Local CPU serving support: a real instruct model fetched once from the package index
(:mod:`liftdeploy.local.instruct`), a tiny offline "smoke" model and a CPU engine.

The :class:`~liftdeploy.local.engine.LocalEngine` has the same interface as the vLLM engine
that liftdeploy renders into Modal app modules, so the rendered FastAPI app can be served and
tested on a machine without a GPU, with real XGrammar-constrained decoding.

Imports are lazy: importing this package does not import torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["SMOKE_MARKER", "LocalEngine", "is_smoke_model_dir", "smoke_model_dir"]

if TYPE_CHECKING:  # pragma: no cover
    from liftdeploy.local.engine import LocalEngine
    from liftdeploy.local.smoke import SMOKE_MARKER, is_smoke_model_dir, smoke_model_dir


def __getattr__(name: str) -> Any:
    if name == "LocalEngine":
        from liftdeploy.local.engine import LocalEngine

        return LocalEngine
    if name in ("smoke_model_dir", "is_smoke_model_dir", "SMOKE_MARKER"):
        from liftdeploy.local import smoke

        return getattr(smoke, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
