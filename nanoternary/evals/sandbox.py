"""Run one untrusted Python program in a throwaway, locked-down process and report how it ended.

The host starts this file as a script: the *supervisor* (`python -I -S`, scrubbed environment, stdin
on /dev/null, a fresh temp working dir, its own session). On Linux the supervisor enters new network,
pid and mount namespaces and makes every mount read-only, nodev and nosuid except the working dir,
then forks the program's process: pid 1 of its namespace, so everything it starts dies with it. That
process mounts its own read-only /proc (the host's processes disappear), sets rlimits (CPU, address
space, processes, file size, no core files), sends stdout/stderr to /dev/null and, on a root host,
drops to an unprivileged uid (RLIMIT_NPROC does not bind root). The standard library is bind-mounted
read-only into the working dir so that an interpreter installed under /root stays importable after
the drop. Destructive os/shutil/subprocess/socket functions are then disabled in-process and the
program is exec'd; the supervisor enforces the wall-clock timeout and reports one JSON line.

Where the kernel refuses namespaces, the network and the file system are protected only by the
in-process guards, which stop ordinary code but not deliberate escapes; `probe()` says which layers
this machine grants. None of this is a security boundary against a determined attacker.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_PROGRAM_NAME = "program.py"
_STDLIB_ALIAS = ".stdlib"  # where the standard library is bind-mounted inside the working dir
_RESULT_CAP = 64 * 1024  # bytes of the child's report kept; anything beyond is read and dropped
_GRACE_S = 10.0  # the host's backstop over the supervisor's own timeout (interpreter start-up included)

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 1 << 18
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 1, 2, 4
_AT_FDCWD, _AT_RECURSIVE, _SYS_MOUNT_SETATTR = -100, 0x8000, 442  # 442 on x86_64 and the generic table
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_LINUX = sys.platform.startswith("linux")


@dataclass(frozen=True)
class Limits:
    """Per-program limits; `uid` is the unprivileged user a root host drops to."""

    timeout_s: float = 3.0
    memory_mb: int = 1024
    max_processes: int = 64
    max_file_mb: int = 16
    uid: int = 65534


@dataclass(frozen=True)
class Outcome:
    """How one program ended: `status` is "passed", "failed" or "timed out"; a failure names its
    `error` (exception type, or how the process died) and a `detail`."""

    status: str
    error: str = ""
    detail: str = ""
    isolation: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def result(self) -> str:
        """ "passed", "timed out" or "failed: <error>[: <detail>]" (the error never holds a colon)."""
        if self.status != "failed":
            return self.status
        return f"failed: {self.error}: {self.detail}" if self.detail else f"failed: {self.error}"


DEFAULT_LIMITS = Limits()


def run_program(program: str, limits: Limits = DEFAULT_LIMITS) -> Outcome:
    """Run `program` under `limits` in a fresh supervisor process; never raises for anything the
    program does."""
    with tempfile.TemporaryDirectory(prefix="nanoternary-sandbox-", ignore_cleanup_errors=True) as workdir:
        path = Path(workdir) / _PROGRAM_NAME
        path.write_text(program)
        spec = json.dumps({"program": str(path), **asdict(limits)})
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", str(Path(__file__).resolve()), spec],
            cwd=workdir,
            env={
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": workdir,
                "TMPDIR": workdir,
                "LC_ALL": "C.UTF-8",
            },
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=limits.timeout_s + _GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome("timed out")
    try:
        report = json.loads(out)
    except ValueError:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return Outcome("failed", "sandbox error", tail[0][:300])
    return Outcome(report["status"], report.get("error", ""), report.get("detail", ""), report["isolation"])


def probe(limits: Limits = DEFAULT_LIMITS) -> dict[str, str]:
    """Which protection layers this machine grants (network, processes, filesystem, user); raises
    if the sandbox cannot run even a trivial program, which would otherwise score as all-failed."""
    outcome = run_program("pass\n", limits)
    if not outcome.passed:
        raise RuntimeError(f"the sandbox cannot run a trivial program: {outcome.result}")
    return outcome.isolation


# --- everything below runs in the supervisor or the program's process, never in the host ---------


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int) -> None:
    args = [None if s is None else s.encode() for s in (source, target, fstype)]
    _check(libc.mount(*args, ctypes.c_ulong(flags), None), f"mount {target}")


def _mount_setattr(libc: ctypes.CDLL, path: str, flags: int, attr: _MountAttr) -> None:
    _check(
        libc.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(_AT_FDCWD),
            path.encode(),
            ctypes.c_uint(flags),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        f"mount_setattr {path}",
    )


def _isolate(libc: ctypes.CDLL, workdir: str) -> dict[str, str]:
    """Enter new network, pid and mount namespaces; make every mount but `workdir` read-only."""
    uid, gid = os.geteuid(), os.getegid()
    layers = {
        "network": "in-process guard only",
        "processes": "own session",
        "filesystem": "in-process guard only",
        "user": "root" if uid == 0 else f"uid {uid}",
    }
    if not _LINUX:
        return layers
    flags = _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWNS | (0 if uid == 0 else _CLONE_NEWUSER)
    try:
        _check(libc.unshare(flags), "unshare")
    except OSError as exc:
        layers["network"] += f" (no namespaces: {exc.strerror})"
        return layers
    if uid != 0:  # unprivileged: be root inside a user namespace mapped onto ourselves
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            Path(f"/proc/self/{name}").write_text(text)
    layers.update(network="namespace, no interfaces up", processes="pid namespace, killed as a whole")
    stdlib, alias = os.path.dirname(os.__file__), os.path.join(workdir, _STDLIB_ALIAS)
    try:
        _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
        _mount(libc, workdir, workdir, None, _MS_BIND | _MS_REC)
        os.mkdir(alias)
        _mount(libc, stdlib, alias, None, _MS_BIND | _MS_REC)
        locked = _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
        _mount_setattr(libc, "/", _AT_RECURSIVE, _MountAttr(attr_set=locked))
        _mount_setattr(libc, workdir, 0, _MountAttr(attr_clr=_MOUNT_ATTR_RDONLY))
        os.chdir(workdir)  # the old cwd still points below the new, writable mount
    except OSError as exc:
        layers["filesystem"] += f" ({exc.strerror})"
    else:
        layers["filesystem"] = "read-only, nodev, nosuid except the work dir"
        if uid == 0:
            layers["user"] = "dropped to an unprivileged uid"
    return layers


def _drop_privileges(uid: int, workdir: str) -> None:
    """Become `uid` (RLIMIT_NPROC applies, no host file or process is ours), importing the standard
    library from its read-only bind mount in `workdir` since its real path may be unreadable."""
    stdlib, alias = os.path.dirname(os.__file__), os.path.join(workdir, _STDLIB_ALIAS)

    def moved(path: str) -> str:
        return alias + path[len(stdlib) :] if path.startswith(stdlib) else path

    sys.path[:] = [moved(p) for p in sys.path]
    for module in list(sys.modules.values()):
        if isinstance(getattr(module, "__path__", None), list):
            module.__path__[:] = [moved(p) for p in module.__path__]
    sys.path_importer_cache.clear()
    os.chown(workdir, uid, uid)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _set_limits(spec: dict) -> None:
    cpu = math.ceil(spec["timeout_s"]) + 1
    for which, value in (
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, spec["memory_mb"] << 20),
        (resource.RLIMIT_FSIZE, spec["max_file_mb"] << 20),
        (resource.RLIMIT_NPROC, spec["max_processes"]),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


def _disable_destructive() -> None:
    """Make ordinary code fail loudly instead of touching the host: a guard against accidents."""
    import builtins
    import shutil
    import socket

    disabled = {
        os: """kill killpg system popen fork forkpty execv execve execl execle execlp execlpe execvp execvpe
            spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp remove
            unlink rmdir removedirs rename renames replace truncate chmod fchmod lchmod chown fchown lchown
            chroot chdir fchdir link symlink putenv unsetenv setuid setgid setresuid setresgid setsid setpgid""",
        shutil: "rmtree move chown",
        subprocess: "Popen run call check_call check_output getoutput getstatusoutput",
        socket: "socket socketpair create_connection create_server fromfd",
        builtins: "exit quit help",
    }
    for module, names in disabled.items():
        for name in names.split():
            if hasattr(module, name):
                setattr(module, name, None)
    for name in ("multiprocessing", "concurrent.futures.process", "resource", "pty"):
        sys.modules[name] = None  # type: ignore[assignment]


def _describe(exc: BaseException, source: str) -> dict[str, str]:
    """Exception type, plus its message (or, for a bare `assert`, the failing line) and line number."""
    try:
        message = " ".join(str(exc).split())
    except Exception:  # noqa: BLE001 - a hostile __str__ must not hide the failure
        message = ""
    tb, lineno = exc.__traceback__, 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _PROGRAM_NAME:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    lines = source.splitlines()
    if not message and 0 < lineno <= len(lines):
        message = lines[lineno - 1].strip()
    message = message if len(message) <= 240 else message[:237] + "..."
    return {
        "status": "failed",
        "error": type(exc).__name__,
        "detail": f"{message} (line {lineno})" if lineno else message,
    }


def _run_child(source: str, report_fd: int, devnull: int, spec: dict, isolation: dict[str, str]) -> None:
    """The program's process: lock down, run, report on `report_fd`, exit. Never returns."""
    libc = ctypes.CDLL(None, use_errno=True)
    if _LINUX:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setsid()
    contained = isolation["filesystem"].startswith("read-only")
    if contained:
        _mount(libc, "proc", "/proc", "proc", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _set_limits(spec)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if contained and os.geteuid() == 0:
        _drop_privileges(spec["uid"], os.getcwd())
    _disable_destructive()
    if _LINUX:
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a uid change clears it
    sys.argv = [_PROGRAM_NAME]
    try:
        exec(compile(source, _PROGRAM_NAME, "exec"), {"__name__": "__main__"})  # noqa: S102 - the point
    except BaseException as exc:  # noqa: BLE001 - SystemExit too: exiting is not passing check()
        report = _describe(exc, source)
    else:
        report = {"status": "passed"}
    os.write(report_fd, json.dumps(report).encode())
    os._exit(0)


def _read_some(fd: int, buffer: bytearray) -> bool:
    """Read what is available into `buffer` (up to the cap); False at end of file."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        buffer += chunk[: max(0, _RESULT_CAP - len(buffer))]


def _verdict(status: int, usage: resource.struct_rusage, report: bytes, cpu_limit: int) -> dict[str, str]:
    try:
        return json.loads(report)
    except ValueError:
        pass
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGKILL, signal.SIGXCPU) and usage.ru_utime + usage.ru_stime >= cpu_limit - 0.5:
            return {"status": "timed out"}
        return {"status": "failed", "error": f"killed by {signal.Signals(sig).name}"}
    return {
        "status": "failed",
        "error": f"exited with status {os.WEXITSTATUS(status)} before check() finished",
    }


def _supervise(spec: dict) -> dict:
    """Isolate, fork the program's process, enforce the wall-clock timeout, return the verdict."""
    program = Path(spec["program"])
    source = program.read_text()
    devnull = os.open(os.devnull, os.O_WRONLY)  # before nodev mounts make it unopenable
    isolation = _isolate(ctypes.CDLL(None, use_errno=True), str(program.parent))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _run_child(source, write_fd, devnull, spec, isolation)
        except BaseException as exc:  # noqa: BLE001 - set-up failed before the program ran
            os.write(
                write_fd,
                json.dumps({"status": "failed", "error": "sandbox error", "detail": repr(exc)}).encode(),
            )
        finally:
            os._exit(70)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    deadline, report, open_ = time.monotonic() + spec["timeout_s"], bytearray(), True
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.wait4(pid, 0)
            return {"status": "timed out", "isolation": isolation}
        ready, _, _ = select.select([read_fd] if open_ else [], [], [], min(left, 0.05 if open_ else 0.005))
        if ready:
            open_ = _read_some(read_fd, report)
    _read_some(read_fd, report)
    return {
        **_verdict(status, usage, bytes(report), math.ceil(spec["timeout_s"]) + 1),
        "isolation": isolation,
    }


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_supervise(json.loads(sys.argv[1]))))
