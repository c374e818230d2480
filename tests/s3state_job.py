"""Run (or merge) a job with its run state on S3, in a process of its own: what ``batchrun JOB.toml``
does once the job file takes an ``s3://`` state_dir (the config wiring is not in this branch).

    python tests/s3state_job.py JOB.toml --state s3://bucket/prefix --endpoint http://127.0.0.1:PORT
        [--shard I/N] [--merge]

Credentials come from the AWS variables of the environment. Prints the run's summary as JSON;
exits with the code ``batchrun`` gives the same outcome.
"""

from __future__ import annotations

import argparse
import json
import sys

from batchrun import preflight, report, runner, storage
from batchrun.errors import BatchrunError
from batchrun.s3state import S3RunState, S3StateOptions
from batchrun.s3store import S3Path, s3_filesystem
from batchrun.storage import ProgressStore


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("job")
    parser.add_argument("--state", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--shard")
    parser.add_argument("--merge", action="store_true")
    args = parser.parse_args()
    filesystem = s3_filesystem(endpoint_url=args.endpoint, region="us-east-1")
    root = S3Path.parse(args.state)

    def progress_store(spec: object) -> ProgressStore:
        return S3RunState(root, filesystem, options=S3StateOptions(settle_s=0.3))

    for module in (runner, preflight, report, storage):
        module.progress_store = progress_store  # type: ignore[attr-defined]
    try:
        if args.merge:
            summary = runner.merge_job(args.job)
        else:
            summary = runner.run_job(args.job, shard=args.shard, handle_signals=True)
    except BatchrunError as exc:
        print(f"batchrun: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(summary.to_dict()))
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
