"""Property tests: no manifest value (or manifest path) can inject code into a rendered module.

Each example starts from a valid manifest, puts an adversarial string into one or several
string fields (values and keys, at any depth), and validates it:

* rejected: it must be a pydantic ValidationError, and every Problem the CLI would print
  from it must be one printable `error:` line plus at most one `hint:` line;
* accepted: the render must parse, have exactly the AST shape and the token shape of the
  unmodified manifest's render (literal values and the lengths of literal lists free), show
  the accepted value only inside string constants, and a field that the module does not use
  must not change the module at all.

The renderer is also fed adversarial manifest paths and env names, which reach the
three-line header comment; the header must stay three comment lines.
"""

from __future__ import annotations

import ast
import copy
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context, event
from pydantic import BaseModel, ValidationError

from liftdeploy import manifest as manifest_mod
from liftdeploy.errors import ManifestError
from liftdeploy.manifest import Loaded, Manifest, load
from liftdeploy.manifest import _base as manifest_base
from liftdeploy.manifest import loading as manifest_loading
from liftdeploy.render import context, ident, py, render

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SHA = "0" * 64

# Hypothesis: reproducible in CI (derandomize, no example database), no deadline (a render
# with a 20 kB string takes a while). Examples per run: 400 + 250 + 300 + 150 + 100 + 60 = 1260,
# plus the deterministic sweep (about 3,500 manifests); 30 to 60 s in all on 2 cores.
settings.register_profile(
    "injection",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    print_blob=True,
)
PROFILE = settings.get_profile("injection")


def examples(n: int) -> settings:
    return settings(PROFILE, max_examples=n)


def _alternatives(annotation: Any) -> list[Any]:
    """`list[str] | None` → [list[str], str]: the types a field's value may take, unwrapped."""
    out = [annotation]
    if get_origin(annotation) in (Union, UnionType, list, dict):
        for arg in get_args(annotation):
            out.extend(_alternatives(arg))
    return out


def _str_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every model field that a manifest writes as a string (or a list or dict of strings)."""
    out: set[tuple[str, ...]] = set()
    for name, field in model.model_fields.items():
        for ann in _alternatives(field.annotation):
            if ann is manifest_mod.GpuSpec or ann is str or get_origin(ann) is Literal or (
                isinstance(ann, type) and issubclass(ann, Enum)
            ):
                out.add(prefix + (name,))
            elif isinstance(ann, type) and issubclass(ann, BaseModel):
                out |= _str_fields(ann, prefix + (name,))
    return out


# ## Base manifests
# Every string field the models have is present in at least one base (checked below).


def _augmented(name: str) -> dict[str, Any]:
    data = tomllib.loads((ROOT / "deployments" / name).read_text(encoding="utf-8"))
    data["app"].setdefault("workspace", "rand")
    data.setdefault("engine", {"kind": "vllm"})  # these bases are vLLM's (the SGLang module: test_render_sglang.py)
    data["compute"]["region"] = "us-east"
    image = data["image"]
    image.setdefault("base", "nvidia/cuda:12.4.1-devel-ubuntu22.04")
    image["pins"].setdefault("transformers", "4.53.0")
    image.setdefault("packages", ["hf-transfer==0.1.9"])
    image["web_pins"] = {"fastapi[standard]": "0.115.12", "pydantic": "2.11.7"}
    image.setdefault("env", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    data["model"].setdefault("quantization", "fp8")
    data.setdefault("decoding", {})["backend"] = "xgrammar"
    data["app"].setdefault("web_suffix", "web")
    data["model"].setdefault("reasoning_parser", "qwen3")
    data["scaling"]["business_hours"] = {"days": "1-5", "start": "08:00", "end": "18:00", "timezone": "Europe/Berlin"}
    data["secrets"] = {"names": ["huggingface", "extra-secret"], "bearer": "api-token",
                       "keys": {"huggingface": ["HF_TOKEN"]}}
    for ep in data["endpoints"]:
        ep.setdefault("label", ep["kind"])
    # Any other string field of a section, written out with its default or documented example,
    # so that a field added later is fuzzed too (test_every_string_field_is_fuzzed checks).
    for section, field in Manifest.model_fields.items():
        models = [a for a in _alternatives(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = models[0] if models else None
        if model is None or not isinstance(data.get(section), dict):
            continue
        for name, sub in model.model_fields.items():
            value = sub.default if isinstance(sub.default, str) else (sub.examples or [None])[0]
            value = value.value if isinstance(value, Enum) else value
            if name not in data[section] and isinstance(value, str) and (section, name) in _str_fields(Manifest):
                data[section][name] = value
    return data


BASES: dict[str, dict[str, Any]] = {
    "qwen3-8b": _augmented("qwen3-8b.toml"),  # vLLM 0.33: structured_outputs
    "qwen32b": _augmented("qwen32b.toml"),  # vLLM 0.9.2: guided_decoding
}
REGION_LIST = copy.deepcopy(BASES["qwen32b"])
REGION_LIST["compute"]["region"] = ["us-east", "us-west"]
BASES["qwen32b-regions"] = REGION_LIST

# ## Addressing string fields: values, list items and dict keys


@dataclass(frozen=True)
class Key:
    """The key itself (renamed), not the value under it."""

    name: str

    def __repr__(self) -> str:
        return f"Key({self.name!r})"


PathT = tuple[Any, ...]


def string_paths(node: Any, prefix: PathT = ()) -> list[PathT]:
    """Every place in a manifest dict that holds a string: values, list items and keys."""
    out: list[PathT] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append(prefix + (Key(key),))
            out.extend(string_paths(value, prefix + (key,)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.extend(string_paths(value, prefix + (i,)))
    elif isinstance(node, str):
        out.append(prefix)
    return out


def original(data: dict[str, Any], path: PathT) -> str:
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    last = path[-1]
    return last.name if isinstance(last, Key) else node[last]


def substitute(data: dict[str, Any], path: PathT, value: str) -> bool:
    """Put `value` at `path` (in place); False when an earlier substitution removed the path."""
    node: Any = data
    try:
        for part in path[:-1]:
            node = node[part]
        last = path[-1]
        if isinstance(last, Key):
            if not isinstance(node, dict) or last.name not in node:
                return False
            items = list(node.items())
            node.clear()
            for k, v in items:
                node[value if k == last.name else k] = v
        else:
            node[last]  # noqa: B018 - must exist
            node[last] = value
        return True
    except (KeyError, IndexError, TypeError):
        return False


# their keys are data
DICT_FIELDS = {("image", "pins"), ("image", "web_pins"), ("image", "env"), ("secrets", "keys"), ("env",)}
UNVALIDATED = {("compute", "region"), ("image", "env")}  # any string value at all is accepted


def field_of(path: PathT) -> tuple[str, ...]:
    """The model field a path fills: `("endpoints", 2, "label")` → `("endpoints", "label")`,
    `("image", "pins", "vllm")` and `("image", "pins", Key("vllm"))` → `("image", "pins")`."""
    out: list[str] = []
    for part in path:
        if isinstance(part, Key) or tuple(out) in DICT_FIELDS:
            break
        if isinstance(part, str):
            out.append(part)
    return tuple(out)


def _never_rendered(path: PathT) -> bool:
    """Fields the module does not use: changing them must not change the module."""
    return field_of(path) in {("env",), ("app", "environment"), ("app", "workspace"), ("app", "web_suffix")}


def _validated(path: PathT) -> bool:
    """A string some validator checks (overlay contents are checked only when `load` selects them)."""
    field = field_of(path)
    if field == ("env",):
        return len(path) == 2  # an overlay's name
    if field in UNVALIDATED:
        return isinstance(path[-1], Key)
    return True


# ## Adversarial strings

NASTY = [
    '"', "'", '"""', "'''", '\\', '\\"', "\\'", '\\\\"', "\\n", "\\x00", "\\N{BULLET}",
    "\n", "\r", "\r\n", "\n\n", "\t", "\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1b[31m", "\x1b]0;x\x07",
    "\x7f", "\x85", "\xa0", "\u2028", "\u2029", "\ufeff", "\u200b", "\u202e", "\u0301",
    "{{", "}}", "{{ m }}", "{{ m.app.name }}", "{{ 7*7 }}", "{%", "%}", "{% if true %}", "{% endif %}",
    "{% raw %}", "{#", "#}", "{# x #}", "{%- for x in [1] -%}",
    "#", "# ", "#!", "# noqa", " # comment",
    '"); import os; os.system("id"); ("', "'); __import__('os').system('id'); ('",
    '"""\nimport os\n"""', "'''\nimport os\n'''", "\nimport os\n", "\n    import os\n", "\\\nimport os",
    ")", "(", "]", "[", "}", "{", ",", ":", ";", "=", "\\u0022", "${HOME}", "$(id)", "`id`",
    "é", "ß", "İ", "ﬁ", "١", "²", "Ⅻ", "𝕏", "\U0001F600", "\U00010000", "\U0010FFFF", "\U000E0001",
    "..", "/..", "../", "./", "/", "//", " ", "  ", "-", "_", ".", "@", "==", "[x]", "+", "!",
]
LONG = [
    "a" * 5000, "A" * 20000, '"' * 3000, "\\" * 3001, "'''" * 1000, "\n" * 2000,
    "{{" * 1000, "\U0001F600" * 2000, "x" * 64, "x" * 65, "a" * 99 + "b",
]

any_char = st.characters(exclude_categories=("Cs",))  # TOML cannot hold surrogates
fragment = st.one_of(
    st.sampled_from(NASTY),
    st.text(any_char, min_size=1, max_size=12),
    st.lists(st.sampled_from(NASTY), min_size=2, max_size=4).map("".join),
)


# The likeliest way past a validator: the valid value with one dangerous piece at one end.
DANGER = ["\n", "\r", "\r\n", "\x00", "\x0c", "\x1b", "\x85", "\u2028", '"', "'", '"""', "\\", "#", "{{", "{#", " ",
          "\t"]


@st.composite
def adversarial(draw: st.DrawFn, base_value: str) -> str:
    """Mostly a near miss of the valid value (a fragment spliced in), else anything at all."""
    how = draw(st.sampled_from(["near", "near", "suffix", "prefix", "insert", "replace", "text", "long"]))
    if how == "near":
        piece = draw(st.sampled_from(DANGER))
        return draw(st.sampled_from([base_value + piece, piece + base_value]))
    frag = draw(fragment)
    if how == "suffix":
        return base_value + frag
    if how == "prefix":
        return frag + base_value
    if how == "insert":
        at = draw(st.integers(0, len(base_value)))
        return base_value[:at] + frag + base_value[at:]
    if how == "replace":
        return frag
    if how == "text":
        return draw(st.text(any_char, max_size=200))
    return draw(st.sampled_from(LONG + [base_value * 300, base_value + "\n" + base_value]))


# ## What a render must look like


def ast_shape(node: Any) -> str:
    """`ast.dump` with every literal value erased and every run of like items collapsed to one.

    Collapsed: the items of a list, tuple or set display, the key/value pairs of a dict display
    and the positional arguments of a call, so `["A100-80GB", "H100"]` and `["L4"]`, or
    `.uv_pip_install("a==1", "b==2")` and `.uv_pip_install("a==1")`, have one shape, while an
    extra statement, call, operator, name or keyword anywhere does not.
    """
    if isinstance(node, ast.Constant):
        return "Constant"
    fields = []
    for name, value in ast.iter_fields(node):
        if isinstance(node, ast.Dict) and name == "keys":
            pairs = [f"{ast_shape(k) if k else '**'}:{ast_shape(v)}"
                     for k, v in zip(node.keys, node.values, strict=True)]
            fields.append(f"pairs=[{','.join(_runs(pairs))}]")
        elif isinstance(node, ast.Dict) and name == "values":
            continue
        elif isinstance(value, list):
            items = [ast_shape(v) if isinstance(v, ast.AST) else repr(v) for v in value]
            if (name == "elts" and isinstance(node, (ast.List, ast.Tuple, ast.Set))) or (
                name == "args" and isinstance(node, ast.Call)
            ):
                items = _runs(items)
            fields.append(f"{name}=[{','.join(items)}]")
        elif isinstance(value, ast.AST):
            fields.append(f"{name}={ast_shape(value)}")
        elif name == "name" and isinstance(node, ast.FunctionDef) and value.startswith("web_"):
            fields.append("name='web_*'")  # an endpoint's function, named after its label
        else:
            fields.append(f"{name}={value!r}")
    return f"{type(node).__name__}({','.join(fields)})"


def _runs(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return out


LITERAL_NAMES = {"True", "False", "None"}


def token_shape(source: str) -> list[tuple[str, ...]]:
    """The token stream with string and comment text erased and literal-only brackets collapsed."""
    out: list[tuple[str, ...]] = []
    opened: list[int] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NL:
            continue
        if tok.type == tokenize.STRING:
            out.append(("STR",))
        elif tok.type == tokenize.COMMENT:
            out.append(("COMMENT",))
        elif tok.type == tokenize.NAME and tok.string.startswith("web_"):
            out.append(("NAME", "web_*"))
        elif tok.type == tokenize.OP and tok.string in "([{":
            opened.append(len(out))
            out.append(("OP", tok.string))
        elif tok.type == tokenize.OP and tok.string in ")]}":
            start = opened.pop()
            inner = out[start + 1:]
            literal = all(
                t in {("STR",), ("LIT",), ("OP", ","), ("OP", ":"), ("OP", "-")}
                or t[0] == tokenize.tok_name[tokenize.NUMBER]
                or (t[0] == "NAME" and t[1] in LITERAL_NAMES)
                for t in inner
            )
            if literal and inner:
                del out[start + 1:]
                out.append(("LIT",))
            out.append(("OP", tok.string))
        else:
            out.append((tokenize.tok_name[tok.type], tok.string))
    return out


def string_constants(tree: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


@dataclass(frozen=True)
class Rendered:
    source: str
    tree: ast.Module
    ast_shape: str
    token_shape: tuple[tuple[str, ...], ...]


def analyse(source: str) -> Rendered:
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:  # pragma: no cover - the failure this file exists to catch
        lines = source.splitlines()
        near = "\n".join(lines[max(0, (exc.lineno or 1) - 3):(exc.lineno or 1) + 2])
        pytest.fail(f"rendered module does not parse: {exc}\n---\n{near}\n---")
    return Rendered(source, tree, ast_shape(tree), tuple(token_shape(source)))


def loaded(m: Manifest, path: Path | str = "deployments/fuzz.toml", env: str | None = None) -> Loaded:
    return Loaded(manifest=m, path=Path(path), env=env, sha256=SHA)


@cache
def reference(base: str, vllm: str) -> Rendered:
    """The render of the unmodified base, pinned to the same vllm release.

    An accepted adversarial vllm pin may select another structured-output API, and so another
    (legitimate) branch of the template: the reference takes the same branch.
    """
    return analyse(render(loaded(Manifest.model_validate(_with_vllm(base, vllm)))))


def check_header(source: str, of: Loaded) -> None:
    """(d) the header is exactly three comment lines, naming the manifest, then the docstring."""
    lines = source.split("\n")
    assert all(line.startswith("# ") for line in lines[:3]), lines[:4]
    assert lines[3].startswith('"""'), lines[:4]
    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    kinds = [tokenize.tok_name[t.type] for t in toks[:7]]
    assert kinds == ["COMMENT", "NL", "COMMENT", "NL", "COMMENT", "NL", "STRING"], kinds
    shown = py(context(of)["source"])  # the manifest's path, as the header names it
    assert shown in lines[0] and shown in lines[2], (shown, lines[:3])
    if of.env:
        assert py(of.env) in lines[0] and py(of.env) in lines[2], lines[:3]
    for line in lines[:3]:
        assert line.isprintable(), repr(line)


def check_rejection(exc: BaseException) -> None:
    """A rejected manifest: a ValidationError, and the CLI would print it sensibly."""
    assert isinstance(exc, ValidationError), f"{type(exc).__name__} instead of ValidationError: {exc!r}"
    errors = exc.errors()
    assert errors
    for error in errors:
        assert isinstance(error["msg"], str) and error["msg"].strip(), error
        assert isinstance(error["loc"], tuple), error
    problems = manifest_loading.problems(exc, Path("deployments/fuzz.toml"), "", None)
    check_problems(problems)


def check_problems(problems: list[Any]) -> None:
    assert problems
    for problem in problems:
        assert problem.message.strip(), problem
        text = problem.render()
        lines = text.split("\n")
        assert lines[0].startswith("error: ") and len(lines) <= 2, text
        assert len(lines) == 1 or lines[1].startswith("hint: "), text
        for line in lines:  # no raw newlines, escapes or other control characters reach a terminal
            assert line.isprintable(), repr(line)


def check_accepted(m: Manifest, base: str, changed: list[tuple[PathT, str]], source: str | None = None) -> None:
    """(a) it parses, (b) it has the reference's shape, (c) values only in string constants."""
    if source is None:
        source = render(loaded(m))
    if all(_never_rendered(p) for p, _ in changed):
        assert source == render(loaded(Manifest.model_validate(_with_vllm(base, m.image.vllm)))), (
            f"{changed!r} changed a module that does not use it"
        )
        return
    got = analyse(source)
    ref = reference(base, m.image.vllm)
    assert got.ast_shape == ref.ast_shape, f"AST shape changed by {changed!r}"
    assert got.token_shape == ref.token_shape, f"token shape changed by {changed!r}"
    check_header(source, loaded(m))

    # The endpoint functions are exactly `web_<label>`, one per endpoint.
    defs = sorted(n.name for n in ast.walk(got.tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("web_"))
    assert defs == sorted(ident(ep.label) for ep in m.endpoints)
    assert all(name.isidentifier() for name in defs)

    constants = string_constants(got.tree)
    for path, value in changed:
        if _never_rendered(path):
            continue
        for shown in rendered_forms(m, path, value):
            assert any(shown in c for c in constants), f"{shown!r} (from {path!r}) is not inside a string constant"


def _with_vllm(base: str, version: str) -> dict[str, Any]:
    data = copy.deepcopy(BASES[base])
    data["image"]["pins"]["vllm"] = version
    return data


def rendered_forms(m: Manifest, path: PathT, value: str) -> list[str]:
    """How an accepted value shows in the module, after validation normalised it."""
    if isinstance(path[-1], Key):
        if field_of(path[:-1]) in {("image", "pins"), ("image", "web_pins"), ("image", "env")}:
            return [value]  # `name==version` or an env key
        return []  # a field name: accepted only when it is the very name it replaced
    names = field_of(path)
    if names == ("compute", "gpu"):
        return [str(g) for g in m.compute.gpu if g.type != "any"]  # normalised to the catalogue's name
    if names[0] == "volumes" and names[-1] == "mount":
        return [value.rstrip("/")]
    return [value]


# ## Every string field is fuzzed


def test_every_string_field_is_fuzzed():
    fuzzed = {field_of(p) for data in BASES.values() for p in string_paths(data) if not isinstance(p[-1], Key)}
    keys = {field_of(p[:-1]) for data in BASES.values() for p in string_paths(data) if isinstance(p[-1], Key)}
    missing = {f for f in _str_fields(Manifest) if f not in fuzzed and f not in keys}
    assert not missing, f"string fields no base manifest holds, so never fuzzed: {sorted(missing)}"
    for dict_field in [("image", "pins"), ("image", "web_pins"), ("image", "env"), ("env",)]:
        assert dict_field in keys
    assert ("compute", "gpu") in fuzzed and ("compute", "region") in fuzzed


def test_references_render_and_differ_by_api():
    for base in BASES:
        for vllm in ("0.9.2", "0.33.0"):
            check_header(reference(base, vllm).source, loaded(Manifest.model_validate(_with_vllm(base, vllm))))
    assert reference("qwen32b", "0.9.2").ast_shape != reference("qwen32b", "0.33.0").ast_shape


def test_shape_detects_injection():
    """The comparison is strict: one injected statement, call, name or comment line is caught."""
    ref = reference("qwen3-8b", "0.33.0")
    src = ref.source
    edits = [
        (r'(?m)^(APP_NAME = "[^"]*")$', r"\1; import os"),
        (r'(?m)^APP_NAME = "([^"]*)"$', r'APP_NAME = "\1" + ""'),
        (r'(?m)^APP_NAME = ("[^"]*")$', r"APP_NAME = (\1)\nimport os"),
        (r'(?m)^MODEL_NAME = "[^"]*"$', 'MODEL_NAME = f"{__import__(\'os\')}"'),
        (r'"huggingface"', 'os.environ["X"]'),
        (r"(?m)^(# ## .*)$", r"\1\n# one comment line more"),
        (r"(?m)^(MINUTES = 60)", r"# one comment line more\n\1"),
        (r"def web_(\w+)\(self\):", r"def web_\1(self, x=print()):"),
        (r"def web_(\w+)\(\):", r"def web_\1():\n    import os"),
    ]
    for pattern, replacement in edits:
        text = re.sub(pattern, replacement, src, count=1)
        assert text != src, pattern
        got = analyse(text)
        assert (got.ast_shape, got.token_shape) != (ref.ast_shape, ref.token_shape), pattern


# ## The properties


def _validate(data: dict[str, Any]) -> Manifest | None:
    try:
        m = Manifest.model_validate(data)
    except Exception as exc:  # noqa: BLE001 - the type is what is checked
        check_rejection(exc)
        _event("rejected")
        return None
    _event("accepted")
    return m


def _event(name: str) -> None:
    if currently_in_test_context():  # counted in `--hypothesis-show-statistics`
        event(name)


@given(st.data())
@examples(400)
def test_one_adversarial_field(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(sorted(BASES)), label="base")
    manifest = copy.deepcopy(BASES[base])
    path = data.draw(st.sampled_from(string_paths(manifest)), label="path")
    value = data.draw(adversarial(original(manifest, path)), label="value")
    assert substitute(manifest, path, value)
    m = _validate(manifest)
    if m is not None:
        check_accepted(m, base, [(path, value)])


@given(st.data())
@examples(250)
def test_several_adversarial_fields(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(sorted(BASES)), label="base")
    manifest = copy.deepcopy(BASES[base])
    paths = string_paths(manifest)
    # Mostly fields whose validators let much through, so that the render is exercised.
    lenient = [p for p in paths if field_of(p) in {("compute", "region"), ("image", "env"), ("app", "workspace")}
               and not isinstance(p[-1], Key)] or paths
    chosen = data.draw(st.lists(st.sampled_from(paths) | st.sampled_from(lenient), min_size=2, max_size=6,
                                unique=True), label="paths")
    changed = []
    for path in chosen:
        value = data.draw(adversarial(original(BASES[base], path)), label=f"value {path!r}")
        if substitute(manifest, path, value):
            changed.append((path, value))
    m = _validate(manifest)
    # A bearer Secret that is also in `names` is attached once: one item fewer, a shape of its own.
    if m is not None and m.secrets.bearer not in m.secrets.names:
        check_accepted(m, base, changed)


@given(st.data())
@examples(300)
def test_near_misses_of_validated_fields(data: st.DataObject) -> None:
    """The valid value with one dangerous piece appended or prepended: the likeliest to pass."""
    base = data.draw(st.sampled_from(sorted(BASES)), label="base")
    manifest = copy.deepcopy(BASES[base])
    path = data.draw(st.sampled_from([p for p in string_paths(manifest) if _validated(p)]), label="path")
    piece = data.draw(st.sampled_from(DANGER), label="piece")
    value = data.draw(st.sampled_from([original(manifest, path) + piece, piece + original(manifest, path)]),
                      label="value")
    assert substitute(manifest, path, value)
    m = _validate(manifest)
    if m is not None:
        check_accepted(m, base, [(path, value)])


# Values built to pass each validator: the render must hold up for every accepted value, not
# just the tidy ones (a label of digits, a 5 kB model id, a version with an epoch).
VALID_PATTERNS: dict[tuple[str, ...], str] = {
    ("app", "name"): manifest_base.APP_NAME.pattern,
    ("model", "id"): r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?\Z",
    ("model", "revision"): r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}\Z",
    ("image", "base"): r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*\Z",
    ("image", "pins"): manifest_base.VERSION.pattern,
    ("image", "web_pins"): manifest_base.VERSION.pattern,
    ("image", "packages"): manifest_base.PACKAGE.pattern[:-2] + "==" + manifest_base.VERSION.pattern[1:],
    ("volumes", "weights", "name"): manifest_base.APP_NAME.pattern,
    ("volumes", "compile_cache", "name"): manifest_base.APP_NAME.pattern,
    ("volumes", "weights", "mount"): manifest_base.POSIX_PATH.pattern,
    ("volumes", "compile_cache", "mount"): manifest_base.POSIX_PATH.pattern,
    ("endpoints", "label"): manifest_base.LABEL.pattern,
    ("secrets", "names"): manifest_base.SECRET_NAME.pattern,
    ("secrets", "bearer"): manifest_base.SECRET_NAME.pattern,
    ("app", "workspace"): manifest_base.LABEL.pattern,
    ("app", "web_suffix"): manifest_base.LABEL.pattern,
    ("model", "reasoning_parser"): manifest_base.REASONING_PARSER.pattern,
    ("scaling", "business_hours", "days"): manifest_base.CRON_DAYS.pattern,
    ("scaling", "business_hours", "start"): r"^0[0-7]:[0-5][0-9]\Z",  # before `end`, never equal to it
    ("scaling", "business_hours", "end"): r"^1[0-9]:[0-5][0-9]\Z",
    ("scaling", "business_hours", "timezone"): r"^(UTC|Europe/Berlin|America/New_York|Asia/Kolkata)\Z",
    ("secrets", "keys"): manifest_base.ENV_VAR.pattern,
}
VALID_KEY_PATTERNS: dict[tuple[str, ...], str] = {
    ("image", "pins"): manifest_base.PACKAGE.pattern,
    ("image", "web_pins"): manifest_base.PACKAGE.pattern,
    ("image", "env"): manifest_base.ENV_VAR.pattern,
}


def _valid_value(path: PathT, base_value: str) -> st.SearchStrategy[str] | None:
    if isinstance(path[-1], Key):
        pattern = VALID_KEY_PATTERNS.get(field_of(path))
    elif field_of(path) in UNVALIDATED:
        return adversarial(base_value)
    else:
        pattern = VALID_PATTERNS.get(field_of(path))
    if pattern is None:
        return None
    return st.from_regex(pattern, fullmatch=True) | st.from_regex(pattern, fullmatch=True).map(lambda v: v * 50)


@given(st.data())
@examples(150)
def test_accepted_unusual_values(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(sorted(BASES)), label="base")
    manifest = copy.deepcopy(BASES[base])
    candidates = [p for p in string_paths(manifest) if _valid_value(p, original(manifest, p)) is not None]
    chosen = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=5, unique=True), label="paths")
    changed = []
    for path in chosen:
        value = data.draw(_valid_value(path, original(BASES[base], path)), label=f"value {path!r}")
        if substitute(manifest, path, value):
            changed.append((path, value))
    m = _validate(manifest)
    if m is not None:
        check_accepted(m, base, changed)


adversarial_path = st.one_of(
    st.text(any_char, max_size=80),
    st.lists(st.sampled_from(NASTY + ["deployments", "a.toml", "x y.toml"]), min_size=1, max_size=6).map("".join),
    st.sampled_from(LONG),
)


@given(path=adversarial_path, env=st.none() | st.sampled_from(NASTY) | st.text(any_char, max_size=30))
@examples(100)
def test_adversarial_manifest_path_and_env(path: str, env: str | None) -> None:
    """(d) the path and env name reach the header comment; it stays three comment lines."""
    for base in ("qwen3-8b", "qwen32b"):
        m = Manifest.model_validate(BASES[base])
        source = render(loaded(m, path, env))
        check_header(source, loaded(m, path, env))
        ast.parse(source)
        # Below the header, byte for byte the reference: nothing leaked out of the comments.
        ref = reference(base, m.image.vllm)
        assert source.split("\n")[3:] == ref.source.split("\n")[3:]


# ## End to end: a TOML file on disk, through `load`


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_string(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def dump_toml(data: dict[str, Any]) -> str:
    """Every top-level key as an inline table or array: valid TOML for any string content."""
    return "".join(f"{_toml_string(k)} = {_toml_value(v)}\n" for k, v in data.items())


def test_toml_writer_round_trips():
    for data in BASES.values():
        assert tomllib.loads(dump_toml(data)) == data
    odd = {"k\n\"'\\": ["\x00\x1f\x7f\u2028\U0010FFFF{{#}}", "'''\"\"\""]}
    assert tomllib.loads(dump_toml(odd)) == odd


@given(data=st.data())
@examples(60)
def test_load_from_disk(data: st.DataObject, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same properties through `load`: real TOML text, the overlay check, the on-disk path."""
    base = data.draw(st.sampled_from(["qwen3-8b", "qwen32b"]), label="base")
    manifest = copy.deepcopy(BASES[base])
    path = data.draw(st.sampled_from(string_paths(manifest)), label="path")
    value = data.draw(adversarial(original(manifest, path)), label="value")
    substitute(manifest, path, value)
    name = data.draw(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/\x00"),
                             min_size=1, max_size=40).filter(lambda s: s not in {".", ".."}), label="file name")
    directory = tmp_path_factory.mktemp("inject")
    file = directory / (name + ".toml")
    try:
        file.write_text(dump_toml(manifest), encoding="utf-8")
    except OSError:  # a name the file system refuses (too long in bytes)
        event("file name refused")
        return
    try:
        result = load(file)
    except ManifestError as exc:
        check_problems(exc.problems)
        event("rejected")
        return
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"load raised {type(exc).__name__} instead of ManifestError: {exc!r}")
    event("accepted")
    source = render(result)
    check_header(source, result)
    got = analyse(source)
    ref = reference(base, result.manifest.image.vllm)
    assert got.ast_shape == ref.ast_shape and got.token_shape == ref.token_shape, (path, value)


# ## Deterministic sweep: every field × every dangerous fragment, at both ends


def test_sweep_every_field_every_fragment() -> None:
    """Deterministic: each string of one base with each dangerous piece at either end."""
    pieces = ["\n", "\r", "\r\n", "\x00", "\x1b", "\x85", "\u2028", '"', "'", '"""', "\\", "#", "{{", "{#", " ",
              "\U0001F600", "١"]
    manifest = BASES["qwen3-8b"]
    # Overlay contents are validated only when `load` selects them (test_load_from_disk).
    paths = [p for p in string_paths(manifest) if not (field_of(p) == ("env",) and len(p) > 2)]
    for path in paths:
        for piece in pieces:
            for value in (original(manifest, path) + piece, piece + original(manifest, path)):
                data = copy.deepcopy(manifest)
                assert substitute(data, path, value)
                m = _validate(data)
                if m is not None:
                    check_accepted(m, "qwen3-8b", [(path, value)])


# ## Values Modal would reject fail validation with a clear error

REJECTED = [
    (("app", "name"), "my app", "not a valid Modal name"),
    (("app", "name"), "app\n", "not a valid Modal name"),
    (("app", "name"), "x" * 65, "not a valid Modal name"),
    (("app", "environment"), "dev env", "not a valid Modal name"),
    (("endpoints", 0, "label"), "Health", "not a valid endpoint label"),
    (("endpoints", 0, "label"), "my_label", "not a valid endpoint label"),
    (("endpoints", 0, "label"), "-health", "not a valid endpoint label"),
    (("endpoints", 0, "label"), "health\n", "not a valid endpoint label"),
    (("endpoints", 0, "label"), "a" * 64, "not a valid endpoint label"),
    (("volumes", "weights", "mount"), "/models/../etc", "not an absolute container path"),
    (("volumes", "weights", "mount"), "/models/..", "not an absolute container path"),
    (("volumes", "weights", "mount"), "models", "not an absolute container path"),
    (("volumes", "weights", "mount"), "/", "not an absolute container path"),
    (("volumes", "weights", "mount"), "//", "not an absolute container path"),
    (("volumes", "weights", "mount"), "/models\n", "not an absolute container path"),
    (("volumes", "weights", "name"), "my volume", "not a valid Modal volume name"),
    (("secrets", "bearer"), "sk-live abc", "not a Modal Secret name"),
    (("secrets", "names", 0), "hf\n", "not a Modal Secret name"),
    (("model", "id"), "Qwen/Qwen3-8B\n", "not a Hugging Face model id"),
    (("model", "revision"), "main\n", "not a git revision"),
    (("image", "base"), "nvidia/cuda:12.4\n", "not an image reference"),
    (("image", "pins", "vllm"), "0.9.2\n", "must be pinned to an exact version"),
    (("image", "pins", "vllm"), ">=0.9", "must be pinned to an exact version"),
    (("image", "pins", "vllm"), "0.9.x", "vllm"),
    (("image", "packages", 0), "hf-transfer==0.1.9\n", "is not pinned with `==`"),
    (("scaling", "business_hours", "start"), "8 am", "not a time of day"),
    (("scaling", "business_hours", "start"), "08:00\n", "not a time of day"),
    (("scaling", "business_hours", "timezone"), "Mars/Olympus", "not an IANA time zone"),
    (("scaling", "business_hours", "timezone"), "x" * 300, "not an IANA time zone"),  # no file has that name
    (("scaling", "business_hours", "timezone"), "../../etc/passwd", "not an IANA time zone"),
    (("scaling", "business_hours", "days"), "1-5\n", "not a cron day-of-week field"),
    (("app", "web_suffix"), "dev\n", "not a web suffix"),
    (("app", "workspace"), "rand\n", "not a Modal workspace name"),
    (("image", "uv"), "0.13.9\n", "not a uv release"),
    (("secrets", "keys", "huggingface", 0), "HF_TOKEN\n", "not an environment variable name"),
]


@pytest.mark.parametrize("path,value,message", REJECTED,
                         ids=[f"{'.'.join(map(str, p))}={v[:20]!r}" for p, v, _ in REJECTED])
def test_modal_would_reject(path: PathT, value: str, message: str) -> None:
    data = copy.deepcopy(BASES["qwen32b"])
    assert substitute(data, path, value)
    with pytest.raises(ValidationError) as info:
        Manifest.model_validate(data)
    check_rejection(info.value)
    problems = manifest_loading.problems(info.value, Path("deployments/x.toml"), "", None)
    assert any(message in p.message for p in problems), [p.message for p in problems]
    assert any(p.hint for p in problems), "a rejection says how to fix it"
    assert all(p.path.startswith(path[0]) for p in problems), [p.path for p in problems]  # names the section


def test_error_messages_escape_control_characters() -> None:
    data = copy.deepcopy(BASES["qwen32b"])
    data["app"]["name"] = "evil\nhint: run `rm -rf ~`\x1b[2J"
    with pytest.raises(ValidationError) as info:
        Manifest.model_validate(data)
    (problem,) = manifest_loading.problems(info.value, Path("deployments/x.toml"), "", None)
    text = problem.render()
    assert text.count("\n") == 1 and "\x1b" not in text and "\\n" in text, text
