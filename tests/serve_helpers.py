"""A real `vllm serve` subprocess on loopback, for the serving tests: start it,
wait for /health, read /metrics, stop it and its engine processes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

# The `vllm` console script of this environment, as a user runs it.
VLLM_CLI = str(Path(sys.executable).with_name("vllm"))
STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    model: str

    def client(self, timeout: float = 180):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=timeout, max_retries=0)

    def async_client(self, timeout: float = 180):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=timeout, max_retries=0)

    def get(self, path: str, timeout: float = 30) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> str:
        status, text = self.get("/metrics")
        assert status == 200, text[-2000:]
        return text

    def stop(self, timeout: float = 90) -> list[psutil.Process]:
        """terminate, wait, kill; returns the processes of its session still alive."""
        family = session_processes(self.proc.pid)
        with contextlib.suppress(psutil.Error):
            family += psutil.Process(self.proc.pid).children(recursive=True)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        _, alive = psutil.wait_procs(family, timeout=30)
        return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@contextlib.contextmanager
def running_server(model_path: str, log: Path, *extra_args: str, env: dict | None = None) -> Iterator[Server]:
    """`vllm serve MODEL *extra_args` on a free loopback port (float32, eager,
    1 GiB of KV cache), once /health answers; stopped on exit. ``env`` adds
    to the environment."""
    port = free_port()
    cmd = [
        VLLM_CLI, "serve", model_path, *extra_args,
        "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
        "--port", str(port), "--host", "127.0.0.1",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})},
        )
    srv = Server(proc=proc, url=f"http://127.0.0.1:{port}", log=log, model=model_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode} while starting:\n{tail(log)}")
            try:
                with urllib.request.urlopen(f"{srv.url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /health after {STARTUP_TIMEOUT_S} s:\n{tail(log)}")
            time.sleep(2)
        yield srv
    finally:
        srv.stop()


# ------------------------------------------------------------------ /metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric ``name`` (exact name) with its labels."""
    found = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            found.append((dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return found


def sample(text: str, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    values = [v for lab, v in samples(text, name) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(values) == 1, (name, labels, samples(text, name))
    return values[0]


def sample_or_zero(text: str, name: str, **labels: str) -> float:
    """Like `sample`, 0 when the series does not exist yet (a counter that
    has not counted anything)."""
    values = [v for lab, v in samples(text, name) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(values) <= 1, (name, labels, values)
    return values[0] if values else 0.0
