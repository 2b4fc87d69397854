"""Reading a manifest file once, merging its env overlays and validating each target once.

`load(path, env=None)` returns one validated target; `load_targets(path)` returns the base
and every `[env.<name>]` overlay. A file is read and parsed once; each target is validated
once. Every mistake becomes a `Diagnostic` with the file, the line, the key path and a hint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .._toml_lines import locate
from ..errors import Diagnostic, ManifestError
from ._base import did_you_mean
from .root import Manifest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Source:
    """A manifest file as read: its bytes' hash, its text and the parsed TOML."""

    path: Path
    text: str
    data: dict[str, Any]
    sha256: str  # of the file's bytes: the render header and apply state name it

    @property
    def overlays(self) -> dict[str, Any]:
        overlays = self.data.get("env", {})
        return overlays if isinstance(overlays, dict) else {}


class Loaded(BaseModel):
    """A validated target (the base, or one env overlay merged over it) with where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    manifest: Manifest
    path: Path
    env: str | None
    sha256: str
    text: str = ""  # the manifest file's text, where diagnostics find their lines

    @property
    def label(self) -> str:
        return f"{self.path}" + (f" (env {self.env})" if self.env else "")

    @property
    def module_name(self) -> str:
        """The stem of the rendered module and of the state file: `qwen3_8b_prod`."""
        stem = self.path.stem.replace("-", "_").replace(".", "_")
        return f"{stem}_{self.env.replace('-', '_')}" if self.env else stem


@dataclass(frozen=True)
class Targets:
    """A manifest file's base and each of its env overlays, every one validated once."""

    source: Source
    base: Loaded
    envs: tuple[Loaded, ...]

    @property
    def all(self) -> tuple[Loaded, ...]:
        return (self.base, *self.envs)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (lists included) is replaced by the overlay."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read(path: Path | str) -> Source:
    """Read and parse a manifest file; a missing file or bad TOML is a ManifestError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError.single(path, "no such file",
                                   "check the path; example manifests live in deployments/") from None
    except IsADirectoryError:
        raise ManifestError.single(path, "is a directory, not a manifest", "pass a .toml file") from None
    except OSError as exc:
        raise ManifestError.single(path, f"cannot read: {exc.strerror}", "check the file's permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError.single(path, "is not UTF-8 text", "save the manifest as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        line = int(match.group(1)) if match else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        raise ManifestError.single(path, f"invalid TOML: {message[:1].lower() + message[1:]}",
                                   "see https://toml.io for the syntax", line=line) from None
    except RecursionError:
        raise ManifestError.single(path, "invalid TOML: arrays or tables nested too deeply",
                                   "a manifest nests a few levels at most; is this the right file?") from None
    return Source(path, text, data, hashlib.sha256(raw).hexdigest())


def load(path: Path | str, env: str | None = None) -> Loaded:
    """One target: the base (after checking that every overlay validates too) or one env."""
    source = read(path)
    return _target(source, env) if env is not None else load_targets(source).base


def load_targets(manifest: Path | str | Source) -> Targets:
    """The base and every env overlay; raises ManifestError listing every problem.

    The base is validated first: when it is invalid, its problems are reported alone (an
    overlay over a broken base repeats them). Otherwise each overlay is validated once."""
    source = manifest if isinstance(manifest, Source) else read(manifest)
    base = _target(source, None)
    envs, problems = [], []
    for name in source.overlays:
        try:
            envs.append(_target(source, name))
        except ManifestError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ManifestError(problems)
    return Targets(source, base, tuple(envs))


def _target(source: Source, env: str | None) -> Loaded:
    """Merge `env`'s overlay over the base (when given) and validate the result."""
    path, text, data = source.path, source.text, source.data
    merged = data
    if env is not None:
        overlays = data.get("env", {})
        if not isinstance(overlays, dict) or env not in overlays:
            names = sorted(overlays) if isinstance(overlays, dict) else []
            hint = (did_you_mean(env, names) or f"this manifest defines: {', '.join(names)}") if names \
                else "this manifest has no `[env.<name>]` tables"
            raise ManifestError.single(path, f"no env `{env}`", hint, path="env")
        if not isinstance(overlays[env], dict):
            raise ManifestError.single(path, f"`env.{env}` must be a table",
                                       f"write `[env.{env}]` and the keys it changes",
                                       path=f"env.{env}", line=locate(text, ["env", env]))
        merged = deep_merge({k: v for k, v in data.items() if k != "env"}, overlays[env])
        merged["env"] = overlays
    try:
        # Strict, as JSON: TOML's types map onto JSON's, and `max_inputs = true` or
        # `trust_remote_code = "yes"` are mistakes to report, not values to coerce.
        manifest = Manifest.model_validate_json(json.dumps(merged, default=str), strict=True)
    except ValidationError as exc:
        raise ManifestError(problems(exc, path, text, env)) from None
    return Loaded(manifest=manifest, path=path, env=env, sha256=source.sha256, text=text)


# ## pydantic's errors, in the manifest's words


def problems(exc: ValidationError, path: Path, text: str, env: str | None) -> list[Diagnostic]:
    """One diagnostic per validation error: file, line, key path, message and hint."""
    out = []
    for error in exc.errors():
        loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        loc += (error.get("ctx") or {}).get("at", ())
        key = _key_path(loc)
        hint = (error.get("ctx") or {}).get("hint")
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"unknown key `{loc[-1]}`"
            allowed = _fields_at(loc[:-1])
            hint = did_you_mean(str(loc[-1]), allowed) or f"allowed here: {', '.join(allowed)}"
        elif error["type"] == "missing":
            message = "is required"
            hint = hint or _missing_hint(loc)
        elif error["type"] in ("enum", "literal_error") and isinstance(error.get("input"), str):
            message = _plain(message, error)
            choices = re.findall(r"'([^']*)'", (error.get("ctx") or {}).get("expected", ""))
            hint = did_you_mean(error["input"], choices) or hint
        elif error["type"] != "liftdeploy":
            message = _plain(message, error)
        line = locate(text, loc, env)
        if env is not None and line is None:
            line = locate(text, loc, None)
        out.append(Diagnostic(message, hint or _fallback_hint(error, loc), str(path), line, key, env))
    return out


def _key_path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(loc: list[Any]) -> list[str]:
    model: Any = Manifest
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args] + [a for arg in args for a in getattr(arg, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _missing_hint(loc: list[Any]) -> str | None:
    return {
        ("app",): "add an `[app]` table with `name = \"my-app\"`",
        ("model",): "add a `[model]` table with `id = \"org/name\"`",
        ("compute",): "add `[compute]` with `gpu = [\"A100-80GB\"]`",
        ("image",): "add `[image]` with `pins = { vllm = \"0.9.2\" }`",
    }.get(tuple(loc))


_BOUNDS = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}


def _fallback_hint(error: Any, loc: list[Any]) -> str:
    """A hint for pydantic's own errors, which come without one."""
    ctx = error.get("ctx") or {}
    bounds = [f"{word} {ctx[name]}" for name, word in _BOUNDS.items() if name in ctx]
    if bounds:
        return f"use a value {' and '.join(bounds)}"
    if error["type"] == "missing" and len(loc) > 1:
        return f"add `{loc[-1]}` to `{_key_path(loc[:-1])}`"
    return f"`liftdeploy schema` shows what `{_key_path(loc) or 'a manifest'}` takes"


def _plain(message: str, error: Any) -> str:
    """pydantic's wording, lowercased and without its `Value error,` prefix."""
    message = re.sub(r"^(Value|Assertion) error, ", "", message)
    message = message.replace("an object", "a table")  # TOML's word for it
    typed = error["type"].endswith(("_type", "_parsing", "literal_error", "enum"))
    shown = typed and not isinstance(error.get("input"), (dict, list))
    return message[:1].lower() + message[1:] + (f", got {error['input']!r}" if shown else "")
