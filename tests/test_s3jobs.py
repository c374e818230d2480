"""Jobs whose input, output and state are on S3 (issue 16), written as users write them: job files
with ``s3://`` paths and a ``[storage]`` section, run by the ``batchrun`` command against a real
SeaweedFS on loopback, credentials in the environment only."""

from __future__ import annotations

import io
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import BATCHRUN, MODEL, PARAMS, assert_exact, prompt_rows, toml_value
from endpoint import LiveEndpoint
from s3server import SeaweedS3

BUCKET = "jobs"


@pytest.fixture(scope="module")
def s3(s3_server: SeaweedS3) -> SeaweedS3:
    s3_server.make_bucket(BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def endpoint() -> Any:
    with LiveEndpoint() as ep:
        yield ep


def prefix() -> str:
    """A fresh folder in the bucket for one test."""
    return f"{BUCKET}/{uuid.uuid4().hex[:10]}"


def put(s3: SeaweedS3, key: str, rows: list[dict[str, Any]], fmt: str) -> str:
    """Upload ``rows`` as ``key`` (CSV or Parquet); its s3:// URL."""
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    if fmt == "csv":
        pacsv.write_csv(table, sink)
    else:
        pq.write_table(table, sink, row_group_size=50)
    with s3.filesystem().open_output_stream(key) as out:
        out.write(sink.getvalue())
    return f"s3://{key}"


def get(s3: SeaweedS3, url: str, local: Path) -> Path:
    """Download ``url`` to ``local`` (to read it with the tests' local helpers)."""
    with s3.filesystem().open_input_stream(url.removeprefix("s3://")) as src:
        local.write_bytes(src.read())
    return local


def exists(s3: SeaweedS3, url: str) -> bool:
    from pyarrow import fs

    return s3.filesystem().get_file_info(url.removeprefix("s3://")).type == fs.FileType.File


def job_file(folder: Path, url: str, inp: str, out: str, *, s3: SeaweedS3 | None, state: str | None = None,
             run: dict[str, Any] | None = None) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "input": {"path": inp, "prompt_column": "prompt", "id_column": "id"},
        "endpoint": {"api_base": url, "model": MODEL, "timeout_s": 10},
        "params": dict(PARAMS),
        "run": {"batch_size": 8, "concurrency": 4, "checkpoint_rows": 64, "max_retries": 3,
                "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, **(run or {})},
        "output": {"path": out, **({"state_dir": state} if state else {})},
    }
    if s3 is not None:
        sections["storage"] = {"endpoint_url": s3.endpoint_url, "region": s3.region}
    text = "\n".join(
        f"[{name}]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in values.items()) + "\n"
        for name, values in sections.items()
    )
    path = folder / "job.toml"
    path.write_text(text, encoding="utf-8")
    return path


def batchrun(job: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run(
        [str(BATCHRUN), str(job), "--quiet", *args], cwd=job.parent, env={**base, **env},
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("state_on", ["s3", "local"])
def test_a_job_from_s3_to_s3_writes_every_row_once_in_order(
    s3: SeaweedS3, endpoint: LiveEndpoint, tmp_path: Path, fmt: str, state_on: str
) -> None:
    rows = prompt_rows(300)
    where = prefix()
    inp = put(s3, f"{where}/in/prompts.{fmt}", rows, fmt)
    out = f"s3://{where}/out/answers.parquet"
    state = str(tmp_path / "state") if state_on == "local" else None  # None: on S3 beside the output
    job = job_file(tmp_path, endpoint.url, inp, out, s3=s3, state=state)
    done = batchrun(job, env=s3.env)
    assert done.returncode == 0, done.stderr
    assert_exact(get(s3, out, tmp_path / "out.parquet"), rows)
    assert exists(s3, out + ".SUCCESS")
    summary = json.loads(get(s3, out + ".summary.json", tmp_path / "s.json").read_text())
    assert summary["total_rows"] == 300 and summary["exit_code"] == 0 and summary["output_path"] == out
    if state_on == "s3":
        assert exists(s3, out + ".batchrun/plan.json") and not (tmp_path / "state").exists()
    else:
        assert (tmp_path / "state" / "plan.json").exists() and not exists(s3, out + ".batchrun/plan.json")
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    status = subprocess.run([str(BATCHRUN), "status", str(job), "--json"], env={**base, **s3.env},
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["output"] == out and doc["state"] == "complete" and doc["pending"] == 0, doc
    # Running it again finds it done: nothing sent, the output untouched.
    before = endpoint.stats.requests
    again = batchrun(job, env=s3.env)
    assert again.returncode == 0, again.stderr
    assert endpoint.stats.requests == before


def test_a_changed_input_object_is_seen_and_refused_like_a_changed_file(
    s3: SeaweedS3, endpoint: LiveEndpoint, tmp_path: Path
) -> None:
    rows = prompt_rows(200)
    where = prefix()
    inp = put(s3, f"{where}/prompts.parquet", rows, "parquet")
    out = f"s3://{where}/answers.parquet"
    job = job_file(tmp_path, endpoint.url, inp, out, s3=s3, run={"checkpoint_rows": 50})
    assert batchrun(job, env=s3.env).returncode == 0
    # The same key, other bytes of the same size: its ETag changes, so it is read and hashed.
    changed = [{**r, "prompt": r["prompt"].replace("Prompt", "Prumpt")} if i == 7 else r for i, r in enumerate(rows)]
    put(s3, f"{where}/prompts.parquet", changed, "parquet")
    rerun = batchrun(job, env=s3.env)
    assert rerun.returncode == 0, rerun.stderr  # incremental by id: only the changed row is sent
    df = assert_exact(get(s3, out, tmp_path / "out.parquet"), changed)
    assert df.height == 200


def test_an_output_that_the_input_pattern_would_read_is_refused(s3: SeaweedS3, endpoint: LiveEndpoint, tmp_path: Path) -> None:
    where = prefix()
    inp = put(s3, f"{where}/data/a.parquet", prompt_rows(10), "parquet")
    job = job_file(tmp_path, endpoint.url, f"s3://{where}/data/*.parquet", f"s3://{where}/data/out.parquet", s3=s3)
    done = batchrun(job, env=s3.env)
    assert done.returncode == 2
    assert "matches" in done.stderr or "read by the input pattern" in done.stderr
    assert inp.endswith("a.parquet")


def test_store_errors_name_the_bucket_and_never_a_credential(s3: SeaweedS3, endpoint: LiveEndpoint, tmp_path: Path) -> None:
    where = prefix()
    inp = put(s3, f"{where}/prompts.csv", prompt_rows(10), "csv")
    out = f"s3://{where}/answers.parquet"
    # A bucket that does not exist.
    job = job_file(tmp_path, endpoint.url, "s3://no-such-bucket-here/prompts.csv", out, s3=s3)
    missing = batchrun(job, env=s3.env)
    assert missing.returncode == 2, missing.stderr
    assert "no-such-bucket-here" in missing.stderr
    # A key that does not exist.
    job = job_file(tmp_path, endpoint.url, f"s3://{where}/nothing.csv", out, s3=s3)
    nokey = batchrun(job, env=s3.env)
    assert nokey.returncode == 2 and f"s3://{where}/nothing.csv" in nokey.stderr, nokey.stderr
    # A wrong secret key: access denied, the bucket named, neither key shown.
    job = job_file(tmp_path, endpoint.url, inp, out, s3=s3)
    wrong = {**s3.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-" + uuid.uuid4().hex}
    denied = batchrun(job, env=wrong)
    assert denied.returncode == 2, denied.stderr
    assert BUCKET in denied.stderr
    assert wrong["AWS_SECRET_ACCESS_KEY"] not in denied.stderr + denied.stdout
    assert s3.access_key not in denied.stderr + denied.stdout
    # No credentials at all.
    bare = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_REGION": s3.region, "HOME": str(tmp_path)}
    none = batchrun(job, env=bare)
    assert none.returncode == 2, none.stderr
    assert "credential" in none.stderr.lower() or "denied" in none.stderr.lower(), none.stderr


def test_validate_shows_where_each_part_of_an_s3_job_lives(s3: SeaweedS3, tmp_path: Path) -> None:
    where = prefix()
    inp = put(s3, f"{where}/prompts.csv", prompt_rows(5), "csv")
    out = f"s3://{where}/answers.parquet"
    job = job_file(tmp_path, "http://127.0.0.1:9/none", inp, out, s3=s3)
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    shown = subprocess.run([str(BATCHRUN), "validate", str(job)], env={**base, **s3.env},
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"output:       {out}" in shown.stdout
    assert f"state:        {out}.batchrun" in shown.stdout
