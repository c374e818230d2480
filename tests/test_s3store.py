"""The S3 store against a real S3-compatible server (SeaweedFS on loopback, ``tests/s3server.py``):
globs, ranged reads of Parquet and CSV, publication whole or not at all (an error in the block, a
signal mid-upload, the store or the writer killed mid-upload), identities, JSON documents, and
the message and exit code of every way a request can fail. No mocks."""

from __future__ import annotations

import _thread
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import wait_for
from s3server import CountingProxy, SeaweedS3, free_port_pairs, weed_binary

from batchrun import csvinput, s3store, source, storage
from batchrun.config import StorageSection
from batchrun.errors import JobError, ObjectStoreError, StorageError, StoreFault, StoreUnreachableError
from batchrun.s3store import S3Path, S3Store, s3_filesystem

REGION = "us-east-1"


# --- fixtures: the session's server, this test's bucket, stores on it ---------------------------


def isolate_aws_env(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """No AWS setting of the host reaches the test: no key, no profile file, no instance metadata
    request (it would leave loopback)."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(folder / "no-config"))


@pytest.fixture
def s3(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SeaweedS3:
    """The session's server, with its test key in this process's environment, where the AWS
    SDK's credential chain (pyarrow's) finds it."""
    isolate_aws_env(monkeypatch, tmp_path)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def bucket(s3: SeaweedS3) -> str:
    return s3.make_bucket(f"t-{uuid.uuid4().hex[:12]}")


def store_at(endpoint_url: str, scratch: Path | None = None) -> S3Store:
    return S3Store(s3_filesystem(endpoint_url=endpoint_url, region=REGION), endpoint_url=endpoint_url,
                   scratch_dir=scratch)


@pytest.fixture
def store(s3: SeaweedS3, tmp_path: Path) -> S3Store:
    return store_at(s3.endpoint_url, tmp_path)


@pytest.fixture
def proxy(s3: SeaweedS3) -> Iterator[CountingProxy]:
    """A byte-counting relay in front of the session's server."""
    with CountingProxy(s3.s3_port) as relay:
        yield relay


def put(s3: SeaweedS3, loc: S3Path, data: bytes) -> None:
    """Write an object directly (as another tool would: no batchrun digest)."""
    with s3.filesystem().open_output_stream(loc.fs_path) as f:
        f.write(data)


def get(s3: SeaweedS3, loc: S3Path) -> bytes:
    with s3.filesystem().open_input_stream(loc.fs_path) as f:
        data: bytes = f.read()
        return data


def keys(s3: SeaweedS3, bucket: str) -> list[str]:
    from pyarrow import fs

    infos = s3.filesystem().get_file_info(fs.FileSelector(bucket, recursive=True))
    return sorted(S3Path(i.path).key for i in infos if i.type == fs.FileType.File)


def write_random(path: Path, mb: int) -> str:
    """``mb`` MB of random bytes (nothing for compression to shrink); returns their SHA-256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mb):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
    return h.hexdigest()


def when(condition: Callable[[], bool], action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` in a thread as soon as ``condition`` holds (polled, within 60 s)."""

    def run() -> None:
        wait_for(condition, "the condition for the action", within_s=60)
        action()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# --- locations and globs (no server) --------------------------------------------------------------


def test_s3path_keeps_its_class_and_prints_as_a_url() -> None:
    p = S3Path.parse("s3://results/run-7/answers.parquet")
    assert (p.bucket, p.key, p.fs_path) == ("results", "run-7/answers.parquet", "results/run-7/answers.parquet")
    assert str(p) == "s3://results/run-7/answers.parquet"
    for derived in (p.parent, p.with_suffix(".json"), p.parent / "x.json", p.with_name("y")):
        assert type(derived) is S3Path
    assert str(p.parent) == "s3://results/run-7" and p.name == "answers.parquet"
    assert p.match("*.parquet")
    assert S3Path.parse("s3://bucket").key == ""
    for bad in ("results/x", "s3://", "s3:///x", "/tmp/x"):
        with pytest.raises(JobError, match="is not an S3 location"):
            S3Path.parse(bad)


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("p/*.parquet", "p/a.parquet", True),
        ("p/*.parquet", "p/sub/a.parquet", False),  # * stays within one level
        ("p/*.parquet", "p/.a.parquet", False),  # hidden, as glob.glob: staging objects never match
        ("p/.*", "p/.a.parquet", True),
        ("p/?.csv", "p/a.csv", True),
        ("p/?.csv", "p/ab.csv", False),
        ("p/[ab].csv", "p/b.csv", True),
        ("p/**/*.parquet", "p/a.parquet", True),  # ** matches zero levels too
        ("p/**/*.parquet", "p/x/y/a.parquet", True),
        ("p/**/*.parquet", "p/.x/a.parquet", False),
        ("p/**", "p/x/y", True),
        ("*/a.csv", "q/a.csv", True),
        ("p/a.csv", "p/a.csv", True),
    ],
)
def test_glob_matches_keys_as_glob_matches_paths(pattern: str, key: str, matches: bool) -> None:
    assert s3store._glob_match(pattern.split("/"), key.split("/")) is matches


def test_endpoint_urls_are_checked() -> None:
    with pytest.raises(JobError, match="plain http to example.com would send the data in clear"):
        s3_filesystem(endpoint_url="http://example.com:9000")
    with pytest.raises(JobError, match=r"must be http\(s\)://host\[:port\]"):
        s3_filesystem(endpoint_url="ftp://127.0.0.1:9000")
    with pytest.raises(JobError, match=r"must be http\(s\)://host\[:port\]"):
        s3_filesystem(endpoint_url="http://127.0.0.1:9000/some/path")
    s3_filesystem(endpoint_url="https://s3.example.com", region=REGION)  # no request is made


# --- input: expand, stat, open --------------------------------------------------------------------


def test_expand_lists_a_glob_below_its_literal_prefix_sorted(s3: SeaweedS3, bucket: str, store: S3Store) -> None:
    for key in ("prompts/b.parquet", "prompts/a.parquet", "prompts/notes.txt", "prompts/sub/c.parquet",
                "prompts/.a.parquet.tmp-1-abc", "prompts/.hidden.parquet", "other/x.parquet"):
        put(s3, S3Path(bucket, key), b"x")
    at = f"s3://{bucket}"

    def names(pattern: str) -> list[str]:
        return [p.key for p in store.expand(pattern, Path("/unused"))]

    assert names(f"{at}/prompts/*.parquet") == ["prompts/a.parquet", "prompts/b.parquet"]
    assert names(f"{at}/prompts/**/*.parquet") == ["prompts/a.parquet", "prompts/b.parquet", "prompts/sub/c.parquet"]
    assert names(f"{at}/*/?.parquet") == ["other/x.parquet", "prompts/a.parquet", "prompts/b.parquet"]
    assert names(f"{at}/prompts/notes.txt") == ["prompts/notes.txt"]
    assert all(type(p) is S3Path for p in store.expand(f"{at}/prompts/*.parquet", Path()))

    with pytest.raises(JobError) as info:
        store.expand(f"{at}/prompts/*.csv", Path())
    assert str(info.value) == f"no object matches '{at}/prompts/*.csv' (listed {at}/prompts/)"
    with pytest.raises(JobError) as info:
        store.expand(f"{at}/nothing/*.parquet", Path())
    assert str(info.value) == f"no object matches '{at}/nothing/*.parquet' (listed {at}/nothing/)"
    with pytest.raises(JobError) as info:
        store.expand(f"{at}/prompts", Path())
    assert str(info.value) == (
        f"{at}/prompts is a folder (a prefix of other keys); name an object, or a glob such as '{at}/prompts/*.parquet'"
    )
    with pytest.raises(ObjectStoreError) as missing:
        store.expand(f"{at}/prompts/z.parquet", Path())
    assert str(missing.value) == f"cannot read {at}/prompts/z.parquet: no such object"
    assert missing.value.fault is StoreFault.NO_OBJECT and missing.value.exit_code == 2


def test_stat_and_etag_tell_a_rewrite(s3: SeaweedS3, bucket: str, store: S3Store) -> None:
    loc = S3Path(bucket, "in/a.csv")
    put(s3, loc, b"id,prompt\n1,hello\n")
    st = store.stat(loc)
    assert st.size == 18 and st.mtime_ns > 0
    assert st.mtime_ns % 1_000_000_000 == 0  # S3's Last-Modified has whole seconds only
    first = store.etag(loc)
    assert first and store.etag(loc) == first
    put(s3, loc, b"id,prompt\n1,hallo\n")  # same size, most likely the same second
    assert store.stat(loc).size == 18
    assert store.etag(loc) != first
    assert store.etag(S3Path(bucket, "in/none.csv")) is None


def big_table(rows: int = 400_000) -> pa.Table:
    import numpy as np

    rng = np.random.default_rng(7)
    text = [os.urandom(24).hex() for _ in range(rows)]
    return pa.table({"id": pa.array(np.arange(rows)), "prompt": text, "score": rng.random(rows)})


def test_parquet_is_read_with_ranged_gets_not_downloaded(
    s3: SeaweedS3, bucket: str, proxy: CountingProxy, tmp_path: Path
) -> None:
    """The footer and one column of one row group cost a small share of the object's bytes, as
    counted on the wire; the whole file still reads back equal through the same reader."""
    table = big_table()
    local = tmp_path / "big.parquet"
    pq.write_table(table, local, row_group_size=50_000)
    loc = S3Path(bucket, "in/big.parquet")
    put(s3, loc, local.read_bytes())
    size = local.stat().st_size
    store = store_at(proxy.endpoint_url)

    proxy.reset()
    pf = source._open_parquet(store, loc)  # the reader batchrun's input goes through
    assert pf.metadata.num_row_groups == 8
    part = pf.read_row_group(3, columns=["id"])
    pf.close()
    assert part.column("id").to_pylist() == list(range(150_000, 200_000))
    fetched = proxy.to_client
    print(f"\nranged read: {fetched} bytes of a {size}-byte object ({fetched / size:.1%})")
    assert fetched < size / 10

    proxy.reset()
    with store.open(loc) as f:
        assert pq.read_table(f).equals(table)
    assert proxy.to_client >= size


def test_csv_is_read_through_the_store(s3: SeaweedS3, bucket: str, store: S3Store, tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"Prompt number {i}, with a comma"} for i in range(5000)]
    local = tmp_path / "in.csv"
    pacsv.write_csv(pa.Table.from_pylist(rows), local)
    loc = S3Path(bucket, "in/prompts.csv")
    put(s3, loc, local.read_bytes())
    assert csvinput.header(store, loc) == ["id", "prompt"]
    got = pa.Table.from_batches(list(csvinput.batches(store, loc, ["id", "prompt"], 64 << 10)))
    assert got.to_pylist() == rows


# --- publish: whole or not at all ------------------------------------------------------------------


def test_publish_shows_the_whole_file_with_the_identity_recorded_first(
    s3: SeaweedS3, bucket: str, store: S3Store
) -> None:
    loc = S3Path(bucket, "run-7/answers.parquet")
    table = pa.table({"id": [1, 2, 3], "output": ["a", "b", "c"]})
    recorded: list[dict[str, int]] = []

    def record(identity: dict[str, int]) -> None:
        assert store.identity(loc) is None  # not visible yet when it is recorded
        recorded.append(identity)

    with store.publish(loc, "output", record) as tmp:
        assert isinstance(tmp, Path) and not tmp.exists()
        pq.write_table(table, tmp)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    assert recorded == [{"size": len(get(s3, loc)), "sha256_64": int(digest[:16], 16)}]
    assert store.identity(loc) == recorded[0]
    assert pq.read_table(pa.BufferReader(get(s3, loc))).equals(table)
    assert keys(s3, bucket) == ["run-7/answers.parquet"]  # the staging object is gone
    assert store.leftovers(loc) == []
    with s3.filesystem().open_input_file(loc.fs_path) as f:
        assert f.metadata()["Content-Type"].decode() == f"application/vnd.apache.parquet; x-batchrun-sha256={digest}"


def test_pyarrow_completes_an_upload_cut_short_which_is_why_publish_stages(s3: SeaweedS3, bucket: str) -> None:
    """The fact publish is designed around (pyarrow 26): an upload stream closed by an exception
    still completes its multipart upload, so the half written shows as an object; pyarrow has no
    abort in Python. Should this fail one day, pyarrow aborts such uploads and publish could
    upload in place instead of staging and copying."""
    fs = s3.filesystem()
    with pytest.raises(RuntimeError):
        with fs.open_output_stream(f"{bucket}/half") as f:
            f.write(b"x" * 100)
            raise RuntimeError("cut short")
    assert fs.get_file_info(f"{bucket}/half").size == 100
    assert not hasattr(f, "abort")


def publish_bytes(store: S3Store, loc: S3Path, data: bytes) -> dict[str, int]:
    recorded: list[dict[str, int]] = []
    with store.publish(loc, "output", recorded.append) as tmp:
        tmp.write_bytes(data)
    return recorded[0]


def test_an_error_in_the_block_publishes_nothing_and_keeps_the_old_object(
    s3: SeaweedS3, bucket: str, store: S3Store
) -> None:
    loc = S3Path(bucket, "out/answers.parquet")
    old = publish_bytes(store, loc, b"old contents")
    recorded: list[dict[str, int]] = []
    with pytest.raises(RuntimeError, match="the writer failed"):
        with store.publish(loc, "output", recorded.append) as tmp:
            tmp.write_bytes(b"half of the new cont")
            raise RuntimeError("the writer failed")
    assert recorded == []
    assert store.identity(loc) == old and get(s3, loc) == b"old contents"
    assert keys(s3, bucket) == ["out/answers.parquet"]

    def refuse(identity: dict[str, int]) -> None:
        raise OSError("the run state cannot be written")

    with pytest.raises(OSError, match="the run state cannot be written"):
        with store.publish(loc, "output", refuse) as tmp:
            tmp.write_bytes(b"new contents, complete")
    assert get(s3, loc) == b"old contents"
    assert keys(s3, bucket) == ["out/answers.parquet"]  # the staged copy was removed


def test_a_full_local_disk_while_writing_is_a_storage_error(s3: SeaweedS3, bucket: str, store: S3Store) -> None:
    import errno

    loc = S3Path(bucket, "out/answers.parquet")
    with pytest.raises(StorageError, match="no space left on device") as info:
        with store.publish(loc, "output", lambda identity: None):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.exit_code == 74
    assert keys(s3, bucket) == []


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
def test_a_signal_mid_upload_waits_for_the_upload_to_end_whole(
    s3: SeaweedS3, bucket: str, proxy: CountingProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Ctrl-C (or SIGTERM's InterruptedRun) arrives in the main thread while the upload thread is
    half-way: it is raised once the upload has ended, so the object is the old one (staged: the
    copy into place never ran) or the whole new one (direct), never the half pyarrow had."""
    if direct:
        monkeypatch.setattr(s3store, "COPY_LIMIT", 1 << 20)
    store = store_at(proxy.endpoint_url, tmp_path)
    loc = S3Path(bucket, "out/answers.bin")
    old = publish_bytes(store, loc, b"old contents")
    recorded: list[dict[str, int]] = []
    fired_at: list[int] = []
    proxy.reset()

    def interrupt() -> None:
        fired_at.append(proxy.to_server)
        _thread.interrupt_main()

    with pytest.raises(KeyboardInterrupt):
        with store.publish(loc, "output", recorded.append) as tmp:
            digest = write_random(tmp, 64)
            when(lambda: proxy.to_server > (16 << 20), interrupt)
    assert fired_at and fired_at[0] < (48 << 20), fired_at  # it came mid-upload
    if direct:
        assert recorded == [{"size": 64 << 20, "sha256_64": int(digest[:16], 16)}]
        assert store.identity(loc) == recorded[0]
        assert hashlib.sha256(get(s3, loc)).hexdigest() == digest
    else:
        assert store.identity(loc) == old and get(s3, loc) == b"old contents"
    assert keys(s3, bucket) == ["out/answers.bin"]


def start_private_s3(root: Path) -> SeaweedS3:
    """A server of the test's own, for tests that kill it (ended by ``kill``, at once)."""
    weed = weed_binary()
    assert weed is not None  # the session server's fixture skipped the test otherwise
    return SeaweedS3(root, weed=weed).start()


@pytest.fixture
def private_s3(s3: SeaweedS3, tmp_path: Path) -> Iterator[SeaweedS3]:
    server = start_private_s3(tmp_path / "private-s3")
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
def test_the_store_killed_mid_upload_shows_no_partial_object(
    private_s3: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """SIGKILL of the server during the upload: the publish fails naming the endpoint; after a
    restart on the same data the final key holds the old object (staged) or nothing (direct),
    and no other object exists."""
    if direct:
        monkeypatch.setattr(s3store, "COPY_LIMIT", 1 << 20)
    server = private_s3
    bucket = server.make_bucket("killed")
    with CountingProxy(server.s3_port) as relay:
        store = store_at(relay.endpoint_url, tmp_path)
        loc = S3Path(bucket, "out/answers.bin")
        old = None if direct else publish_bytes(store, loc, b"old contents")
        relay.reset()
        with pytest.raises(ObjectStoreError) as info:
            with store.publish(loc, "output", lambda identity: None) as tmp:
                write_random(tmp, 64)
                when(lambda: relay.to_server > (16 << 20), server.kill)
        assert info.value.fault is StoreFault.UNREACHABLE, info.value
        assert str(info.value).startswith(f"cannot write {loc}: the S3 endpoint {relay.endpoint_url} did not answer")
        server.restart()
        assert store.identity(loc) == old
        assert keys(server, bucket) == ([] if direct else ["out/answers.bin"])


def test_a_server_side_copy_may_stay_silent_longer_than_the_sdks_request_timeout(
    s3: SeaweedS3, bucket: str, proxy: CountingProxy, tmp_path: Path
) -> None:
    """SeaweedFS answers a CopyObject only once every byte is copied (54 s for a 4.7 GB output
    in the S3 benchmark); the SDK's default gives up after 3 s of silence and starts the copy
    again. The store that jobs get (``storage.s3_store``) sends the copy with a longer wait."""
    loc = S3Path(bucket, "out/answers.parquet")
    proxy.hold_answers(b"x-amz-copy-source:", 4.5)
    plain = store_at(proxy.endpoint_url, tmp_path)  # the SDK's defaults throughout
    recorded: list[dict[str, int]] = []
    with pytest.raises(ObjectStoreError, match="Timeout was reached") as info:
        with plain.publish(loc, "output", recorded.append) as tmp:
            tmp.write_bytes(b"first")
    assert info.value.fault is StoreFault.UNREACHABLE and info.value.exit_code == 74
    # The store finished the copy the client gave up on: the object shown is the one recorded.
    assert plain.identity(loc) in (None, *recorded)
    jobs = storage.s3_store(StorageSection(endpoint_url=proxy.endpoint_url, region=REGION))
    identity = publish_bytes(jobs, loc, b"contents")
    assert jobs.identity(loc) == identity and get(s3, loc) == b"contents"
    assert keys(s3, bucket) == ["out/answers.parquet"]


_WRITER = """
import os, sys
from pathlib import Path
from batchrun.s3store import S3Path, S3Store, s3_filesystem
url, key, scratch = sys.argv[1:]
store = S3Store(s3_filesystem(endpoint_url=url, region="us-east-1"), endpoint_url=url, scratch_dir=Path(scratch))
with store.publish(S3Path.parse(key), "output", lambda identity: print("recorded", flush=True)) as tmp:
    with open(tmp, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
print("published", flush=True)
"""


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
def test_the_writer_killed_mid_upload_leaves_no_object(
    s3: SeaweedS3, bucket: str, proxy: CountingProxy, tmp_path: Path, direct: bool
) -> None:
    """kill -9 of the writing process mid-upload: its multipart upload is never completed, and
    S3 shows none of it (the old object stays)."""
    store = store_at(s3.endpoint_url)
    loc = S3Path(bucket, "out/answers.bin")
    old = publish_bytes(store, loc, b"old contents")
    code = _WRITER if not direct else _WRITER.replace("import os, sys", "import os, sys\nimport batchrun.s3store as m\nm.COPY_LIMIT = 1 << 20")
    proxy.reset()
    writer = subprocess.Popen([sys.executable, "-c", code, proxy.endpoint_url, str(loc), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        wait_for(lambda: proxy.to_server > (16 << 20) or writer.poll() is not None, "the upload under way", 60)
        writer.send_signal(signal.SIGKILL)
        out, err = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert "published" not in out, (out, err)
    assert store.identity(loc) == old and get(s3, loc) == b"old contents"
    assert keys(s3, bucket) == ["out/answers.bin"]


# --- identity, JSON documents, neighbours, readiness ------------------------------------------------


def test_identity_is_stable_and_changes_with_the_content(s3: SeaweedS3, bucket: str, store: S3Store) -> None:
    loc = S3Path(bucket, "out/answers.parquet")
    assert store.identity(loc) is None and not store.exists(loc)
    first = publish_bytes(store, loc, b"first")
    assert store.identity(loc) == first == store.identity(loc) and store.exists(loc)
    second = publish_bytes(store, loc, b"other")  # same size, other bytes
    assert second != first and store.identity(loc) == second
    assert publish_bytes(store, loc, b"first") == first  # the identity is the content's

    put(s3, loc, b"first")  # the same bytes written by another tool: not taken for ours
    foreign = store.identity(loc)
    assert foreign is not None and set(foreign) == {"size", "etag_64"} and foreign != first
    put(s3, loc, b"third")
    assert store.identity(loc) not in (None, foreign)
    store.remove(loc)
    store.remove(loc)  # removing what is not there is fine
    assert store.identity(loc) is None


def test_json_documents_round_trip(s3: SeaweedS3, bucket: str, store: S3Store) -> None:
    loc = S3Path(bucket, "out/answers.parquet.summary.json")
    doc = {"status": "complete", "rows": 3, "failed_by_class": {"timeout": 1}}
    store.write_json(loc, doc, "summary")
    assert store.read_json(loc) == doc
    assert get(s3, loc).endswith(b"}\n")
    with s3.filesystem().open_input_file(loc.fs_path) as f:
        assert f.metadata()["Content-Type"] == b"application/json"
    assert store.read_json(S3Path(bucket, "out/none.json")) is None
    put(s3, loc, b"not json")
    assert store.read_json(loc) is None
    put(s3, loc, b"[1, 2]")
    assert store.read_json(loc) is None
    assert keys(s3, bucket) == ["out/answers.parquet.summary.json"]


def test_beside_lists_the_neighbours_a_pattern_names(s3: SeaweedS3, bucket: str, store: S3Store) -> None:
    out = S3Path(bucket, "out/result.parquet")
    for shard in ("1-of-2", "2-of-2"):
        store.write_json(out.with_name(f"result.parquet.shard-{shard}.summary.json"), {"shard": shard}, "summary")
    store.write_json(out.with_name("other.parquet.shard-1-of-2.summary.json"), {}, "summary")
    store.write_json(S3Path(bucket, "out/deeper/result.parquet.shard-3-of-3.summary.json"), {}, "summary")
    found = store.beside(out, "result.parquet.shard-*.summary.json")
    assert [p.name for p in found] == ["result.parquet.shard-1-of-2.summary.json", "result.parquet.shard-2-of-2.summary.json"]
    assert store.beside(S3Path(bucket, "none/x.parquet"), "*") == []


def test_ready_probes_the_bucket_and_leaves_nothing(s3: SeaweedS3, bucket: str, store: S3Store) -> None:
    loc = S3Path(bucket, "out/answers.parquet")
    store.ready(loc, create=False)
    store.ready(loc, create=True)
    assert keys(s3, bucket) == []
    missing = S3Path(f"{bucket}-none", "out/answers.parquet")
    for create in (False, True):
        with pytest.raises(ObjectStoreError) as info:
            store.ready(missing, create=create)
        verb = "write" if create else "check"
        assert str(info.value) == (
            f"cannot {verb} {missing}: the bucket '{missing.bucket}' does not exist at {s3.endpoint_url}"
        )
    with pytest.raises(ObjectStoreError):
        store.publish(missing, "output", lambda identity: None).__enter__()
    with pytest.raises(ObjectStoreError):
        store.write_json(missing, {}, "summary")
    # SeaweedFS makes a bucket on a first upload to it (AWS refuses): the check came first.
    assert store.identity(S3Path(missing.bucket, "x")) is None
    assert not any(i.path == missing.bucket for i in s3.filesystem().get_file_info(_buckets()))


def _buckets() -> object:
    from pyarrow import fs

    return fs.FileSelector("", recursive=False)


# --- every way a request fails: the message, the fault, the exit code (2; 74 when unanswered), no credential ---


def test_a_missing_bucket_is_named(s3: SeaweedS3, store: S3Store) -> None:
    loc = S3Path("no-such-bucket", "in/a.parquet")
    expected = f"cannot read {loc}: the bucket 'no-such-bucket' does not exist at {s3.endpoint_url}"
    for call in (lambda: store.stat(loc), lambda: store.open(loc), lambda: store.expand(str(loc), Path())):
        with pytest.raises(ObjectStoreError) as info:
            call()
        assert str(info.value) == expected
        assert info.value.fault is StoreFault.NO_BUCKET and info.value.exit_code == 2
    with pytest.raises(ObjectStoreError) as listing:
        store.expand("s3://no-such-bucket/in/*.parquet", Path())
    assert str(listing.value) == (
        f"cannot list s3://no-such-bucket/in: the bucket 'no-such-bucket' does not exist at {s3.endpoint_url}"
    )


def test_a_missing_object_is_named(bucket: str, store: S3Store) -> None:
    loc = S3Path(bucket, "in/missing.parquet")
    for call in (lambda: store.stat(loc), lambda: store.open(loc)):
        with pytest.raises(ObjectStoreError) as info:
            call()
        assert str(info.value) == f"cannot read {loc}: no such object"
        assert info.value.fault is StoreFault.NO_OBJECT and info.value.exit_code == 2


def test_no_credentials_says_where_they_are_looked_for(
    s3: SeaweedS3, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    put(s3, S3Path(bucket, "in/a.parquet"), b"x")
    isolate_aws_env(monkeypatch, tmp_path)
    store = store_at(s3.endpoint_url)
    loc = S3Path(bucket, "in/a.parquet")
    with pytest.raises(ObjectStoreError) as info:
        store.stat(loc)
    assert str(info.value) == (
        f"cannot read {loc}: no AWS credentials were found, and {s3.endpoint_url} refused the unsigned request "
        "(ACCESS_DENIED); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE for a profile in "
        "~/.aws/credentials"
    )
    assert info.value.fault is StoreFault.NO_CREDENTIALS and info.value.exit_code == 2


def test_a_wrong_secret_key_is_refused_and_never_printed(
    s3: SeaweedS3, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "canary-secret-8f14e45fceea167a5a36dedd4bea2543"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    store = store_at(s3.endpoint_url)
    loc = S3Path(bucket, "in/a.parquet")
    calls = {
        "read": lambda: store.stat(loc),
        "list": lambda: store.expand(f"s3://{bucket}/in/*.parquet", Path()),
        "write": lambda: store.write_json(S3Path(bucket, "out/x.json"), {}, "summary"),
    }
    for verb, call in calls.items():
        with pytest.raises(ObjectStoreError) as info:
            call()
        text = str(info.value)
        assert info.value.fault is StoreFault.ACCESS_DENIED and info.value.exit_code == 2
        assert f"{s3.endpoint_url} refused the credentials (" in text
        assert text.endswith(
            "check the access key and secret key that the environment or the AWS profile provides, "
            f"and that they may {info.value.operation} in bucket '{bucket}'"
        )
        assert text.startswith(f"cannot {verb} s3://{bucket}/"), text
        assert canary not in text and canary not in repr(info.value)
        assert s3.access_key not in text


def test_an_unreachable_endpoint_is_named(s3: SeaweedS3, bucket: str) -> None:
    [port] = free_port_pairs(1)  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    store = store_at(url)
    loc = S3Path(bucket, "in/a.parquet")
    for call in (lambda: store.stat(loc), lambda: store.ready(loc, create=False)):
        with pytest.raises(ObjectStoreError) as info:
            call()
        text = str(info.value)
        assert info.value.fault is StoreFault.UNREACHABLE and info.value.exit_code == 74
        assert text.startswith(f"cannot {info.value.operation} {loc}: the S3 endpoint {url} did not answer (")
        assert "Could not connect to server" in text
        assert text.endswith("); check storage.endpoint_url and that the store is up, then run the same command")


def test_messages_never_hold_the_environments_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t0ken-value")
    assert s3store.scrub_secrets("body: s3cr3t-value and t0ken-value") == "body: *** and ***"


def test_paths_of_other_stores_are_refused(store: S3Store) -> None:
    with pytest.raises(TypeError, match="takes S3Path locations"):
        store.stat(PurePosixPath("bucket/key"))
    assert json.dumps(str(S3Path("b", "k"))) == '"s3://b/k"'


def test_staging_objects_of_a_crashed_publish_are_cleared_once_stale(s3: SeaweedS3, bucket: str, store: S3Store) -> None:
    """A writer killed between its staged upload and the copy leaves ``.NAME.tmp-*``: the next
    run removes it once it is older than a live writer could leave one, and nothing else."""
    out = S3Path(bucket, "run/answers.parquet")
    publish_bytes(store, out, b"the output")
    with s3.filesystem().open_output_stream(f"{bucket}/run/.answers.parquet.tmp-123-abcd") as f:
        f.write(b"half of a crashed run's upload")
    with s3.filesystem().open_output_stream(f"{bucket}/run/.other.parquet.tmp-1-x") as f:
        f.write(b"another output's")
    store.clear_leftovers(out)  # fresh: could be a live writer's
    assert ".answers.parquet.tmp-123-abcd" in [p.name for p in store.leftovers(out)]
    store.clear_leftovers(out, older_than_s=0)
    assert store.leftovers(out) == []
    assert keys(s3, bucket) == ["run/.other.parquet.tmp-1-x", "run/answers.parquet"]


def test_a_store_that_stops_answering_mid_read_is_exit_74_not_a_damaged_file(
    private_s3: SeaweedS3, tmp_path: Path
) -> None:
    """The input's store killed between two row groups: the read fails, and the store (not the
    object) is blamed: ``StoreUnreachableError``, exit 74, naming the object and the endpoint."""
    server = private_s3
    bucket = server.make_bucket("input")
    local = tmp_path / "big.parquet"
    pq.write_table(big_table(), local, row_group_size=50_000)
    loc = S3Path(bucket, "in/big.parquet")
    put(server, loc, local.read_bytes())
    store = store_at(server.endpoint_url)
    pf = source._open_parquet(store, loc)
    pf.read_row_group(0, columns=["id"])
    server.kill()
    with pytest.raises(OSError) as raised:
        pf.read_row_group(5, columns=["id"])
    pf.close()
    failure = store.read_failure(raised.value, loc)
    assert isinstance(failure, StoreUnreachableError) and failure.exit_code == 74
    assert str(failure).startswith(f"cannot read {loc}: the S3 endpoint {server.endpoint_url} did not answer")
    # A read that fails on the object's own bytes is not the store's.
    assert store.read_failure(pa.ArrowInvalid("Parquet magic bytes not found"), loc) is None
