"""`seed_core.program.run`: a stage script ends with what the end of a program must do (threads,
exit handlers, flushed output, the exit status) and without the interpreter's teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from seed_core import program
from seed_core.program import exit_status

ROOT = Path(__file__).resolve().parent.parent


def run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """A script whose `main` is `body`, ended by `program.run(main)`, run as a program."""
    script = tmp_path / "script.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                      f"from seed_core import program\n\n"
                      f"def main():\n{textwrap.indent(textwrap.dedent(body), '    ')}\n\n"
                      f"program.run(main)\n")
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("code,status,printed", [
    (None, 0, ""), (0, 0, ""), (3, 3, ""), ("no teacher: set teacher.checkpoint", 1,
                                            "no teacher: set teacher.checkpoint\n")])
def test_exit_status_is_the_interpreters(code, status, printed, capsys) -> None:
    assert exit_status(code) == status
    assert capsys.readouterr().err == printed


@pytest.mark.parametrize("ending,status,stderr", [
    ("return None", 0, ""), ("return 2", 2, ""), ("raise SystemExit(75)", 75, ""),
    ("raise SystemExit('bad params.yaml: key distill.lr')", 1,
     "bad params.yaml: key distill.lr\n")])
def test_the_status_and_message_are_the_programs(tmp_path: Path, ending: str, status: int,
                                                 stderr: str) -> None:
    done = run_script(tmp_path, f"print('unflushed', end='')\n{ending}")
    assert done.returncode == status
    assert done.stdout == "unflushed"  # stdout is a pipe here: block-buffered, flushed at the end
    assert done.stderr == stderr


def test_an_uncaught_error_keeps_its_traceback(tmp_path: Path) -> None:
    done = run_script(tmp_path, "raise ValueError('a bug')")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ValueError: a bug" in done.stderr


def test_threads_exit_handlers_and_log_files_finish(tmp_path: Path) -> None:
    done = run_script(tmp_path, """
        import atexit, logging, threading, time
        from pathlib import Path
        handler = logging.FileHandler('stage.log', delay=False)
        logging.getLogger('stage').addHandler(handler)
        logging.getLogger('stage').warning('written at the end')
        atexit.register(lambda: Path('atexit.txt').write_text('ran'))
        def late():
            time.sleep(0.5)
            Path('thread.txt').write_text('joined')
        threading.Thread(target=late).start()
    """)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "thread.txt").read_text() == "joined"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "stage.log").read_text() == "written at the end\n"


def test_daemonic_children_are_ended_not_orphaned(tmp_path: Path) -> None:
    """A DataLoader's workers are daemonic processes: multiprocessing's exit handler ends them.
    Skipping the handlers with the teardown would leave them running."""
    done = run_script(tmp_path, """
        import multiprocessing, time
        from pathlib import Path
        child = multiprocessing.get_context('fork').Process(target=time.sleep, args=(120,),
                                                            daemon=True)
        child.start()
        Path('child.pid').write_text(str(child.pid))
    """)
    assert done.returncode == 0, done.stderr
    pid = int((tmp_path / "child.pid").read_text())
    deadline = time.time() + 10
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has ended; /proc says so where it exists
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_every_stage_script_ends_through_program_run() -> None:
    scripts = sorted((ROOT / "stages").glob("*.py"))
    assert scripts
    for script in scripts:
        assert script.read_text().rstrip().endswith(
            'if __name__ == "__main__":\n    program.run(main)'), script


def test_start_ticks_reads_past_a_process_name_with_spaces_and_parentheses(tmp_path) -> None:
    odd = tmp_path / "a) 1 2 (b"  # the name /proc/<pid>/stat shows in parentheses
    odd.symlink_to("/bin/sleep")
    child = subprocess.Popen([str(odd), "30"])
    try:
        with open(f"/proc/{child.pid}/stat") as stat:
            assert stat.read().startswith(f"{child.pid} (a) 1 2 (b) ")
        ours, theirs = program.start_ticks(), program.start_ticks(child.pid)
        assert ours == program.start_ticks(os.getpid()) and ours.isdigit()
        assert theirs.isdigit() and int(theirs) >= int(ours)  # started after this process
        # the same clock as the start time a stage records
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME) - int(theirs) / os.sysconf(
            "SC_CLK_TCK")
        assert 0 <= since_boot < 5
    finally:
        child.kill()
        child.wait()
    assert program.start_ticks(child.pid) == ""  # reaped: /proc cannot tell
