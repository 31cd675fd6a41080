"""Warm start: a stage runs in a process forked from a server that has already imported torch,
timm and MLflow.

Every stage of a pipeline is its own process, and each one spends 1.5 to 4 s importing the
libraries it uses before its work starts (`bench/bench_startup.py`), 18 times in the demo.
`python seed_core/warm.py SCRIPT ARGS` (or `-m MODULE ARGS`; also `python -m seed_core.warm`),
the command of every stage in dvc.yaml, is `python SCRIPT ARGS` unless `SEED_WARM_START=1`
(`make demo`, `make smoke` and `make reproduce` set it). Then it hands the stage to a per-user
server that imported those libraries once: the server forks, and the child takes the client's standard streams, working
directory, environment, umask and CPU set, and runs SCRIPT as `__main__`. The client passes the
signals it gets on to that child and ends with the child's status, or by the signal that killed
it; if the client is killed, so is the child. When no server answers, the client starts one in
the background and execs `python SCRIPT ARGS` itself: the first stage of a run starts cold.

What keeps a forked stage equal to a fresh process:
- the server imports third-party libraries only, and the child drops every `seed_core` module,
  so a stage imports the checkout's code from disk (`dvc exp run --temp` runs a copy);
- a server serves only clients whose import-time state it shares: its socket's name hashes the
  interpreter, `sys.path` and the mtimes of its site-packages (a `pip install` changes them), this
  file, the resource limits and the environment less the variables that differ between the
  stages of one run (the working directory, DVC's, pytest's);
- the server runs no torch operation before it forks (torch's thread pools do not survive a
  fork), and numpy's global generator is reseeded in the child as a fresh process would seed it;
- the imported objects are frozen out of the garbage collector's generations (`gc.freeze`), so a
  stage's full collections cost what a fresh process's would, or less;
- a stage's `started_at` is the client's start (`seed_core.program.STARTED_AT_ENV`), so the
  start-up figures of `metrics/pipeline.json` include the hand-over.
The server leaves after `SEED_WARM_IDLE_S` (120) seconds without a stage. It is not used under
SLURM: a job's ranks start as the batch script says.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run by its path, as dvc.yaml does: this checkout's seed_core, and none of
    # its modules in place of the standard library's (seed_core/queue.py would shadow queue)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import gc
import hashlib
import json
import select
import signal
import socket
import struct
import time
from typing import Mapping, Sequence

from seed_core import program

SWITCH_ENV = "SEED_WARM_START"
DIR_ENV = "SEED_WARM_DIR"  # default: seed-warm-<uid> in $XDG_RUNTIME_DIR, $TMPDIR or /tmp
IDLE_ENV = "SEED_WARM_IDLE_S"
IDLE_S = 120.0
# what every stage process would import itself; a name that does not import is skipped
PRELOAD = ("numpy", "PIL.Image", "yaml", "tqdm", "safetensors.torch", "torch", "torchvision",
           "timm", "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store")
# variables that differ between the stages of one run, and none of which an import reads
VOLATILE_ENV = {"PWD", "OLDPWD", "SHLVL", "_", program.STARTED_AT_ENV}
VOLATILE_PREFIXES = ("DVC_", "PYTEST_")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
LIMITS = tuple(getattr(__import__("resource"), name) for name in (
    "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE",
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_MEMLOCK"))
# messages from the server's side: the stage's pid once it is forked, its status at the end
STARTED, ENDED = b"P", b"S"
STATUS = struct.Struct("!i")
MAX_ADDRESS = 107  # bytes of a Unix socket's path (sun_path less its terminating NUL)
LENGTH = struct.Struct("!I")


# ----------------------------------------------------------------------------- pure parts


def enabled(environ: Mapping[str, str]) -> bool:
    """Whether `SWITCH_ENV` asks for a warm start (and this system can fork and pass fds)."""
    wanted = environ.get(SWITCH_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return wanted and sys.platform == "linux" and hasattr(os, "pidfd_open")


def stable_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment less the variables that differ between the stages of one run."""
    return {name: value for name, value in environ.items()
            if name not in VOLATILE_ENV and not name.startswith(VOLATILE_PREFIXES)}


def server_key(environ: Mapping[str, str], limits: Sequence[Sequence[int]],
               path: Sequence[str], code: bytes) -> str:
    """The name of the server that may run a client with this environment, resource limits,
    `sys.path` (less its first entry, the script's directory) and warm-start code."""
    installed = []
    for entry in path:  # an install or uninstall changes its directory's mtime; a project
        # directory on PYTHONPATH changes with every file a stage writes, and is not preloaded
        if os.path.basename(entry) not in ("site-packages", "dist-packages"):
            installed.append([entry, None])
            continue
        try:
            installed.append([entry, os.stat(entry).st_mtime_ns])
        except OSError:
            installed.append([entry, None])
    state = {"python": [sys.executable, sys.version], "env": sorted(stable_env(environ).items()),
             "limits": [list(limit) for limit in limits], "path": installed,
             "code": hashlib.sha256(code).hexdigest()}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:24]


def status_of(wait_status: int) -> int:
    """A child's `waitpid` status as an exit code, or minus the signal that killed it
    (as `subprocess` gives it)."""
    if os.WIFSIGNALED(wait_status):
        return -os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def socket_dir(environ: Mapping[str, str]) -> str:
    """Where this user's servers keep their sockets, locks and logs."""
    return environ.get(DIR_ENV) or os.path.join(
        environ.get("XDG_RUNTIME_DIR") or environ.get("TMPDIR") or "/tmp",
        f"seed-warm-{os.getuid()}")


# ----------------------------------------------------------------------------- the client


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"] and len(argv) == 2:
        serve(argv[1])
        os._exit(0)
    if not argv or argv[0] in ("-h", "--help") or argv[0] == "-m" and len(argv) < 2:
        print("usage: python seed_core/warm.py SCRIPT [ARGS...] | -m MODULE [ARGS...]\n"
              f"runs it as python would; in a process forked from a server that has imported "
              f"torch, timm and MLflow when {SWITCH_ENV}=1", file=sys.stderr)
        raise SystemExit(2 if not argv or argv[0] == "-m" else 0)
    # `-c`, `-X` and the like: only a script or `-m MODULE` is handed over
    if enabled(os.environ) and (argv[0] == "-m" or not argv[0].startswith("-")):
        status = hand_over(argv)
        if status is not None:
            end_with(status)
    exec_plain(argv)


def exec_plain(command: Sequence[str]) -> None:
    """Become `python COMMAND`: the same process (pid, start time) a plain command would be."""
    os.execv(sys.executable, [sys.executable, *command])


def private_dir(path: str) -> bool:
    """Create `path` for this user only; False if it exists and others may write to it."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.stat(path)
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o077


def current_limits() -> list[tuple[int, int]]:
    import resource

    return [resource.getrlimit(limit) for limit in LIMITS]


def hand_over(command: Sequence[str]) -> int | None:
    """Run `command` in a process the server forks; its status, or None if no server took it
    (a server is then started for the next stage)."""
    started_at = program.process_started_at()
    directory = socket_dir(os.environ)
    if not private_dir(directory):
        print(f"seed_core.warm: {directory} is not private to this user: starting cold "
              f"(set {DIR_ENV} to a directory of your own)", file=sys.stderr)
        return None
    with open(__file__, "rb") as source:
        key = server_key(os.environ, current_limits(), sys.path[1:], source.read())
    address = os.path.join(directory, f"{key}.sock")
    if len(address.encode()) > MAX_ADDRESS:
        print(f"seed_core.warm: {address} is too long for a Unix socket: starting cold "
              f"(set {DIR_ENV} to a shorter directory)", file=sys.stderr)
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(address)
    except OSError:
        conn.close()
        start_server(address)
        return None
    request = {"command": list(command), "env": dict(os.environ), "umask": _umask(),
               "cpus": sorted(os.sched_getaffinity(0)), "started_at": started_at,
               "path": sys.path[1:]}
    fds = [_usable_fd(fd) for fd in (0, 1, 2)] + [os.open(".", os.O_RDONLY | os.O_DIRECTORY)]
    payload = json.dumps(request).encode()
    try:
        socket.send_fds(conn, [LENGTH.pack(len(payload)) + payload], fds)
        pid = _read_message(conn, STARTED)
    except OSError:
        pid = None
    finally:
        for fd in fds[3:] + [fd for fd, std in zip(fds, (0, 1, 2)) if fd != std]:
            os.close(fd)
    if pid is None:  # the server left before forking: run the stage here
        conn.close()
        return None
    return relay(conn)


def relay(conn: socket.socket) -> int:
    """Pass this process's signals to the forked stage until the server sends its status."""
    def forward(signum, _frame):
        try:
            conn.sendall(bytes([signum]))
        except OSError:
            pass
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    status = _read_message(conn, ENDED)
    if status is None:
        print("seed_core.warm: the stage's server ended without its status", file=sys.stderr)
        return 1
    return status


def end_with(status: int) -> None:
    """End this process as the stage ended: with its exit code, or by the signal that killed it."""
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        status = 128 - status
    os._exit(status)


def start_server(address: str) -> None:
    """Start the server for `address` in the background (its own session, reparented to init)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log = address.removesuffix(".sock") + ".log"
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:  # the child: detach, and let its own child be the server
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir(root)  # `-m seed_core.warm` imports this checkout
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.closerange(3, 65536)
        os.execv(sys.executable, [sys.executable, "-m", "seed_core.warm", "--serve", address])
    except BaseException as error:  # noqa: BLE001 - the stage runs cold; say why once
        print(f"seed_core.warm: could not start a server at {address}: {error}", file=sys.stderr)
    finally:
        os._exit(1)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usable_fd(fd: int) -> int:
    """`fd`, or /dev/null in its place if this process has it closed."""
    try:
        os.fstat(fd)
        return fd
    except OSError:
        return os.open(os.devnull, os.O_RDWR)


def _read_message(conn: socket.socket, kind: bytes) -> int | None:
    """The number of the next `kind` message, or None at the end of the connection."""
    wanted = 1 + STATUS.size
    data = b""
    while len(data) < wanted:
        try:
            chunk = conn.recv(wanted - len(data))
        except InterruptedError:
            continue
        except OSError:  # reset: the other side was killed
            return None
        if not chunk:
            return None
        data += chunk
    if data[:1] != kind:
        return None
    return STATUS.unpack(data[1:])[0]


# ----------------------------------------------------------------------------- the server


def serve(address: str) -> None:
    """Import the libraries, then fork a handler for every client until idle."""
    idle_s = float(os.environ.get(IDLE_ENV) or IDLE_S)
    # claimed before the imports: clients that find no socket meanwhile start servers that leave
    lock = _claim(address)
    if lock is None:
        return
    t0 = time.monotonic()
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception as error:  # noqa: BLE001 - a missing or broken library stays cold
            _log(f"{name} not preloaded: {type(error).__name__}: {error}")
    # the imports' 600,000 objects are there for good: out of the collector's sight, a stage's
    # full collections do not walk them (0.3 s each), nor write to their pages, which the
    # forked stages share with this process until one writes
    gc.collect()
    gc.freeze()
    listener = _listen(address)
    inode = os.stat(address).st_ino
    _log(f"serving {address} ({time.monotonic() - t0:.1f} s of imports, pid {os.getpid()})")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    handlers, last_seen = set(), time.monotonic()
    try:
        while not stop:
            for pid in list(handlers):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    handlers.discard(pid)
            if handlers:
                last_seen = time.monotonic()
            elif time.monotonic() - last_seen > idle_s:
                _log(f"idle for {idle_s:.0f} s: leaving")
                break
            try:
                ready, _, _ = select.select([listener], [], [], 1.0)
            except InterruptedError:
                continue
            if not ready:
                continue
            conn, _ = listener.accept()
            uid = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
            if uid != os.getuid():
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the handler and its stage hold neither the socket nor the lock
                try:
                    listener.close()
                    os.close(lock)
                    _handle(conn)
                except BaseException as error:  # noqa: BLE001 - never back into this loop
                    _log(f"handler failed: {error!r}")
                finally:
                    os._exit(1)
            handlers.add(pid)
            conn.close()
            last_seen = time.monotonic()
    finally:
        _unlink_own(address, inode, listener)


def _claim(address: str) -> int | None:
    """A lock that makes this the only server of `address` (held until the process ends), or
    None if another server, live or still importing, holds it."""
    import fcntl

    lock = os.open(address.removesuffix(".sock") + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return None
    return lock


def _listen(address: str) -> socket.socket:
    """A listening socket at `address` (a file there is a dead server's: the lock is ours)."""
    try:
        os.unlink(address)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    return listener


def _unlink_own(address: str, inode: int, listener: socket.socket) -> None:
    """Remove the socket file if it is still this server's (a successor may have replaced it)."""
    try:
        if os.stat(address).st_ino == inode:
            os.unlink(address)
    except OSError:
        pass
    listener.close()


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} seed_core.warm[{os.getpid()}]: {message}",
          file=sys.stderr, flush=True)


def _handle(conn: socket.socket) -> None:
    """One client, in a process forked from the server: fork the stage, pass the client's
    signals on to it, send its status."""
    try:
        request, fds = _read_request(conn)
    except (OSError, ValueError) as error:
        _log(f"bad request: {error}")
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stage = os.fork()
    if stage == 0:
        try:
            conn.close()
            _become_stage(request, fds)  # ends the process itself
        except BaseException as error:  # noqa: BLE001 - before the stage's own code ran
            print(f"seed_core.warm: could not start the stage: {error!r}", file=sys.stderr)
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    _log(f"{' '.join(request['command'][:2])}: pid {stage}")
    ended = os.pidfd_open(stage)
    try:
        conn.sendall(STARTED + STATUS.pack(stage))
        client_gone = False
    except OSError:  # the client is gone already
        client_gone = True
        os.kill(stage, signal.SIGKILL)
    while True:
        watched = [ended] if client_gone else [ended, conn]
        try:
            ready, _, _ = select.select(watched, [], [])
        except InterruptedError:
            continue
        if ended in ready:
            break
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if not data:  # the client was killed: so is its stage, as the plain process would be
            client_gone = True
            os.kill(stage, signal.SIGKILL)
        for signum in data:
            os.kill(stage, signum)
    status = status_of(os.waitpid(stage, 0)[1])
    if not client_gone:
        try:
            conn.sendall(ENDED + STATUS.pack(status))
        except OSError:
            pass
    os._exit(0)


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 4)
    if len(fds) != 4 or len(data) < LENGTH.size:
        raise ValueError(f"expected 4 descriptors and a length, got {len(fds)} and {len(data)} B")
    length = LENGTH.unpack(data[:LENGTH.size])[0]
    payload = data[LENGTH.size:]
    while len(payload) < length:
        chunk = conn.recv(length - len(payload))
        if not chunk:
            raise ValueError("the request ended early")
        payload += chunk
    return json.loads(payload), fds


def _become_stage(request: dict, fds: list[int]) -> None:
    """Turn this forked process into `python COMMAND` as the client would have run it."""
    for std, fd in zip((0, 1, 2), fds[:3]):
        os.dup2(fd, std)
        os.close(fd)
    os.fchdir(fds[3])
    os.close(fds[3])
    os.umask(request["umask"])
    try:
        os.sched_setaffinity(0, request["cpus"])
    except OSError:
        pass
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[program.STARTED_AT_ENV] = f"{os.getpid()}:{request['started_at']}"
    for signum in FORWARDED_SIGNALS + (signal.SIGCHLD,):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    _name_process(request["command"])
    for name in [name for name in sys.modules if name.partition(".")[0] == "seed_core"]:
        del sys.modules[name]
    if "numpy" in sys.modules:  # a fresh process seeds numpy's global generator from the OS
        sys.modules["numpy"].random.seed()
    _run_as_main(request["command"], request["path"])


def _name_process(command: list[str]) -> None:
    """Show the stage's script (or module) as the process's name in `ps` and `top` (its command
    line stays the server's: Linux keeps that in the process's memory)."""
    import ctypes

    name = os.path.basename(command[1] if command[0] == "-m" else command[0])[:15]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _run_as_main(command: list[str], path: list[str]) -> None:
    """Run `SCRIPT ARGS` or `-m MODULE ARGS` as `__main__`, then end as the interpreter would
    (without its teardown: `program.finish`)."""
    import runpy
    import traceback

    try:
        if command[0] == "-m":
            sys.argv = [command[1], *command[2:]]
            sys.path[:] = [os.getcwd(), *path]
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        else:
            _run_script(command, path)
        status = 0
    except SystemExit as stop:
        status = program.exit_status(stop.code)
    except KeyboardInterrupt as interrupt:  # as Python ends: the traceback, then killed by SIGINT
        traceback.print_exception(type(interrupt), interrupt, _stage_frames(interrupt))
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        status = 130
    except BaseException as error:  # noqa: BLE001 - printed as the interpreter prints it
        sys.excepthook(type(error), error, _stage_frames(error))
        status = 1
    program.finish(status)


def _stage_frames(error: BaseException):
    """The traceback of `error` from the stage's own first frame on, without this module's and
    runpy's, which a plain process would not have (set on `error` too: Python prints that one)."""
    tb = error.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename == __file__
                              or "runpy" in os.path.basename(tb.tb_frame.f_code.co_filename)):
        tb = tb.tb_next
    error.__traceback__ = tb
    return tb


def _run_script(command: list[str], path: list[str]) -> None:
    """What `python SCRIPT ARGS` does: argv as given, `__file__` absolute, the script's
    directory first on `sys.path`, the script as the process's `__main__` for good (as the
    multiprocessing children it starts expect)."""
    import importlib.machinery
    import types

    script = os.path.abspath(command[0])
    try:
        with open(script, "rb") as source:
            code = compile(source.read(), script, "exec")
    except OSError as error:  # python's own words and status
        print(f"{sys.executable}: can't open file {script!r}: [Errno {error.errno}] "
              f"{error.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    main_module = types.ModuleType("__main__")
    main_module.__dict__.update(__file__=script, __cached__=None, __package__=None,
                                __spec__=None, __builtins__=__builtins__,
                                __loader__=importlib.machinery.SourceFileLoader("__main__",
                                                                                script))
    sys.argv = list(command)
    sys.path[:] = [os.path.dirname(script), *path]
    sys.modules["__main__"] = main_module
    exec(code, main_module.__dict__)


if __name__ == "__main__":
    main()
