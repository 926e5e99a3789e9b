"""Constrained output offline: the generate task's --json-schema, --json-object, --regex, --choice, --grammar
and per-row constraint column; `parsed`; an output cut before its structure closes is a counted error."""

import json
import re

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import LabelConfig
from pipelines.corpus.job import run_label_job
from pipelines.replica import BloomReplica
from pipelines.tasks import TASKS
from tests.pipelines.corpus.test_label import read_output
from tests.jobs.test_label_corpus import load_script

SCHEMA = {"type": "object", "properties": {"topic": {"type": "string", "maxLength": 10},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "label": {"enum": ["positive", "negative"]}},
          "required": ["topic", "score", "label"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]{1,6}-[0-9]{2}"
GRAMMAR = 'start: "sum(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'
ROWS = [{"id": f"r{i}", "text": text} for i, text in enumerate(["The match ended", "Prices rose again today",
                                                                 "A new law", "Le chat dort"])]


@pytest.fixture(scope="module")
def replica(checkpoints):
    return BloomReplica(LabelConfig(task="generate", model=str(checkpoints["generate"]), dtype="float32",
                                    max_new_tokens=80))


def test_every_kind_holds_each_rows_output_and_json_is_parsed(replica):
    free = replica.label_rows(ROWS)
    kinds = [({"json_schema": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
             ({"json_object": True}, lambda t: isinstance(json.loads(t), dict)),
             ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t) is not None),
             ({"choice": ["spam", "ham", "not sure"]}, lambda t: t in ("spam", "ham", "not sure")),
             ({"grammar": GRAMMAR}, lambda t: re.fullmatch(r"sum\([0-9]{1,3}(,[0-9]{1,3})*\)", t) is not None)]
    for params, valid in kinds:
        for row in replica.label_rows(ROWS, [params] * len(ROWS)):
            if "json_object" in params and row.get("error_code") == "length":
                continue  # any object: a random model may write keys until max_new_tokens (counted, never invalid)
            assert row.get("error") is None and row["finish_reason"] in ("stop", "eos"), (params, row)
            assert valid(row["generated_text"]), (params, row)
            json_kind = next(iter(params)) in ("json_schema", "json_object")
            assert row["parsed"] == (row["generated_text"] if json_kind else None)
    assert all(r["parsed"] is None for r in free)
    assert not any(re.fullmatch(REGEX, r["generated_text"]) for r in free)  # random weights: free text is not


def test_a_structure_cut_by_max_new_tokens_is_an_error_with_reason_length(replica):
    cut, whole = replica.label_rows(ROWS[:2], [{"json_schema": SCHEMA, "max_new_tokens": 4},
                                               {"json_schema": SCHEMA}])
    assert cut["error"].startswith("incomplete structure") and cut["error_code"] == "length"
    assert cut["finish_reason"] == "length" and cut["parsed"] is None and cut["completion_tokens"] == 4
    assert whole.get("error") is None and json.loads(whole["parsed"])["label"] in ("positive", "negative")


@pytest.mark.parametrize("settings, message", [
    ({"json_schema": {"type": "objekt"}}, "json_schema: cannot compile the json_schema constraint .*objekt"),
    ({"regex": "a(b"}, "regex: cannot compile the regex constraint 'a\\(b'.*unclosed group"),
    ({"grammar": "start: foo"}, "grammar: cannot compile .*unknown name"),
    ({"regex": ""}, "regex: a regex constraint needs a non-empty pattern"),
    ({"regex": "a+", "choice": ["a"]}, "regex and choice cannot go together"),
    ({"json_object": True, "constraint_column": "c"}, "json_object and constraint_column cannot go together"),
    ({"regex": "a+", "min_tokens": 2}, "min_tokens cannot go with regex"),
])
def test_a_constraint_that_cannot_compile_is_refused_before_any_work_naming_it(checkpoints, settings, message):
    with pytest.raises(ValueError, match=message) as e:
        LabelConfig(task="generate", model=str(checkpoints["generate"]), **settings)
    assert e.value.param in settings


def test_the_flags_read_files_and_repeat(tmp_path):
    script = load_script()
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "g.lark").write_text(GRAMMAR)
    config, _ = script.parse_args(["--task", "generate", "--json-schema", str(tmp_path / "schema.json")])
    assert config.json_schema == SCHEMA
    assert script.parse_args(["--task", "generate", "--grammar", str(tmp_path / "g.lark")])[0].grammar == GRAMMAR
    assert script.parse_args(["--task", "generate", "--choice", "a", "--choice", "b c"])[0].choice == ["a", "b c"]
    assert script.parse_args(["--task", "generate", "--regex", REGEX])[0].regex == REGEX
    (tmp_path / "bad.json").write_text('{"type": "objekt"}')
    with pytest.raises(ValueError, match="json_schema: cannot compile"):
        script.parse_args(["--task", "generate", "--json-schema", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit):  # argparse names the file it cannot read
        script.parse_args(["--task", "generate", "--json-schema", str(tmp_path / "missing.json")])


def test_the_constraint_settings_enter_the_fingerprint_only_when_set():
    m = "model-fingerprint"
    off = LabelConfig(task="generate")
    assert not {"json_schema", "json_object", "regex", "choice", "grammar", "constraint_column"} & set(off.task_params())
    changed = [LabelConfig(task="generate", **kw) for kw in (
        {"json_schema": SCHEMA}, {"json_schema": {**SCHEMA, "required": ["topic"]}}, {"json_object": True},
        {"regex": REGEX}, {"choice": ["a", "b"]}, {"grammar": GRAMMAR}, {"constraint_column": "c"})]
    prints = [c.fingerprint(m) for c in [off] + changed]
    assert len(set(prints)) == len(prints)


def test_a_job_with_a_per_row_constraint_column(ray_cluster, checkpoints, tmp_path):
    """Each row's own constraint; a bad cell is that row's error, a cut structure is counted in the report
    with its reason, and nothing else is lost."""
    cells = [json.dumps({"json_schema": SCHEMA}), json.dumps({"regex": REGEX}), json.dumps({"choice": ["yes", "no"]}),
             None, '{"regex": "a(b"}', "{not json", json.dumps({"json": {"type": "object", "properties": {
                 "words": {"type": "array", "items": {"type": "string", "minLength": 30}, "minItems": 5}},
                 "required": ["words"]}})]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(cells))], "text": ["Some text here"] * len(cells),
                             "spec": pa.array(cells, pa.string())}), tmp_path / "in" / "rows.parquet")
    config = LabelConfig(task="generate", model=str(checkpoints["generate"]), input=[str(tmp_path / "in")],
                         output=str(tmp_path / "out"), constraint_column="spec", max_new_tokens=80,
                         max_errored_fraction=None, dtype="float32")
    report = run_label_job(config)
    out = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    jsonschema.validate(json.loads(out["r0"]["parsed"]), SCHEMA)
    assert re.fullmatch(REGEX, out["r1"]["generated_text"]) and out["r1"]["parsed"] is None
    assert out["r2"]["generated_text"] in ("yes", "no")
    assert out["r3"]["error"] is None and out["r3"]["parsed"] is None  # null: free text
    assert "spec: cannot compile the regex constraint" in out["r4"]["error"]
    assert out["r5"]["error"].startswith("spec is not JSON")
    assert out["r6"]["error"].startswith("incomplete structure") and out["r6"]["finish_reason"] == "length"
    assert report["errored_rows"] == 3
    assert sum(e["rows"] for reason, e in report["errors_this_run"].items()
               if reason.startswith("incomplete structure")) == 1


def test_parsed_is_a_column_only_where_rows_may_be_constrained_to_json(checkpoints):
    # Without a JSON constraint a run writes the columns it wrote before constraints existed: resuming an
    # older output, or adding to an older nightly table, keeps one schema.
    def columns(**settings):
        c = LabelConfig(task="generate", model=str(checkpoints["generate"]), **settings)
        return [f.name for f in TASKS["generate"].output_fields(c=c)]

    assert "parsed" not in columns() and "parsed" not in columns(regex=REGEX) and "parsed" not in columns(choice=["a"])
    for settings in ({"json_schema": SCHEMA}, {"json_object": True}, {"constraint_column": "spec"}):
        assert columns(**settings)[:2] == ["generated_text", "parsed"], settings
