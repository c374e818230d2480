"""The job file: what ``load_job`` accepts, how it resolves paths, and the exact problems it reports."""

from __future__ import annotations

import datetime
import decimal
import re
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import invoke, prompt_rows, write_csv, write_job

from batchrun.errors import JobError
from batchrun.inputcheck import RESULT_COLUMNS, open_job

REPO = Path(__file__).resolve().parents[1]
CANARY = "sk-CANARY-123"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder holding a small ``input.csv`` (columns id, topic, prompt) for job files to name."""
    write_csv(tmp_path / "input.csv", prompt_rows(3))
    return tmp_path


def problems_of(job: Path | str) -> list[str]:
    """The problems ``open_job`` (the job file and its input) reports for ``job`` (which must be refused)."""
    with pytest.raises(JobError) as info:
        open_job(job)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def job_with(folder: Path, **sections: Any) -> Path:
    return write_job(folder, "builtin", **sections)


# -- a valid job --------------------------------------------------------------------------------


def test_example_job_loads_with_every_path_resolved_against_the_jobs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jobs/example.toml, loaded from an unrelated working directory, names the repo's files."""
    monkeypatch.chdir(tmp_path)
    spec = open_job(REPO / "jobs" / "example.toml")
    assert spec.job_path == REPO / "jobs" / "example.toml"
    assert spec.input_files == (REPO / "sample_data" / "capitals.csv",)
    assert spec.input_format == "csv"
    assert spec.columns == ("id", "country", "prompt")
    assert spec.prompt_column == "prompt"
    assert spec.id_column == "id"
    assert spec.api_base == ("builtin",)
    assert spec.model_name == "meta-llama/Llama-2-13b-hf"
    assert spec.params == {"max_tokens": 8, "temperature": 0.7, "top_p": 1.0, "top_k": 40}
    assert (spec.run.batch_size, spec.run.concurrency, spec.run.max_retries) == (4, 2, 3)
    assert spec.output_path == REPO / "out" / "example.parquet"
    assert spec.state_dir == REPO / "out" / "example.parquet.batchrun"


def test_relative_paths_resolve_against_the_job_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write_csv(tmp_path / "data" / "input.csv", prompt_rows(2))
    job = write_job(
        tmp_path / "jobs", "builtin", input_path="../data/input.csv", output_path="../out/r.parquet"
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    for given in (job, Path("../jobs/job.toml")):
        spec = open_job(given)
        assert spec.job_path == job
        assert spec.input_files == (tmp_path / "data" / "input.csv",)
        assert spec.output_path == tmp_path / "out" / "r.parquet"
        assert spec.state_dir == tmp_path / "out" / "r.parquet.batchrun"


def test_state_dir_is_resolved_against_the_job_file_when_set(folder: Path) -> None:
    job = job_with(folder)
    text = job.read_text().replace('path = "out/result.parquet"', 'path = "out/result.parquet"\nstate_dir = "state/here"')
    job.write_text(text)
    assert open_job(job).state_dir == folder / "state" / "here"


@pytest.mark.parametrize(
    ("model", "sent"),
    [
        ("custom/meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-hf"),
        ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-hf"),
        ("custom/custom/x", "custom/x"),
    ],
)
def test_model_name_drops_only_the_leading_custom_prefix(folder: Path, model: str, sent: str) -> None:
    spec = open_job(job_with(folder, endpoint={"model": model}))
    assert spec.model == model
    assert spec.model_name == sent


def test_params_left_out_are_not_sent(folder: Path) -> None:
    spec = open_job(job_with(folder, params={"max_tokens": 5}))
    assert spec.params == {"max_tokens": 5}


def test_template_fields_become_the_prompt_columns(folder: Path) -> None:
    spec = open_job(
        job_with(folder, input={"prompt_column": None, "template": "About {topic}:\n{prompt} ({topic})"})
    )
    assert spec.prompt_column is None
    assert spec.template_fields == ("topic", "prompt")
    assert spec.prompt_columns == ("topic", "prompt")


def test_api_key_env_naming_a_variable_is_accepted_without_the_variable_being_set(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading is pure: whether the variable is set is checked when the job runs or is validated."""
    monkeypatch.delenv("BATCHRUN_TEST_KEY", raising=False)
    spec = open_job(job_with(folder, endpoint={"api_key_env": "BATCHRUN_TEST_KEY"}))
    assert spec.api_key_env == "BATCHRUN_TEST_KEY"


@pytest.mark.parametrize(
    "api_base",
    [
        "http://127.0.0.1:8000/inference",
        "http://localhost:8000/inference",
        "http://[::1]:8000/inference",
        "https://models.example.com/inference",
    ],
)
def test_https_anywhere_and_plain_http_on_loopback_are_accepted(folder: Path, api_base: str) -> None:
    assert open_job(write_job(folder, api_base)).api_base == (api_base,)


def test_plain_http_to_another_host_is_accepted_with_allow_insecure_http(folder: Path) -> None:
    job = write_job(folder, "http://10.1.2.3:8000/inference", endpoint={"allow_insecure_http": True})
    assert open_job(job).api_base == ("http://10.1.2.3:8000/inference",)


# -- the job file itself ------------------------------------------------------------------------


def test_missing_job_file_is_reported(tmp_path: Path) -> None:
    job = tmp_path / "nope.toml"
    assert problems_of(job) == [f"{job}: job file not found"]


def test_malformed_toml_reports_the_line(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[input]\npath = "input.csv"\nprompt_column = \n', encoding="utf-8")
    (problem,) = problems_of(job)
    assert problem.startswith(f"{job}: malformed TOML: ")
    assert re.search(r"\(at line 3, column \d+\)$", problem), problem


def test_unknown_key_suggests_the_near_name(folder: Path) -> None:
    job = job_with(folder, run={"concurency": 2})
    assert problems_of(job) == [f"{job}: unknown key 'concurency' in [run] (did you mean 'concurrency'?)"]


def test_unknown_key_with_no_near_name_gets_no_suggestion(folder: Path) -> None:
    job = job_with(folder, input={"colour": "blue"})
    assert problems_of(job) == [f"{job}: unknown key 'colour' in [input]"]


def test_unknown_section_suggests_the_near_name(folder: Path) -> None:
    job = job_with(folder)
    job.write_text(job.read_text() + "\n[runn]\nbatch_size = 2\n")
    assert problems_of(job) == [f"{job}: unknown section [runn] (did you mean [run]?)"]


def test_missing_required_section_is_named(folder: Path) -> None:
    job = job_with(folder)
    job.write_text(job.read_text().replace("[output]", "# no output").replace('path = "out/result.parquet"', ""))
    assert problems_of(job) == [f"{job}: missing section [output]"]


@pytest.mark.parametrize(
    ("sections", "problem"),
    [
        ({"run": {"batch_size": "16"}}, "run.batch_size: must be an integer (got '16')"),
        ({"run": {"concurrency": 2.0}}, "run.concurrency: must be an integer (got 2.0)"),
        ({"run": {"max_retries": True}}, "run.max_retries: must be an integer (got True)"),
        ({"endpoint": {"timeout_s": "300"}}, "endpoint.timeout_s: must be a number (got '300')"),
        ({"params": {"temperature": "hot"}}, "params.temperature: must be a number (got 'hot')"),
        ({"input": {"prompt_column": 3}}, "input.prompt_column: must be a string (got 3)"),
        (
            {"endpoint": {"allow_insecure_http": "yes"}},
            "endpoint.allow_insecure_http: must be true or false (got 'yes')",
        ),
    ],
)
def test_wrong_types_are_refused_not_coerced(folder: Path, sections: dict[str, Any], problem: str) -> None:
    job = job_with(folder, **sections)
    assert problems_of(job) == [f"{job}: {problem}"]


@pytest.mark.parametrize(
    ("sections", "problem"),
    [
        ({"run": {"concurrency": 0}}, "run.concurrency: must be >= 1 (got 0)"),
        ({"run": {"batch_size": 0}}, "run.batch_size: must be >= 1 (got 0)"),
        ({"run": {"max_retries": -1}}, "run.max_retries: must be >= 0 (got -1)"),
        ({"params": {"top_p": 1.5}}, "params.top_p: must be <= 1.0 (got 1.5)"),
        ({"params": {"max_tokens": 0}}, "params.max_tokens: must be >= 1 (got 0)"),
        ({"params": {"temperature": -0.5}}, "params.temperature: must be >= 0.0 (got -0.5)"),
        ({"params": {"top_k": -1}}, "params.top_k: must be >= 0 (got -1)"),
    ],
)
def test_out_of_range_numbers_are_refused_with_the_rule_and_value(
    folder: Path, sections: dict[str, Any], problem: str
) -> None:
    job = job_with(folder, **sections)
    assert problems_of(job) == [f"{job}: {problem}"]


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_temperature_is_refused(folder: Path, value: float) -> None:
    """TOML allows inf and nan; neither is a temperature, and JSON cannot even carry them, so a
    job that passed validation would have every request refused by the endpoint."""
    job = job_with(folder, params={"temperature": value})
    (problem,) = problems_of(job)
    assert problem.startswith(f"{job}: params.temperature: ")
    assert problem.endswith(f"(got {value!r})")


def test_several_problems_in_different_sections_are_all_reported_at_once(folder: Path) -> None:
    job = job_with(
        folder,
        input={"prompt_column": "promt", "colour": "blue"},
        endpoint={"timeout_s": "x"},
        params={"top_p": 1.5},
        run={"concurrency": 0},
    )
    assert sorted(problems_of(job)) == sorted(
        [
            f"{job}: unknown key 'colour' in [input]",
            f"{job}: endpoint.timeout_s: must be a number (got 'x')",
            f"{job}: params.top_p: must be <= 1.0 (got 1.5)",
            f"{job}: run.concurrency: must be >= 1 (got 0)",
        ]
    )


def test_problems_with_the_input_are_reported_beside_problems_elsewhere(folder: Path) -> None:
    """A bad section does not hide the checks on the input's columns."""
    job = job_with(folder, input={"prompt_column": "promt"}, run={"concurrency": 0})
    assert sorted(problems_of(job)) == sorted(
        [
            f"{job}: run.concurrency: must be >= 1 (got 0)",
            f"{job}: input.prompt_column: column 'promt' is not in the input "
            "(columns: id, topic, prompt); did you mean 'prompt'?",
        ]
    )


# -- prompts and templates ----------------------------------------------------------------------


def test_both_prompt_column_and_template_is_refused(folder: Path) -> None:
    job = job_with(folder, input={"template": "Q: {prompt}"})
    assert problems_of(job) == [f"{job}: input: set exactly one of prompt_column and template (got both)"]


def test_neither_prompt_column_nor_template_is_refused(folder: Path) -> None:
    job = job_with(folder, input={"prompt_column": None})
    assert problems_of(job) == [
        f"{job}: input: set exactly one of prompt_column and template (got neither)"
    ]


def test_template_naming_a_missing_column_is_refused(folder: Path) -> None:
    job = job_with(folder, input={"prompt_column": None, "template": "Q: {question}\nA:"})
    assert problems_of(job) == [
        f"{job}: input.template: column 'question' is not in the input (columns: id, topic, prompt)"
    ]


@pytest.mark.parametrize("template", ["Q: {}", "Q: {prompt.upper}", "Q: {prompt[0]}"])
def test_template_placeholders_must_name_a_column(folder: Path, template: str) -> None:
    job = job_with(folder, input={"prompt_column": None, "template": template})
    assert problems_of(job) == [
        f"{job}: input.template: placeholders must name a column, like {{question}}; positional {{}} "
        f"and attribute or index access are not supported (got {template!r})"
    ]


def test_numbered_placeholder_is_refused_even_when_a_column_has_that_name(tmp_path: Path) -> None:
    """``{0}`` is positional to str.format whatever the columns are called: rendering it would fail
    mid-run, so the job must be refused up front rather than pass validation."""
    write_csv(tmp_path / "input.csv", [{"id": "r1", "0": "hello"}])
    job = job_with(tmp_path, input={"prompt_column": None, "template": "Q: {0}"})
    assert problems_of(job) == [
        f"{job}: input.template: placeholders must name a column, like {{question}}; positional {{}} "
        "and attribute or index access are not supported (got 'Q: {0}')"
    ]


def test_template_placeholder_with_a_format_spec_is_refused(folder: Path) -> None:
    job = job_with(folder, input={"prompt_column": None, "template": "Q: {prompt!r}"})
    assert problems_of(job) == [
        f"{job}: input.template: placeholder {{prompt}} must not carry a format spec or conversion "
        "(got 'Q: {prompt!r}')"
    ]


# -- the input ----------------------------------------------------------------------------------


def test_missing_input_file_is_reported_with_its_resolved_path(folder: Path) -> None:
    job = job_with(folder, input_path="nope.csv")
    assert problems_of(job) == [f"{job}: input.path: input file not found: {folder / 'nope.csv'}"]


def test_glob_matching_nothing_is_reported(folder: Path) -> None:
    job = job_with(folder, input_path="data/*.csv")
    assert problems_of(job) == [f"{job}: input.path: no file matches 'data/*.csv' (looked in {folder})"]


def test_missing_prompt_and_id_columns_are_named_with_the_near_name(folder: Path) -> None:
    job = job_with(folder, input={"prompt_column": "promt", "id_column": "idd"})
    assert problems_of(job) == [
        f"{job}: input.prompt_column: column 'promt' is not in the input "
        "(columns: id, topic, prompt); did you mean 'prompt'?",
        f"{job}: input.id_column: column 'idd' is not in the input "
        "(columns: id, topic, prompt); did you mean 'id'?",
    ]


def test_column_near_name_hint_ignores_case(folder: Path) -> None:
    """'ID' for 'id' is the commonest near miss; it deserves the hint as much as a typo does."""
    job = job_with(folder, input={"id_column": "ID", "prompt_column": "Prompt"})
    assert problems_of(job) == [
        f"{job}: input.prompt_column: column 'Prompt' is not in the input "
        "(columns: id, topic, prompt); did you mean 'prompt'?",
        f"{job}: input.id_column: column 'ID' is not in the input "
        "(columns: id, topic, prompt); did you mean 'id'?",
    ]


@pytest.mark.parametrize("column", RESULT_COLUMNS)
def test_input_column_clashing_with_an_added_column_is_refused(tmp_path: Path, column: str) -> None:
    rows = [{**r, column: "x"} for r in prompt_rows(2)]
    write_csv(tmp_path / "input.csv", rows)
    job = job_with(tmp_path)
    assert problems_of(job) == [
        f"{job}: input.path: input column(s) '{column}' clash with the columns batchrun adds "
        "(output, params, error, attempts, latency_s); rename them"
    ]


def test_parquet_input_is_recognised_by_its_extension(tmp_path: Path) -> None:
    pl.DataFrame(prompt_rows(3)).write_parquet(tmp_path / "input.parquet")
    spec = open_job(job_with(tmp_path, input_path="input.parquet"))
    assert spec.input_format == "parquet"
    assert spec.input_files == (tmp_path / "input.parquet",)
    assert spec.columns == ("id", "topic", "prompt")


def test_glob_over_two_csv_files_takes_both_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "data" / "part-2.csv", prompt_rows(2, start=2))
    write_csv(tmp_path / "data" / "part-1.csv", prompt_rows(2))
    spec = open_job(job_with(tmp_path, input_path="data/part-*.csv"))
    assert spec.input_pattern == "data/part-*.csv"
    assert spec.input_files == (tmp_path / "data" / "part-1.csv", tmp_path / "data" / "part-2.csv")
    assert spec.input_format == "csv"
    assert spec.columns == ("id", "topic", "prompt")


def test_glob_over_files_with_different_columns_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "data" / "part-1.csv", prompt_rows(2))
    write_csv(tmp_path / "data" / "part-2.csv", [{"id": "x", "text": "y"}])
    job = job_with(tmp_path, input_path="data/part-*.csv")
    assert problems_of(job) == [
        f"{job}: input.path: part-2.csv has columns ['id', 'text'], but part-1.csv has "
        "['id', 'topic', 'prompt']; every input file must have the same columns"
    ]


def test_csv_with_a_utf8_bom_has_clean_column_names(tmp_path: Path) -> None:
    """Excel writes a BOM before the header; it must not become part of the first column's name."""
    (tmp_path / "input.csv").write_bytes(b"\xef\xbb\xbfid,prompt\r\nr1,hello\r\nr2,world\r\n")
    spec = open_job(job_with(tmp_path, input={"prompt_column": "prompt", "id_column": "id"}))
    assert spec.columns == ("id", "prompt")
    assert spec.id_column == "id"


def test_a_header_that_is_not_utf8_is_refused_but_a_bad_byte_in_a_row_is_left_to_the_rows(tmp_path: Path) -> None:
    (tmp_path / "input.csv").write_bytes(b"id,pr\xffompt\nr1,hello\n")
    job = job_with(tmp_path, input={"prompt_column": "prompt", "id_column": "id"})
    assert problems_of(job) == [f"{job}: input.path: input.csv: the header is not UTF-8 text"]
    (tmp_path / "input.csv").write_bytes(b"id,prompt\nr1,hel\xfflo\n")
    assert open_job(job).columns == ("id", "prompt")


def refusal(job: Path) -> list[str]:
    """``batchrun validate``'s message lines for ``job``, which it must refuse with exit 2 and no
    traceback."""
    result = invoke("validate", job)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr.splitlines()


def test_an_input_path_that_is_a_directory_says_so_not_not_found(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    job = job_with(tmp_path, input_path="data")
    assert refusal(job) == [
        f"batchrun: error: {job}: input.path: {tmp_path / 'data'} is a directory; name a file, "
        "or a glob such as 'data/*.parquet'"
    ]


def test_a_glob_that_matches_only_directories_says_no_file_matches(tmp_path: Path) -> None:
    (tmp_path / "data" / "2024.csv").mkdir(parents=True)
    job = job_with(tmp_path, input_path="data/*.csv")
    assert refusal(job) == [
        f"batchrun: error: {job}: input.path: no file matches 'data/*.csv' (it matches only "
        f"directories) (looked in {tmp_path})"
    ]


def test_a_parquet_glob_whose_files_type_a_column_differently_is_refused_naming_both(tmp_path: Path) -> None:
    """Only names were compared: the run then failed joining the files' rows (exit 1)."""
    (tmp_path / "data").mkdir()
    rows = prompt_rows(2)
    pq.write_table(pa.table({"id": [1, 2], "prompt": [r["prompt"] for r in rows]}), tmp_path / "data" / "a.parquet")
    pq.write_table(pa.table({"id": ["3", "4"], "prompt": [r["prompt"] for r in rows]}), tmp_path / "data" / "b.parquet")
    job = job_with(tmp_path, input_path="data/*.parquet")
    assert refusal(job) == [
        f"batchrun: error: {job}: input.path: column 'id' is int64 in a.parquet but string in "
        "b.parquet; every input file must give a column the same type"
    ]


def parquet_with(folder: Path, column: pa.Array) -> Path:
    """``input.parquet``: columns id, prompt (text) and ``odd`` holding ``column``."""
    n = len(column)
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(n)], "prompt": ["hi"] * n, "odd": column}),
        folder / "input.parquet",
    )
    return folder / "input.parquet"


NOT_TEXT = [
    (pa.array([["a", "b"]]), "list<string>"),
    (pa.array([{"x": 1, "y": [2]}]), "struct<x: int64, y: list<int64>>"),
    (pa.array([[("k", 1)]], pa.map_(pa.string(), pa.int64())), "map<string, int64>"),
    (pa.array([b"bytes"], pa.binary()), "binary"),
    (pa.array([True]), "bool"),
    (pa.array([datetime.date(2024, 1, 1)]), "date32[day]"),
]


@pytest.mark.parametrize(("column", "shown"), NOT_TEXT, ids=[s for _, s in NOT_TEXT])
def test_a_prompt_column_that_is_not_text_or_a_number_is_refused_naming_its_type(
    tmp_path: Path, column: pa.Array, shown: str
) -> None:
    parquet_with(tmp_path, column)
    job = job_with(tmp_path, input_path="input.parquet", input={"prompt_column": "odd"})
    assert refusal(job) == [
        f"batchrun: error: {job}: input.prompt_column: column 'odd' is {shown}, not text or "
        "a number; a prompt must be text (numbers are sent as their text)"
    ]


def test_a_template_over_a_list_column_is_refused_rather_than_sending_its_repr(tmp_path: Path) -> None:
    parquet_with(tmp_path, pa.array([["a", "b"]]))
    job = job_with(tmp_path, input_path="input.parquet", input={"prompt_column": None, "template": "{prompt}: {odd}"})
    assert refusal(job) == [
        f"batchrun: error: {job}: input.template: column 'odd' is list<string>, not text or "
        "a number; a template may only name text or number columns"
    ]


NOT_IDS = [
    (pa.array([["a"]]), "list<string>"),
    (pa.array([{"x": 1}]), "struct<x: int64>"),
    (pa.array([[("k", 1)]], pa.map_(pa.string(), pa.int64())), "map<string, int64>"),
    (pa.array([b"bytes"], pa.large_binary()), "large_binary"),
    (pa.array([[1, 2]], pa.list_(pa.int32(), 2)), "fixed_size_list<int32>[2]"),
]


@pytest.mark.parametrize(("column", "shown"), NOT_IDS, ids=[s for _, s in NOT_IDS])
def test_an_id_column_of_a_type_that_cannot_be_an_id_is_refused_at_load(
    tmp_path: Path, column: pa.Array, shown: str
) -> None:
    parquet_with(tmp_path, column)
    job = job_with(tmp_path, input_path="input.parquet", input={"id_column": "odd"})
    assert refusal(job) == [
        f"batchrun: error: {job}: input.id_column: column 'odd' is {shown}, which cannot be "
        "an id; use a column of text, integers or dates"
    ]


@pytest.mark.parametrize(
    "column",
    [
        pa.array([7], pa.int16()),
        pa.array([2.5]),
        pa.array([decimal.Decimal("2.50")], pa.decimal128(5, 2)),
        pa.array(["x"], pa.large_string()),
        pa.array(["x"]).dictionary_encode(),
    ],
    ids=lambda c: str(c.type),
)
def test_a_prompt_or_template_column_of_text_or_numbers_is_accepted(tmp_path: Path, column: pa.Array) -> None:
    parquet_with(tmp_path, column)
    assert open_job(job_with(tmp_path, input_path="input.parquet", input={"prompt_column": "odd"})).prompt_column == "odd"
    template = {"prompt_column": None, "template": "{odd}"}
    assert open_job(job_with(tmp_path, input_path="input.parquet", input=template)).template_fields == ("odd",)


@pytest.mark.parametrize(
    "column",
    [pa.array([7]), pa.array([datetime.date(2024, 1, 1)]), pa.array([datetime.datetime(2024, 1, 1)]), pa.array(["x"]).dictionary_encode()],
    ids=lambda c: str(c.type),
)
def test_an_id_column_of_integers_dates_or_text_is_accepted(tmp_path: Path, column: pa.Array) -> None:
    parquet_with(tmp_path, column)
    assert open_job(job_with(tmp_path, input_path="input.parquet", input={"id_column": "odd"})).id_column == "odd"


def test_column_type_problems_are_reported_with_every_other_problem(tmp_path: Path) -> None:
    parquet_with(tmp_path, pa.array([{"x": 1}]))
    job = job_with(tmp_path, input_path="input.parquet", input={"prompt_column": "odd", "id_column": "odd"},
                   run={"batch_size": 0})
    assert [line.split(": ")[3] for line in refusal(job)] == [
        "run.batch_size", "input.prompt_column", "input.id_column",
    ]


def test_output_path_must_be_parquet(folder: Path) -> None:
    job = job_with(folder, output_path="out/result.csv")
    assert problems_of(job) == [f"{job}: output.path: must end in .parquet (got 'out/result.csv')"]


# -- secrets and the endpoint -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["api_key", "token"])
def test_a_literal_key_in_the_job_is_refused_without_echoing_it(folder: Path, key: str) -> None:
    job = job_with(folder, endpoint={key: CANARY})
    with pytest.raises(JobError) as info:
        open_job(job)
    assert info.value.problems == [
        f"{job}: endpoint.{key}: a key never sits in a job file; put it in an environment variable "
        "and name that variable with endpoint.api_key_env"
    ]
    assert CANARY not in str(info.value)
    assert CANARY not in repr(info.value)


def test_a_literal_key_is_not_echoed_even_beside_other_problems(folder: Path) -> None:
    job = job_with(folder, endpoint={"api_key": CANARY, "timeout_s": "x"}, run={"concurency": 2})
    problems = problems_of(job)
    assert len(problems) == 3
    assert not any(CANARY in p for p in problems)


def test_api_key_env_holding_something_other_than_a_variable_name_is_refused_without_echo(
    folder: Path,
) -> None:
    job = job_with(folder, endpoint={"api_key_env": CANARY})
    problems = problems_of(job)
    assert problems == [
        f"{job}: endpoint.api_key_env: must name an environment variable "
        "(letters, digits, underscores), not hold a key"
    ]
    assert CANARY not in "\n".join(problems)


def test_credentials_in_api_base_are_refused_without_echo(folder: Path) -> None:
    job = write_job(folder, f"https://user:{CANARY}@models.example.com/inference")
    problems = problems_of(job)
    assert problems == [f"{job}: endpoint.api_base: must not carry credentials; use api_key_env"]
    assert CANARY not in "\n".join(problems)


@pytest.mark.parametrize(
    "api_base", ["http://models.example.com/inference", "http://10.1.2.3:8000/inference"]
)
def test_plain_http_to_a_non_loopback_host_is_refused(folder: Path, api_base: str) -> None:
    job = write_job(folder, api_base)
    assert problems_of(job) == [
        f"{job}: endpoint.api_base: plain http is only for loopback addresses; use https, or set "
        f"endpoint.allow_insecure_http = true (got {api_base!r})"
    ]


@pytest.mark.parametrize("api_base", ["ftp://127.0.0.1/x", "127.0.0.1:8000", "", "Builtin"])
def test_api_base_must_be_an_http_url_or_builtin(folder: Path, api_base: str) -> None:
    job = write_job(folder, api_base)
    assert problems_of(job) == [
        f'{job}: endpoint.api_base: must be an http(s) URL or "builtin" (got {api_base!r})'
    ]


def test_the_example_jobs_in_the_repo_are_valid(tmp_path: Path) -> None:
    """Every shipped job file loads (from a copy, so its relative paths still hold)."""
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    shutil.copytree(REPO / "sample_data", tmp_path / "sample_data")
    for job in sorted((tmp_path / "jobs").glob("*.toml")):
        spec = open_job(job)
        assert spec.input_files == (tmp_path / "sample_data" / "capitals.csv",), job


# -- reading the job file is not looking at the input -------------------------------------------


def test_load_job_reads_the_job_file_only_and_the_planning_step_looks_at_the_input(tmp_path: Path) -> None:
    """``load_job`` never opens the input (it may not exist yet, or live elsewhere); the planning
    step (``open_job``, ``with_input``) finds its files and columns and reports its problems."""
    from batchrun.config import load_job
    from batchrun.inputcheck import with_input

    job = job_with(tmp_path, input_path="later/*.csv")
    spec = load_job(job)
    assert spec.input is None and spec.input_pattern == "later/*.csv"
    with pytest.raises(RuntimeError, match="not been looked at"):
        _ = spec.input_files
    with pytest.raises(JobError, match=r"input.path: no file matches 'later/\*.csv'"):
        with_input(spec)
    (tmp_path / "later").mkdir()
    write_csv(tmp_path / "later" / "a.csv", prompt_rows(2))
    scanned = with_input(spec)
    assert scanned.input_files == (tmp_path / "later" / "a.csv",) and scanned.columns == ("id", "topic", "prompt")
    assert with_input(scanned) is scanned


def test_job_file_and_input_problems_are_reported_together(tmp_path: Path) -> None:
    job = job_with(tmp_path, input_path="missing.csv", run={"batch_size": 0})
    problems = problems_of(job)
    assert any("run.batch_size: must be >= 1" in p for p in problems)
    assert any("input.path: input file not found" in p for p in problems)


# -- replicas (issue 15) ---------------------------------------------------------------------------


def test_a_list_of_replicas_is_read_in_order_and_one_string_is_a_list_of_one(folder: Path) -> None:
    urls = ["http://127.0.0.1:8001/inference", "https://gpu-2.example.com/inference"]
    assert open_job(write_job(folder, urls)).api_base == tuple(urls)
    assert open_job(write_job(folder, "http://127.0.0.1:8001/inference")).api_base == ("http://127.0.0.1:8001/inference",)


def test_each_replica_is_checked_as_a_url_and_named_by_its_place_in_the_list(folder: Path) -> None:
    job = write_job(folder, [
        "http://127.0.0.1:8001/inference",
        "http://10.0.0.7:8000/inference",
        "builtin",
        "http://127.0.0.1:8001/inference/",
        "ftp://x",
    ])
    where = str(job)
    assert problems_of(job) == [
        f"{where}: endpoint.api_base[1]: plain http is only for loopback addresses; use https, or set "
        "endpoint.allow_insecure_http = true (got 'http://10.0.0.7:8000/inference')",
        f'{where}: endpoint.api_base[2]: "builtin" is a single endpoint, not a replica: give it as api_base alone',
        f"{where}: endpoint.api_base[3]: 'http://127.0.0.1:8001/inference/' is listed twice; each replica once",
        f"{where}: endpoint.api_base[4]: must be an http(s) URL or \"builtin\" (got 'ftp://x')",
    ]


def test_an_empty_list_or_a_list_of_not_strings_is_one_clear_problem(folder: Path) -> None:
    assert problems_of(write_job(folder, [])) == [
        f"{folder / 'job.toml'}: endpoint.api_base: must name at least one replica (got [])"
    ]
    assert problems_of(write_job(folder, ["http://127.0.0.1:8001/inference", 4])) == [  # type: ignore[list-item]
        f"{folder / 'job.toml'}: endpoint.api_base[1]: must be a URL (a string) (got 4)"
    ]
    assert problems_of(write_job(folder, 3)) == [  # type: ignore[arg-type]
        f"{folder / 'job.toml'}: endpoint.api_base: must be a URL or a list of URLs (got 3)"
    ]


def test_validate_shows_the_replicas_and_that_concurrency_is_per_replica(folder: Path) -> None:
    urls = ["http://127.0.0.1:8001/inference", "http://127.0.0.1:8002/inference"]
    result = invoke("validate", str(write_job(folder, urls, run={"concurrency": 4})))
    assert result.exit_code == 0, result.output
    assert f"endpoint:     2 replicas: {urls[0]}, {urls[1]} model" in result.output
    assert "at most 4 in flight per replica" in result.output
