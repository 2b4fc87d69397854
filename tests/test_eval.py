"""`liftdeploy eval`: grading answers against labelled tasks, the task file's errors, and the command
end to end against the rendered modules' own apps served on the CPU stand-in engine."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from liftdeploy import evaluate, verify
from liftdeploy.client import AsyncClient
from liftdeploy.evaluate import Options, Record, Totals
from liftdeploy.grade import NO_JSON, Task, TaskFileError, first_json, grade, load_tasks, normalise, parse_strict
from tests.helpers_render import DEPLOYMENTS, ROOT, cli_in_process

SMALL = ROOT / "tests" / "fixtures" / "eval_tasks_small.jsonl"
OBJECT = {"type": "object"}


def task(expected, schema=None, tags=()) -> Task:
    return Task("t", "p", schema or {}, expected, tuple(tags))


# ## Grading


@pytest.mark.parametrize(("text", "normalised"), [
    (" Alice  Smith. ", "alice smith"),
    ("Hello,\tWorld!?", "hello, world"),
    ("ＡＢＣ", "abc"),  # NFKC: full-width letters
    ("Straße", "strasse"),  # casefold, not lower
    ("U.S.", "u.s"),
    ("...", ""),
])
def test_normalise(text: str, normalised: str) -> None:
    assert normalise(text) == normalised


def test_fields_flatten_nested_objects_and_arrays_with_their_lengths() -> None:
    expected = {"user": {"name": "Alice", "age": 31}, "tags": ["a", {"k": True}], "note": None, "empty": []}
    right = grade(task(expected), expected)
    assert (right.valid, right.exact, right.fields_right, right.fields_total) == (True, True, 7, 7)
    answer = {"user": {"name": " alice. ", "age": 31.0}, "tags": ["A", {"k": 1}, "extra"], "note": None, "empty": []}
    graded = grade(task(expected), answer)
    assert not graded.exact  # strings verbatim, lengths and booleans exactly
    assert graded.wrong == ["len(tags)", "tags[1].k"]  # `true` is not 1; the extra element shows in the length
    assert (graded.fields_right, graded.fields_total) == (5, 7)


@pytest.mark.parametrize(("expected", "answer", "right"), [
    (1, 1.0, True),
    (1, "1", False),
    (True, 1, False),
    (0, False, False),
    (None, None, True),
    (None, "null", False),
    ("7", 7, False),
    (2.5, 2.5, True),
])
def test_numbers_booleans_and_null_compare_by_type_and_value(expected, answer, right) -> None:
    graded = grade(task({"x": expected}), {"x": answer})
    assert graded.fields_right == int(right)
    assert graded.exact is right


def test_a_missing_field_or_a_mistyped_container_is_wrong_beneath() -> None:
    expected = {"a": 1, "b": {"c": "x", "d": [1, 2]}}
    graded = grade(task(expected), {"a": 1, "b": "not an object"})
    assert graded.wrong == ["b.c", "len(b.d)", "b.d[0]", "b.d[1]"]
    assert grade(task(expected), {"b": {"c": "x", "d": [1, 2]}}).wrong == ["a"]
    assert grade(task(expected), {"a": 1, "b": {"c": "x", "d": [1]}}).wrong == ["len(b.d)", "b.d[1]"]


def test_keys_the_answer_adds_break_exact_but_not_fields() -> None:
    graded = grade(task({"a": 1}), {"a": 1, "b": 2})
    assert (graded.exact, graded.fields_right, graded.fields_total) == (False, 1, 1)


def test_odd_keys_are_quoted_in_paths() -> None:
    assert grade(task({"first name": "x", "ok": 1}), {}).wrong == ['"first name"', "ok"]


def test_validity_is_the_runtimes_check_with_formats() -> None:
    schema = {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]}
    assert grade(task({"day": "2025-03-14"}, schema), {"day": "2025-03-14"}).valid
    bad = grade(task({"day": "2025-03-14"}, schema), {"day": "14 March"})
    assert not bad.valid and "is not a 'date'" in (bad.problem or "")
    nothing = grade(task({"day": "2025-03-14"}, schema), NO_JSON)
    assert (nothing.valid, nothing.problem, nothing.fields_right, nothing.fields_total) == (False, "not JSON", 0, 1)


def test_json_is_taken_strictly_when_constrained_and_found_in_free_text() -> None:
    prose = 'Sure! Here it is:\n```json\n{"name": "Alice", "age": 31}\n```\nAnything else?'
    assert first_json(prose) == {"name": "Alice", "age": 31}
    assert parse_strict(prose) is NO_JSON
    assert first_json("I cannot {help} with [that") is NO_JSON
    assert first_json("the list [1, 2] then {\"a\": 1}") == [1, 2]
    assert parse_strict(' {"a": 1}\n') == {"a": 1}


def record(tid: str, valid: bool, finish: str, *, right: int = 1, total: int = 2, tokens: int = 10,
           ms: float = 100.0, error: str | None = None, status: int | None = None, attempts: int = 1) -> Record:
    return Record(tid, [], valid, False, right, total, finish, tokens, ms, "{}", error=error, status=status,
                  attempts=attempts)


def test_totals_count_stopped_invalid_apart_from_length_and_refusals() -> None:
    records = [
        record("a", True, "stop"),
        record("b", False, "stop"),  # finished and broke its schema: the headline failure
        record("c", False, "length"),  # cut by max_tokens: not stopped-invalid
        record("d", False, "invalid", attempts=3),  # generate's own verdict after its retries
        record("e", False, "error", right=0, tokens=0, error="generate answered 400: bad schema", status=400),
        record("f", False, "error", right=0, tokens=0, error="no answer", ms=5.0),
    ]
    t = Totals.of(records)
    assert (t.tasks, t.valid, t.stopped_invalid, t.refused, t.failed, t.retried) == (6, 1, 1, 1, 1, 1)
    assert t.finish_reasons == {"error": 2, "stop": 2, "length": 1, "invalid": 1}
    assert (t.fields_right, t.fields_total, t.field_accuracy) == (4, 12, 0.3333)
    assert (t.completion_tokens, t.mean_tokens) == (40, 10.0)  # over the answered four
    assert t.latency_p50_ms == 100.0


# ## The task file


def test_the_fixture_loads() -> None:
    tasks = load_tasks(SMALL)
    assert [t.id for t in tasks][:2] == ["person-age-01", "order-total-01"]
    assert tasks[2].tags == ("dates", "extraction") and tasks[-1].tags == ()
    assert tasks[2].line == 3


GOOD = {"id": "x", "prompt": "p", "schema": OBJECT, "expected": {}}


@pytest.mark.parametrize(("line", "message", "hint"), [
    ('{"id": "x", "prompt": "p",', "not JSON: ", "each line is one JSON object"),
    ("[1, 2]", "a JSON list, not an object", "each line is one JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "expected"}), "missing `expected`", "every task has"),
    (json.dumps({**GOOD, "expect": 1}), "unknown key `expect`", "did you mean `expected`?"),
    (json.dumps({**GOOD, "id": "a"}), "`id` `a` is used again (first on line 1)", "its own id"),
    (json.dumps({**GOOD, "expected": {"age": "31"}, "schema": {"type": "object", "properties": {
        "age": {"type": "integer"}}}}), "task `x`: `expected` does not match the schema at $.age: '31' is not of type",
     "must itself be valid"),
    (json.dumps({**GOOD, "schema": {"type": "objekt"}}), "task `x`: `schema` is not a valid JSON Schema", "fix"),
    (json.dumps({**GOOD, "schema": {"$ref": "#/$defs/missing"}}), "task `x`: `schema` has a `$ref` that does not "
     "resolve", "point each `$ref`"),
    (json.dumps({**GOOD, "tags": "dates"}), "task `x`: `tags` is not a list of strings", "e.g."),
    (json.dumps({**GOOD, "prompt": " "}), "task `x`: `prompt` is not a non-empty string", "write the prompt"),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path: Path, line: str, message: str, hint: str) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({**GOOD, "id": "a"}) + "\n\n" + line + "\n")
    with pytest.raises(TaskFileError) as caught:
        load_tasks(path)
    assert caught.value.message.startswith(f"{path}:3: {message}"), caught.value.message
    assert hint in (caught.value.hint or "")


def test_the_cli_reports_a_bad_task_file_in_two_lines(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text(SMALL.read_text() + '{"id": "late", "prompt": "p", "schema": {}, "expected": 1, "tag": []}\n')
    proc = cli_in_process("eval", "http://127.0.0.1:9", "--tasks", path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {path}:7: unknown key `tag`", "hint: did you mean `tags`?"]
    missing = cli_in_process("eval", "http://127.0.0.1:9", "--tasks", tmp_path / "none.jsonl")
    assert missing.returncode == 2 and missing.stderr.startswith(f"error: {tmp_path / 'none.jsonl'}: no such task file")


@pytest.mark.parametrize(("args", "fragment"), [
    (["--free"], "--free and --schema-in apply to the openai route"),
    (["--schema-in", "user"], "--free and --schema-in apply to the openai route"),
    (["--route", "grpc"], "unknown route `grpc`"),
    (["--route", "openai", "--schema-in", "assistant"], "unknown --schema-in `assistant`"),
    (["--ids", "nope"], "no task with id `nope`"),
    (["--tag", "nope"], "no task is left to run"),
])
def test_usage_errors(args: list[str], fragment: str) -> None:
    proc = cli_in_process("eval", "http://127.0.0.1:9", "--tasks", SMALL, *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {fragment}") and "\nhint: " in proc.stderr, proc.stderr


def test_select_filters_by_id_tag_and_limit() -> None:
    tasks = load_tasks(SMALL)
    assert [t.id for t in evaluate.select(tasks, tags="numbers,dates")] == [
        "person-age-01", "order-total-01", "meeting-date-01"]
    assert [t.id for t in evaluate.select(tasks, ids="sentiment-01, colors-list-01")] == [
        "colors-list-01", "sentiment-01"]
    assert len(evaluate.select(tasks, tags="extraction", limit=2)) == 2


def test_the_schema_is_stated_as_the_runtime_states_it() -> None:
    """`--schema-in system` sends what `generate` sends: the rendered runtime's own schema_prompt."""
    from liftdeploy.local.server import import_rendered
    from liftdeploy.manifest import load

    module = import_rendered(load(DEPLOYMENTS / "qwen3-8b.toml"))
    schema = load_tasks(SMALL)[4].schema
    assert evaluate.schema_messages("Who?", schema, "system") == module.schema_prompt("Who?", schema)
    user = evaluate.schema_messages("Who?", schema, "user")
    assert user == [{"role": "user", "content": "Who?\n\n" + module.schema_prompt("", schema)[0]["content"]}]
    assert evaluate.schema_messages("Who?", schema, "none") == [{"role": "user", "content": "Who?"}]


def test_a_manifest_target_asks_modals_urls() -> None:
    """As `bench` and `smoke`: a manifest's endpoints at Modal's URLs, the openai calls below its own."""
    client = verify.client_for(str(DEPLOYMENTS / "qwen3-coder-30b.toml"), cls=AsyncClient)
    assert client.address("generate")[0] == "https://rand--lift-sys-coder-generate.modal.run"
    chat = client._request("openai", "POST", {}, None, "/v1/chat/completions")
    assert chat["url"] == "https://rand--lift-sys-coder-openai.modal.run/v1/chat/completions"
    dev = verify.client_for(str(DEPLOYMENTS / "qwen32b.toml"), "dev", cls=AsyncClient)
    assert dev.address("generate")[0].endswith("--lift-sys-inference-dev-generate.modal.run")


# ## End to end: the rendered modules' apps on the CPU stand-in engine (the random smoke model)


@pytest.fixture(scope="module")
def engine(smoke_engine):
    return smoke_engine


@pytest.fixture(scope="module")
def coder(engine):
    """The SGLang deployment: generate and an openai route the stand-in serves, behind proxy auth."""
    from liftdeploy.local.server import Credentials, LocalServer, build
    from liftdeploy.manifest import load

    creds = Credentials(proxy_key="wk-eval", proxy_secret="ws-eval")
    with LocalServer(build(load(DEPLOYMENTS / "qwen3-coder-30b.toml"), engine, creds)) as server:
        yield server


@pytest.fixture()
def proxy_auth(monkeypatch):
    monkeypatch.setenv("LIFTDEPLOY_PROXY_KEY", "wk-eval")
    monkeypatch.setenv("LIFTDEPLOY_PROXY_SECRET", "ws-eval")


def check_graded(report: dict, tasks: list[Task]) -> None:
    """Every task graded once, each grade what jsonschema and the expected answer say of its output."""
    by_id = {t.id: t for t in tasks}
    assert sorted(r["id"] for r in report["records"]) == sorted(by_id)
    for r in report["records"]:
        assert r["error"] is None, r
        t = by_id[r["id"]]
        if r["parsed"]:
            valid = jsonschema.Draft202012Validator(t.schema, format_checker=jsonschema.FormatChecker()).is_valid(
                r["answer"])
            assert r["valid"] is valid, r
            assert r["answer"] == (first_json(r["output"]) if report["options"]["free"] else json.loads(r["output"]))
        else:
            assert r["valid"] is False and r["answer"] is None
        assert r["fields_total"] == grade(t, r["answer"] if r["parsed"] else NO_JSON).fields_total
        assert r["tokens"] > 0 and r["latency_ms"] > 0
    totals = report["totals"]
    assert totals["tasks"] == len(tasks)
    assert totals["valid"] == sum(r["valid"] for r in report["records"])
    assert totals["stopped_invalid"] == sum(r["finish_reason"] == "stop" and not r["valid"]
                                            for r in report["records"])
    assert sum(totals["finish_reasons"].values()) == len(tasks)


def test_eval_generate_end_to_end(coder, proxy_auth, tmp_path: Path) -> None:
    proc = cli_in_process("eval", coder.url, "--tasks", SMALL, "--max-tokens", "96", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    check_graded(report, load_tasks(SMALL))
    # generate's contract: a `stop` is valid, whatever the model
    assert all(r["valid"] for r in report["records"] if r["finish_reason"] == "stop")
    assert report["model"] is None and report["options"]["label"] == "generate"
    assert set(report["by_tag"]) == {"extraction", "numbers", "dates", "lists", "nested"}
    for row in ("person-age-01", "sentiment-01", "total"):
        assert row in proc.stdout
    assert "stopped-invalid" in proc.stdout and f"wrote {tmp_path / 'eval.json'}" in proc.stdout
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--schema-in", "system"], ["--schema-in", "none", "--free"]],
                         ids=["constrained", "free"])
def test_eval_openai_end_to_end(coder, proxy_auth, tmp_path: Path, args: list[str]) -> None:
    proc = cli_in_process("eval", coder.url, "--tasks", SMALL, "--route", "openai", *args, "--max-tokens", "64",
                          "--limit", "3", "--concurrency", "2", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    check_graded(report, load_tasks(SMALL)[:3])
    assert report["model"] == "Qwen/Qwen3-Coder-30B-A3B-Instruct"


def test_min_field_accuracy_gates(coder, proxy_auth, tmp_path: Path) -> None:
    proc = cli_in_process("eval", coder.url, "--tasks", SMALL, "--ids", "sentiment-01", "--max-tokens", "32",
                          "--min-field-accuracy", "1.01", "--out", tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: eval failed: field accuracy ") and "\nhint: " in proc.stderr


def test_no_answer_is_a_failure_not_a_grade(tmp_path: Path) -> None:
    """A refused connection is retried, then recorded as failed (the CLI exits 1 on it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    client = verify.client_for(url, cls=AsyncClient, retries=1, backoff=0.01)
    report = evaluate.run(client, load_tasks(SMALL)[:2], Options(), target=url, tasks_file=str(SMALL))
    assert (report.totals.failed, report.totals.refused, report.totals.valid) == (2, 0, 0)
    assert all("did not answer after 2 attempts" in (r.error or "") for r in report.records)


def test_eval_imports_no_gpu_stack(coder, proxy_auth, tmp_path: Path) -> None:
    """A whole run, in a process of its own, as `liftdeploy eval` runs: torch, vLLM and transformers stay out."""
    from tests.helpers_render import py_run
    from tests.test_cli import HEAVY, IMPORTS

    args = ["eval", coder.url, "--tasks", str(SMALL), "--limit", "2", "--max-tokens", "24", "--out", str(tmp_path)]
    proc = py_run(IMPORTS, json.dumps(args), json.dumps(HEAVY))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": 0, "heavy": []}, proc.stderr
    assert len(json.loads((tmp_path / "eval.json").read_text())["records"]) == 2


def test_the_matrix_serves_each_configuration_as_an_env_overlay(tmp_path: Path) -> None:
    """benchmarks/eval_matrix.py's variants load as manifests with the configuration's decoding."""
    import importlib.util

    from liftdeploy.manifest import load

    spec = importlib.util.spec_from_file_location("eval_matrix", ROOT / "benchmarks" / "eval_matrix.py")
    assert spec is not None and spec.loader is not None
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    path = matrix.variant(DEPLOYMENTS / "qwen3-8b.toml", tmp_path, "xgrammar", "any", 2, 4096)
    m = load(path, matrix.ENV).manifest
    assert (m.decoding.backend, m.decoding.whitespace, m.decoding.retries_on_invalid) == ("xgrammar", "any", 2)
    assert m.model.max_model_len == 4096 and m.model.id == "Qwen/Qwen3-8B"
    assert matrix.runs_for(0, 0, ["generate", "openai/none/free"]) == ["generate", "openai/none/free"]
    assert matrix.runs_for(1, 0, ["generate", "openai/none/free"]) == ["generate"]
    assert matrix.runs_for(0, 2, ["openai/system/constrained", "generate"]) == ["generate"]


def test_a_refused_schema_is_a_grade_and_bad_credentials_a_failure(coder, proxy_auth, monkeypatch,
                                                                     tmp_path: Path) -> None:
    """A task the deployment refuses (here a 422: the prompt is over its limit) is that task's grade (exit 0);
    a 401 is no answer (exit 1)."""
    tasks = tmp_path / "tasks.jsonl"
    refused = {"id": "too-long", "prompt": "x" * 40_000, "expected": {"ok": True},
               "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}
    tasks.write_text(SMALL.read_text().splitlines()[-1] + "\n" + json.dumps(refused) + "\n")
    proc = cli_in_process("eval", coder.url, "--tasks", tasks, "--max-tokens", "32", "--out", tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert (report["totals"]["refused"], report["totals"]["failed"]) == (1, 0)
    record = report["records"][1]
    assert record["status"] == 422 and "prompt" in record["error"] and record["finish_reason"] == "error"
    monkeypatch.setenv("LIFTDEPLOY_PROXY_SECRET", "wrong")
    denied = cli_in_process("eval", coder.url, "--tasks", tasks, "--out", tmp_path / "b")
    assert denied.returncode == 1
    assert denied.stderr.startswith("error: eval failed: 2 of 2 requests got no answer (first: ")
    assert "answered 401" in denied.stderr
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["totals"]["failed"] == 2


def test_the_shipped_task_set_is_the_default_and_loads() -> None:
    """`--tasks` defaults to the packaged set; every line passes the same checks as a user's file."""
    tasks = load_tasks(evaluate.DEFAULT_TASKS)
    assert len(tasks) >= 150 and all(t.tags for t in tasks)
