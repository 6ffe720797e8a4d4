"""The chat page: served at /, self-contained, and, driven by a real headless Chromium (Debian package
`chromium`; skipped where it is not installed), it sends a message and shows the reply as it streams."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from nanoternary.infer.engine import Engine
from nanoternary.serve.chat_template import ChatTemplate
from nanoternary.serve.launch import ServerProcess
from tests.serve_server import API_KEY, CHAT_STOP, CHAT_TEMPLATE

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def test_page_is_served_and_self_contained(server: ServerProcess) -> None:
    with urllib.request.urlopen(server.url + "/", timeout=30) as response:
        assert response.status == 200 and response.headers["content-type"].startswith("text/html")
        html = response.read().decode("utf-8")
    for control in ('id="temperature"', 'id="max-tokens"', 'id="api-key"', 'id="prompt"'):
        assert control in html
    assert "stream: true" in html and 'fetch("/v1/chat/completions"' in html
    assert not re.search(r"""(src|href)=["']|@import|url\(|https?://""", html), (
        "the page must load nothing else"
    )


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out; NUL-separated JSON),
    so the test needs no websocket library."""

    def __init__(self, user_dir: Path) -> None:
        to_browser, self._send_fd = os.pipe()
        self._recv_fd, from_browser = os.pipe()
        remap = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}'
        self.proc = subprocess.Popen(
            ["bash", "-c", remap, CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", "--remote-debugging-pipe"],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id = b"", 0
        self.session: str | None = None

    def call(self, method: str, timeout_s: float = 60, **params: Any) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._recv_fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self._recv_fd, 1 << 16) if ready else b""
            if not chunk:
                raise TimeoutError("no answer from Chromium")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open_page(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && document.getElementById('model').textContent")

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (value := self.js(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout_s} s: {expression}")
            time.sleep(0.1)
        return value

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        os.close(self._send_fd)
        os.close(self._recv_fd)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    tools = DevTools(tmp_path / "chromium-profile")
    yield tools
    tools.close()


def test_browser_sends_a_message_and_sees_a_streamed_reply(
    server: ServerProcess, tiny_model: Path, browser: DevTools
) -> None:
    browser.open_page(server.url + "/")
    assert "model · 73,920 parameters · context 128" in browser.js(
        "document.getElementById('model').textContent"
    )
    browser.js(f"""
        document.getElementById('api-key').value = {json.dumps(API_KEY)};
        document.getElementById('temperature').value = '0';
        document.getElementById('max-tokens').value = '24';
        document.getElementById('prompt').value = 'hello, who are you?';
        document.getElementById('form').requestSubmit();
    """)
    state = browser.wait_for(
        "document.querySelector('.msg.assistant:not([data-state=streaming])')?.dataset.state"
    )
    assert state == "done"
    shown = browser.js("""(() => { const m = document.querySelector('.msg.assistant');
                                   return [m.textContent, Number(m.dataset.chunks), m.dataset.finish]; })()""")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        prompt = ChatTemplate(CHAT_TEMPLATE, "test").render(
            [{"role": "user", "content": "hello, who are you?"}]
        )
        ref = Engine.from_path(tiny_model).generate([prompt], max_tokens=24, stop=CHAT_STOP)[0]
    finally:
        torch.set_num_threads(threads)
    assert shown == [ref.text, shown[1], ref.finish_reason]
    assert shown[1] > 1, "the reply should arrive in several chunks"
    assert browser.js("document.querySelector('.msg.user').textContent") == "hello, who are you?"
