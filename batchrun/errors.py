"""batchrun's one exception tree; each class knows the exit code the CLI gives it.

    BatchrunError                    (exit 1, unexpected)
    ├── JobError                     (exit 2) the job file or its input is invalid
    │   └── ObjectStoreError                  an object store refused a request (no bucket, no key, denied)
    │       └── StoreUnreachableError (exit 74) it did not answer (a StorageError too): progress kept
    ├── EndpointError                (exit 4) the run stopped early; progress is kept
    │   ├── AuthError                         401/403: the key is wrong or missing
    │   └── OutageError                       the endpoint stopped answering altogether
    ├── StorageError                 (exit 74) a write failed (disk full, quota, file too big)
    ├── BusyError                    (exit 75) another run holds the job's lock
    ├── NotReadyError                (exit 75) merge asked for while a shard is unfinished
    ├── StateError                   (exit 2) the run directory disagrees with the job
    └── InterruptedRun               (exit 130) stopped by a signal; progress is kept

Rows that fail after their retries are data (an ``error`` value on the row), not exceptions.
"""

from __future__ import annotations

import enum
from typing import Any


class BatchrunError(Exception):
    """Base of every error batchrun raises on purpose.

    ``summary`` is the run's ``RunSummary`` when the error ended a run (``run_job``, ``merge_job``),
    so a scheduler can report the counts of a run that stopped early.
    """

    exit_code = 1
    summary: Any = None


class JobError(BatchrunError):
    """The job file, or the input it names, is invalid; ``problems`` lists every issue found."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class StoreFault(enum.Enum):
    """Why an object store request failed, as data (``ObjectStoreError.fault``)."""

    NO_BUCKET = "no_bucket"
    NO_OBJECT = "no_object"
    NO_CREDENTIALS = "no_credentials"
    ACCESS_DENIED = "access_denied"
    UNREACHABLE = "unreachable"
    OTHER = "other"


class ObjectStoreError(JobError):
    """An object store (S3) request failed: ``fault`` says why, ``operation`` what was asked
    (``read``, ``write``, ``list``...), ``location`` where (``s3://bucket/key``). The message
    never holds a credential."""

    def __init__(self, message: str, *, fault: StoreFault, operation: str, location: str):
        self.fault = fault
        self.operation = operation
        self.location = location
        super().__init__(message)


class StateError(BatchrunError):
    """The run directory cannot be used with this job as it stands (changed input, bad state)."""

    exit_code = 2


class EndpointError(BatchrunError):
    """The endpoint cannot be used right now; the run stopped early with its progress kept."""

    exit_code = 4


class AuthError(EndpointError):
    """The endpoint refused the credentials (401/403)."""

    def __init__(self, status: int, detail: str = ""):
        self.status = status
        msg = f"the endpoint refused the credentials (HTTP {status}): check the API key"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class OutageError(EndpointError):
    """The endpoint stopped answering altogether."""


class StorageError(BatchrunError):
    """Writing to disk failed (ENOSPC, EDQUOT, EFBIG); nothing half-written is visible."""

    exit_code = 74


class StoreUnreachableError(ObjectStoreError, StorageError):
    """The object store did not answer (refused, reset, timed out after the S3 client's own
    retries; ``fault`` UNREACHABLE). An outage, not a wrong job: like a full disk it keeps the
    run's progress and the same command resumes once the store is back, so it exits 74 as the run
    state on S3 does; a wrong ``endpoint_url`` looks the same from here, and the message says to
    check it."""

    exit_code = 74


class BusyError(BatchrunError):
    """Another run of the same job holds its lock."""

    exit_code = 75

    def __init__(self, lock_path: str, holder: str):
        self.lock_path = lock_path
        self.holder = holder
        super().__init__(f"another run holds this job ({holder}); lock: {lock_path}")


class NotReadyError(BatchrunError):
    """The merge cannot run yet: some shard has not finished (try again later)."""

    exit_code = 75


class InterruptedRun(BatchrunError):
    """The run was stopped by a signal after saving its progress."""

    exit_code = 130

    def __init__(self, signal_name: str = "signal"):
        self.signal_name = signal_name
        super().__init__(
            f"interrupted by {signal_name}: progress saved; run the same command to resume"
        )
