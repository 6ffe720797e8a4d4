"""Run `nanoternary-serve` as a child process and wait until it listens: for benchmarks and tests.

The server binds port 0 (a free port the OS picks) and the URL is read from uvicorn's own start-up line
(logged at level info: keep log_level at info or debug), so two servers never race for a port.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

READY = re.compile(r"Uvicorn running on (http://\S+)")


class ServerProcess:
    """`python -m nanoternary.cli.serve model=<model> port=0 <overrides>`; `url` once it is ready."""

    def __init__(self, model: str | Path, *overrides: str, timeout_s: float = 180.0) -> None:
        cmd = [sys.executable, "-m", "nanoternary.cli.serve", f"model={model}", "port=0", *overrides]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout_s) or not self.url:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        """Keep draining the server's output (a full pipe would block it), watching for the URL."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if not self.url and (found := READY.search(line)):
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    def get(self, path: str) -> dict:
        """GET a JSON route without credentials (e.g. /health)."""
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, and the exit status once the server has drained its running requests."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout_s)
        self._reader.join(10)
        return code

    def stop(self) -> None:
        """SIGTERM, or SIGKILL if it has not exited within 30 s."""
        try:
            self.terminate(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def log(self) -> str:
        return "".join(self.lines)
