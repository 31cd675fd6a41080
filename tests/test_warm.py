"""`seed_core.warm`: a stage handed to a process forked from a server with torch imported behaves
as `python SCRIPT` would, in real processes (argv, cwd, environment, streams, statuses, signals,
start time), and falls back to a plain start whenever no server can take it."""

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
from pathlib import Path

import pytest

from seed_core import cluster, program, warm

ROOT = Path(__file__).resolve().parent.parent
WARM = str(ROOT / "seed_core" / "warm.py")

# prints what a plain process would show of itself, then exits with argv[1]
REPORT = """\
import json, os, sys, time
before = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "seed_core"))
sys.path.insert(0, os.environ["ROOT"])
from seed_core import program


def own_start():  # this process's own start, from /proc, whatever the environment says
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)


if os.path.exists("sleep"):  # (a variable would ask for another server)
    time.sleep(0.5)
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "file": __file__, "path0": sys.path[1],
                  "pid": os.getpid(), "ppid": os.getppid(), "preloaded": before,
                  "var": os.environ.get("SOME_VAR"), "stdin": sys.stdin.readline(),
                  "started_at": program.process_started_at(), "own_start": own_start(),
                  "umask": os.umask(0), "tty": sys.stdout.isatty()}))
print("to stderr", file=sys.stderr)
code = sys.argv[1]
raise SystemExit(int(code) if code.isdigit() else code)
"""


def proc_start(pid: int) -> float:
    """Process `pid`'s start (Unix time), as `seed_core.program` reads its own."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)


def _kill_servers(directory: str) -> None:
    """End every server whose socket lies in `directory` (they leave on their own when idle)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--serve" in cmdline and any(directory.encode() in part for part in cmdline):
            try:
                os.kill(int(entry.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture()
def env(tmp_path):
    # a short directory of its own: a socket's path may not exceed 107 bytes
    directory = tempfile.mkdtemp(prefix="warm", dir="/tmp")
    values = {**os.environ, "ROOT": str(ROOT), warm.SWITCH_ENV: "1", warm.DIR_ENV: directory,
              warm.IDLE_ENV: "60", "SOME_VAR": "x"}
    values.pop(program.STARTED_AT_ENV, None)
    yield values
    _kill_servers(directory)
    shutil.rmtree(directory, ignore_errors=True)


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "report.py"
    path.write_text(REPORT)
    return path


def _client(env, *args, cwd, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdin", None if "input" in kwargs else subprocess.DEVNULL)
    return subprocess.run([sys.executable, WARM, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120, **kwargs)


def _popen(env, *args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WARM, *args], env=env, cwd=cwd,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_server(env, timeout: float = 90.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = [p for p in Path(env[warm.DIR_ENV]).glob("*.log") if "serving" in p.read_text()]
        if logs:
            return logs[0].with_suffix(".sock")
        time.sleep(0.2)
    raise AssertionError("no warm-start server came up")


def _wait_for_server_count(env, count: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [p for p in Path(env[warm.DIR_ENV]).glob("*.log") if "serving" in p.read_text()]
        if len(live) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} servers came up")


def _start_server(env, tmp_path) -> Path:
    """A first run, which is cold and starts the server; the server's socket."""
    script = _script(tmp_path)
    first = _client(env, script.name, "0", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["preloaded"] == []  # cold: it imported nothing itself
    return _wait_for_server(env)


# ----------------------------------------------------------------------------- pure parts


def test_enabled_only_when_asked():
    assert warm.enabled({warm.SWITCH_ENV: "1"})
    assert warm.enabled({warm.SWITCH_ENV: "on"})
    assert not warm.enabled({warm.SWITCH_ENV: "0"})
    assert not warm.enabled({})


def test_the_key_ignores_what_differs_between_stages_and_nothing_else():
    limits = [(1024, 4096)]
    path = ["/usr/lib/python3.11"]
    base = warm.server_key({"A": "1", "PWD": "/x"}, limits, path, b"code")
    assert warm.server_key({"A": "1", "PWD": "/y", "DVC_STAGE": "knn", "OLDPWD": "/z",
                            program.STARTED_AT_ENV: "1:2"}, limits, path, b"code") == base
    assert warm.server_key({"A": "2", "PWD": "/x"}, limits, path, b"code") != base
    assert warm.server_key({"A": "1", "OMP_NUM_THREADS": "1"}, limits, path, b"code") != base
    assert warm.server_key({"A": "1"}, [(256, 4096)], path, b"code") != base
    assert warm.server_key({"A": "1"}, limits, path + ["/other"], b"code") != base
    assert warm.server_key({"A": "1"}, limits, path, b"new code") != base


def test_the_key_follows_an_install_into_site_packages_but_not_a_project_directory(tmp_path):
    site, project = tmp_path / "site-packages", tmp_path / "project"
    site.mkdir()
    project.mkdir()
    key = warm.server_key({}, [], [str(site), str(project)], b"")
    time.sleep(0.01)
    (project / "dvc.lock").write_text("a stage wrote a file")
    assert warm.server_key({}, [], [str(site), str(project)], b"") == key
    (site / "newpkg").mkdir()
    assert warm.server_key({}, [], [str(site), str(project)], b"") != key


def test_status_of_real_children():
    ended = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert warm.status_of(os.waitpid(ended.pid, 0)[1]) == 3
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    killed.send_signal(signal.SIGTERM)
    assert warm.status_of(os.waitpid(killed.pid, 0)[1]) == -signal.SIGTERM


def test_started_at_belongs_to_the_named_process_only():
    assert program.started_at_of(f"{os.getpid()}:12.5", os.getpid()) == 12.5
    assert program.started_at_of(f"{os.getpid() + 1}:12.5", os.getpid()) is None
    assert program.started_at_of("garbage", os.getpid()) is None
    assert program.started_at_of(None, os.getpid()) is None


def test_cluster_hands_a_one_process_stage_to_the_warm_start(monkeypatch):
    monkeypatch.setenv(warm.SWITCH_ENV, "1")
    assert cluster.local_command(1, ["stages/distill.py", "--x"], "py") == [
        "py", str(Path(warm.__file__).resolve()), "stages/distill.py", "--x"]
    assert cluster.local_command(2, ["stages/distill.py"], "py")[1:3] == [
        "-m", "torch.distributed.run"]
    monkeypatch.setenv(warm.SWITCH_ENV, "0")
    assert cluster.local_command(1, ["stages/distill.py"], "py") == ["py", "stages/distill.py"]


# ----------------------------------------------------------------------------- real processes


def test_without_the_switch_the_client_becomes_the_plain_process(env, tmp_path):
    env[warm.SWITCH_ENV] = "0"
    script = _script(tmp_path)
    client = subprocess.Popen([sys.executable, WARM, script.name, "4"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True)
    out, _ = client.communicate(timeout=60)
    shown = json.loads(out)
    assert client.returncode == 4
    assert shown["pid"] == client.pid  # exec'd, not forked
    assert shown["preloaded"] == []
    assert shown["argv"] == ["report.py", "4"]
    assert not list(Path(env[warm.DIR_ENV]).glob("*.sock"))  # no server started


def test_a_warm_stage_sees_what_a_plain_one_would(env, tmp_path):
    _start_server(env, tmp_path)
    (tmp_path / "sub").mkdir()
    previous = os.umask(0o027)
    try:
        client = _popen(env, "report.py", "5", "--flag", cwd=tmp_path)
    finally:
        os.umask(previous)
    out, err = client.communicate("a line\n", timeout=60)
    assert client.returncode == 5, err
    shown = json.loads(out)
    assert shown["preloaded"] and {m.split(".")[0] for m in shown["preloaded"]} == {"torch"}
    assert shown["pid"] != client.pid and shown["ppid"] != client.pid  # forked by the server
    assert shown["argv"] == ["report.py", "5", "--flag"]
    assert shown["cwd"] == str(tmp_path)
    assert shown["file"] == str(tmp_path / "report.py")
    assert shown["path0"] == str(tmp_path)  # the script's directory (before its ROOT insert)
    assert shown["var"] == "x" and shown["stdin"] == "a line\n"
    assert shown["umask"] == 0o027 and shown["tty"] is False
    assert err == "to stderr\n"


def test_a_warm_stage_starts_when_its_client_started(env, tmp_path):
    _start_server(env, tmp_path)
    (tmp_path / "sleep").touch()
    client = _popen(env, "report.py", "0", cwd=tmp_path)
    time.sleep(0.2)
    client_start = proc_start(client.pid)
    out, err = client.communicate("", timeout=60)
    shown = json.loads(out)
    assert shown["pid"] != client.pid, err
    # the fork came after the client's interpreter start and imports (tens of ms): a stage
    # that reported its own start would be off by that much
    assert shown["own_start"] > client_start + 0.012
    assert abs(shown["started_at"] - client_start) < 0.005


def test_statuses_messages_and_tracebacks_as_python_gives_them(env, tmp_path):
    _start_server(env, tmp_path)
    message = _client(env, "report.py", "no such luck", cwd=tmp_path)
    assert message.returncode == 1 and message.stderr.endswith("no such luck\n")
    (tmp_path / "bad.py").write_text("def f():\n    raise ValueError('boom')\n\n\nf()\n")
    crash = _client(env, "bad.py", cwd=tmp_path)
    assert crash.returncode == 1
    assert crash.stderr.startswith("Traceback (most recent call last):\n")
    assert "ValueError: boom" in crash.stderr and "warm.py" not in crash.stderr
    plain = subprocess.run([sys.executable, "bad.py"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert crash.stderr == plain.stderr
    missing = _client(env, "nothere.py", cwd=tmp_path)
    assert missing.returncode == 2 and "can't open file" in missing.stderr
    module = _client(env, "-m", "json.tool", cwd=tmp_path, input='{"a": 1}')
    assert module.returncode == 0 and json.loads(module.stdout) == {"a": 1}
    log = _wait_for_server(env).with_suffix(".log").read_text()
    assert "bad.py: pid" in log and "-m json.tool: pid" in log  # these ran warm


SLEEPER = """\
import os, signal, sys, time
if sys.argv[1] == "handle":
    signal.signal(signal.SIGTERM, lambda *_: (print("terminated", flush=True), os._exit(7)))
print(os.getpid(), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("signum, handled, status", [
    (signal.SIGTERM, "handle", 7),                   # the stage's own handler ran
    (signal.SIGINT, "plain", -signal.SIGINT),        # KeyboardInterrupt, then killed by SIGINT
    (signal.SIGKILL, "plain", -signal.SIGKILL),      # the client killed: so is its stage
])
def test_signals_to_the_client_reach_the_stage(env, tmp_path, signum, handled, status):
    _start_server(env, tmp_path)
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    client = _popen(env, "sleeper.py", handled, cwd=tmp_path)
    stage = int(client.stdout.readline())
    assert stage != client.pid
    client.send_signal(signum)
    client.wait(timeout=30)
    assert client.returncode == status
    deadline = time.monotonic() + 10
    while Path(f"/proc/{stage}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{stage}").exists()  # gone, not left running on its own
    if signum == signal.SIGTERM:
        assert client.stdout.read() == "terminated\n"
    if signum == signal.SIGINT:
        assert "KeyboardInterrupt" in client.stderr.read()


def test_each_environment_gets_its_own_server(env, tmp_path):
    _start_server(env, tmp_path)
    other = {**env, "OMP_NUM_THREADS": "1"}  # read by torch's import: not the same state
    first = _client(other, "report.py", "0", cwd=tmp_path)
    assert json.loads(first.stdout)["preloaded"] == []  # cold, and it starts a second server
    _wait_for_server_count(env, 2)
    assert json.loads(_client(other, "report.py", "0", cwd=tmp_path).stdout)["preloaded"]


def test_an_idle_server_leaves(env, tmp_path):
    env[warm.IDLE_ENV] = "1"
    socket_path = _start_server(env, tmp_path)
    deadline = time.monotonic() + 20
    while socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not socket_path.exists()
    assert "idle for 1 s: leaving" in socket_path.with_suffix(".log").read_text()


def _refuses(socket_path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(socket_path))
        return False
    except ConnectionRefusedError:
        return True
    finally:
        probe.close()


def test_a_killed_servers_socket_is_replaced(env, tmp_path):
    socket_path = _start_server(env, tmp_path)
    log = socket_path.with_suffix(".log")
    server = int(log.read_text().rsplit("pid ", 1)[1].split(")")[0])
    os.kill(server, signal.SIGKILL)  # no time to remove its socket file
    deadline = time.monotonic() + 10  # its threads end after it: the socket closes with them
    while not _refuses(socket_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert socket_path.exists() and _refuses(socket_path)
    log.unlink()
    cold = _client(env, "report.py", "0", cwd=tmp_path)  # refused: runs here, starts a server
    assert cold.returncode == 0 and json.loads(cold.stdout)["preloaded"] == []
    assert _wait_for_server(env) == socket_path
    warm_again = _client(env, "report.py", "0", cwd=tmp_path)
    assert json.loads(warm_again.stdout)["preloaded"]


def test_a_directory_others_can_write_to_is_not_used(env, tmp_path):
    os.chmod(env[warm.DIR_ENV], 0o777)
    done = _client(env, str(_script(tmp_path)), "0", cwd=tmp_path)
    assert done.returncode == 0
    assert "not private" in done.stderr
    assert not list(Path(env[warm.DIR_ENV]).glob("*.sock"))
