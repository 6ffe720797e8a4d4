"""The serve tests' shared model and server: one of each per test session.

Fixtures here, not imported into each module, so pytest shares them across modules, and a server that
fails to start fails every test that needs it at once instead of being started again for each.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nanoternary.infer.kernels import native_ops
from nanoternary.serve.launch import ServerProcess
from tests.serve_server import API_KEY, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    native_ops()  # built here, under the test timeout, not inside a server's first start
    return build_tiny_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="session")
def server(tiny_model: Path) -> Iterator[ServerProcess]:
    """The shared server: default limits, API key API_KEY."""
    proc = ServerProcess(tiny_model, "threads=1", f"api_key={API_KEY}")
    yield proc
    proc.stop()
