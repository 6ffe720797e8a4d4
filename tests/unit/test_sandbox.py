"""The sandbox, with real subprocesses: verdicts, limits, and hostile programs that must be contained.

Each hostile behaviour is tried twice where it matters: the plain way (stopped by the in-process
guard) and through ctypes, which bypasses that guard and so shows the kernel-level layer holding.
The ctypes variants run only where `probe()` reports that layer (Linux, root or user namespaces).
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanoternary.evals.sandbox import Limits, Outcome, probe, run_program

LIMITS = Limits(timeout_s=1.0)
NONE_CALLED = "TypeError: 'NoneType' object is not callable"


def run(program: str, limits: Limits = LIMITS) -> Outcome:
    return run_program(textwrap.dedent(program).lstrip("\n"), limits)


@pytest.fixture(scope="module")
def layers() -> dict[str, str]:
    return probe(LIMITS)


@pytest.fixture
def contained(layers: dict[str, str]) -> None:
    if not layers["filesystem"].startswith("read-only"):
        pytest.skip(f"no namespaces here: {layers}")


@pytest.fixture
def dropped(layers: dict[str, str]) -> None:
    if layers["user"] != "dropped to an unprivileged uid":
        pytest.skip(f"runs only where a root host drops to the sandbox uid: {layers}")


def processes_of(uid: int) -> list[str]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:  # exited while we looked
            continue
        if int(fields["Uid"].split()[0]) == uid:
            found.append(status.parent.name)
    return found


def assert_no_process_left(uid: int) -> None:
    deadline = time.monotonic() + 3
    while processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_of(uid) == []


# --- verdicts ----------------------------------------------------------------------------------


def test_passing_program() -> None:
    outcome = run("assert sum([1, 2]) == 3\n")
    assert (outcome.passed, outcome.result) == (True, "passed")


def test_wrong_return_value_fails_with_the_failing_assert() -> None:
    outcome = run(
        """
        def add(a, b):
            return a - b
        def check(candidate):
            assert candidate(2, 2) == 4
        check(add)
        """
    )
    assert not outcome.passed
    assert outcome.result == "failed: AssertionError: assert candidate(2, 2) == 4 (line 4)"


def test_exception_message_and_line() -> None:
    assert run("x = 1\n{}['missing']\n").result == "failed: KeyError: 'missing' (line 2)"


def test_syntax_error() -> None:
    result = run("def f(:\n    pass\n").result
    assert result.startswith("failed: SyntaxError: ") and result.endswith("(program.py, line 1)")


def test_long_message_is_cut_but_keeps_the_line() -> None:
    assert run("raise ValueError('x' * 1000)\n").result == f"failed: ValueError: {'x' * 237}... (line 1)"


def test_exiting_is_not_passing() -> None:
    assert run("import sys\nsys.exit(0)\n").result == "failed: SystemExit: 0 (line 2)"
    assert run("import os\nos._exit(0)\n").result == "failed: exited with status 0 before check() finished"


def test_death_by_signal_is_named() -> None:
    assert run("import ctypes\nctypes.string_at(0)\n").result == "failed: killed by SIGSEGV"


def test_stdin_is_closed() -> None:
    assert run("input()\n").result == "failed: EOFError: EOF when reading a line (line 1)"


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOTERNARY_TEST_SECRET", "hunter2")
    result = run("import os\nraise RuntimeError(sorted(os.environ))\n").result
    assert result == "failed: RuntimeError: ['HOME', 'LC_ALL', 'PATH', 'TMPDIR'] (line 2)"


def test_each_run_gets_a_fresh_writable_work_dir() -> None:
    assert run("open('marker', 'w').write('x')\nassert open('marker').read() == 'x'\n").passed
    assert run("import os\nassert not os.path.exists('marker')\n").passed


def test_probe_names_the_layers(layers: dict[str, str]) -> None:
    assert set(layers) == {"network", "processes", "filesystem", "user"}


def test_probe_refuses_a_sandbox_that_cannot_run_anything() -> None:
    with pytest.raises(
        RuntimeError, match=r"^the sandbox cannot run a trivial program: failed: sandbox error"
    ):
        probe(Limits(memory_mb=8))


# --- hostile programs ----------------------------------------------------------------------------


def test_infinite_loop_times_out() -> None:
    started = time.monotonic()
    assert run("while True:\n    pass\n").result == "timed out"
    assert time.monotonic() - started < LIMITS.timeout_s + 3


def test_sleeping_forever_hits_the_wall_clock_timeout() -> None:
    started = time.monotonic()
    assert run("import time\ntime.sleep(60)\n").result == "timed out"
    assert time.monotonic() - started < LIMITS.timeout_s + 3


def test_fork_bomb_plain_is_stopped_in_process() -> None:
    assert run("import os\nwhile True:\n    os.fork()\n").result == f"failed: {NONE_CALLED} (line 3)"


def test_fork_bomb_through_ctypes_is_capped_and_reaped(dropped: None) -> None:
    result = run(
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        forked = 0
        while True:
            pid = libc.fork()
            if pid == 0:
                libc.pause()
            if pid < 0:
                raise RuntimeError(f"forked {forked}, errno {ctypes.get_errno()}")
            forked += 1
        """
    ).result
    assert result == f"failed: RuntimeError: forked {LIMITS.max_processes - 1}, errno 11 (line 9)"  # EAGAIN
    assert_no_process_left(LIMITS.uid)


def test_spinning_fork_bomb_times_out_and_leaves_nothing(dropped: None) -> None:
    assert (
        run("import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n").result == "timed out"
    )
    assert_no_process_left(LIMITS.uid)


def test_allocating_10_gb_fails() -> None:
    assert run("data = bytearray(10 * 1024**3)\n").result == (
        "failed: MemoryError: data = bytearray(10 * 1024**3) (line 1)"
    )


def test_writing_a_1_gb_file_stops_at_the_size_limit() -> None:
    result = run(
        """
        chunk = b'x' * 2**20
        with open('big.bin', 'wb') as f:
            for _ in range(1024):
                f.write(chunk)
        """
    ).result
    assert result == "failed: OSError: [Errno 27] File too large (line 4)"


@pytest.mark.parametrize(
    ("how", "line"),
    [
        ("import os\nos.remove(SENTINEL)\n", 2),
        ("import os, shutil\nshutil.rmtree(os.path.dirname(SENTINEL))\n", 2),
        ("import os\nos.system('rm -rf ' + os.path.dirname(SENTINEL))\n", 2),
    ],
)
def test_deleting_files_outside_the_work_dir_plainly(tmp_path: Path, how: str, line: int) -> None:
    sentinel = tmp_path / "keep" / "sentinel.txt"
    sentinel.parent.mkdir()
    sentinel.write_text("keep me")
    result = run(f"SENTINEL = {str(sentinel)!r}\n" + how).result
    assert result == f"failed: {NONE_CALLED} (line {line + 1})"
    assert sentinel.read_text() == "keep me"


@pytest.fixture
def open_dir() -> Path:
    """A directory anyone may delete from, so that only the read-only mount can protect it."""
    path = Path(tempfile.mkdtemp(prefix="nanoternary-open-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_deleting_files_through_ctypes_hits_a_read_only_file_system(open_dir: Path, contained: None) -> None:
    sentinel = open_dir / "sentinel.txt"
    sentinel.write_text("keep me")
    sentinel.chmod(0o666)
    result = run(
        f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.unlink({str(sentinel).encode()!r})
        raise RuntimeError(f"unlink {{rc}}, errno {{ctypes.get_errno()}}")
        """
    ).result
    assert result == "failed: RuntimeError: unlink -1, errno 30 (line 4)"  # EROFS
    assert sentinel.read_text() == "keep me"


def test_killing_its_parent_plainly() -> None:
    assert (
        run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n").result
        == f"failed: {NONE_CALLED} (line 2)"
    )


def test_killing_the_host_through_ctypes_reaches_nothing(contained: None) -> None:
    result = run(
        f"""
        import ctypes
        libc = ctypes.CDLL(None)
        tried = [libc.kill({os.getpid()}, 9), libc.kill(-1, 9), libc.kill(libc.getppid(), 9)]
        raise RuntimeError(f"still running after {{tried}}")
        """
    ).result
    # the host's pid does not exist in the program's pid namespace, -1 finds no one to signal, and its
    # parent is outside the namespace (getppid() == 0 signals its own group: itself, pid 1, immune)
    assert result == "failed: RuntimeError: still running after [-1, -1, 0] (line 4)"
    assert run("pass\n").passed  # the host, and its ability to run programs, are fine


@pytest.fixture
def listener() -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


def assert_never_connected(server: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        server.accept()


def test_network_connection_plainly(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n").result
    assert result == f"failed: {NONE_CALLED} (line 2)"
    assert_never_connected(listener)


def test_network_connection_through_ctypes_finds_no_network(listener: socket.socket, contained: None) -> None:
    port = listener.getsockname()[1]
    result = run(
        f"""
        import ctypes, struct
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM
        address = struct.pack('=H', 2) + struct.pack('!H4s8x', {port}, bytes([127, 0, 0, 1]))
        rc = libc.connect(fd, address, len(address))
        raise RuntimeError(f"connect {{rc}}, errno {{ctypes.get_errno()}}")
        """
    ).result
    assert result == "failed: RuntimeError: connect -1, errno 101 (line 6)"  # ENETUNREACH: no interface up
    assert_never_connected(listener)


def test_reading_secrets_finds_none(monkeypatch: pytest.MonkeyPatch, dropped: None) -> None:
    monkeypatch.setenv("NANOTERNARY_TEST_SECRET", "hunter2")  # in this (the host) process's environment
    result = run(
        """
        import glob, os
        found = [k for k, v in os.environ.items() if 'hunter2' in v]
        for path in glob.glob('/proc/*/environ'):
            try:
                found += [path] if b'hunter2' in open(path, 'rb').read() else []
            except OSError:
                pass
        assert found, 'no secret visible'
        """
    ).result
    assert result == "failed: AssertionError: no secret visible (line 8)"


def test_printing_100_mb_costs_the_host_nothing() -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    patient = Limits(timeout_s=10.0)  # building and writing 100 MB takes 0.2-0.8 s on a busy 2-core box
    result = run("print('x' * 100_000_000)\nassert False\n", patient).result
    assert result == "failed: AssertionError: assert False (line 2)"
    assert time.monotonic() - started < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 20_000  # kB


def test_a_hostile_neighbour_does_not_disturb_parallel_programs() -> None:
    bomb = ("import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n", LIMITS)
    patient = Limits(timeout_s=20.0)  # the bomb may hog the CPU; what matters is the verdict
    jobs = [bomb] + [(f"assert {i} * 2 == {2 * i}\n", patient) for i in range(5)]
    with ThreadPoolExecutor(3) as pool:
        results = [o.result for o in pool.map(lambda job: run(*job), jobs)]
    assert results == ["timed out"] + ["passed"] * 5
