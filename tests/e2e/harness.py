"""End-to-end harness: a real `moeserve serve` (uvicorn) subprocess on a free port, serving a demo model.

`start_server` launches the process and waits for /health to answer 200; `stop_server` sends SIGTERM, waits,
and asserts a clean exit (status 0) and that the process is gone. Each test module starts one server
(module-scoped fixture) and stops it at teardown.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from engine.config import ENV_PREFIX

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 60


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    log_path: Path

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics by name (with labels: ``'moeserve:request_success_total{finished_reason="stop"}'``)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        pattern = r"^([a-z_:]+(?:\{[^}]*\})?) ([-+0-9.eEinf]+)$"
        return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> Server:
    """Run ``python <argv...> --port P`` (a serve command line) and wait until /health is 200."""
    port = free_port()
    clean_env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    log = log_path.open("w")
    process = subprocess.Popen([sys.executable, *argv, "--port", str(port)], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT, env={**clean_env, **(env or {})})
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode} during startup:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    pytest.fail(f"server not healthy within {STARTUP_TIMEOUT_S} s:\n{server.log()}")


def stop_server(server: Server) -> None:
    """SIGTERM the server; it must exit 0 within the timeout and be gone afterwards."""
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        returncode = process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"server ignored SIGTERM for {SHUTDOWN_TIMEOUT_S} s:\n{server.log()}")
    assert returncode == 0, f"server exited with {returncode}:\n{server.log()}"
    assert not _pid_alive(process.pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def serve_argv(model_dir: Path, *flags: str, max_model_len: int = 2048) -> list[str]:
    return ["-m", "server.cli", "serve", str(model_dir), "--max-model-len", str(max_model_len), *flags]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
