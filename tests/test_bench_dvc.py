"""`bench/bench_dvc.py` on a real two-stage DVC repository: the stages' processes and the
lock-file writes are timed, the rest is DVC's own, and the render says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import render  # noqa: E402  (bench/ is not a package)

from seed_core.smoke import GIT_IDENTITY  # noqa: E402


def two_stage_repo(repo: Path) -> None:
    repo.mkdir()
    env = {**os.environ, **GIT_IDENTITY, "DVC_NO_ANALYTICS": "1"}
    (repo / "dvc.yaml").write_text(textwrap.dedent(f"""\
        stages:
          first:
            cmd: {sys.executable} -c "import time; time.sleep(1); open('a.txt', 'w').write('a')"
            outs: [a.txt]
          second:
            cmd: {sys.executable} -c "open('b.txt', 'w').write(open('a.txt').read() * 2)"
            deps: [a.txt]
            outs: [b.txt]
        """))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "two stages"]):
        subprocess.run(command, cwd=repo, env=env, check=True)


def test_a_real_repro_is_split_into_stages_lock_writes_and_dvc(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    two_stage_repo(repo)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dvc.py"), "--repo",
                           str(repo)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (repo / "b.txt").read_text() == "aa"  # the pipeline really ran
    assert result["stage_commands"] == 2 and result["lock_writes"] == 2
    assert result["lock_lines"] == len((repo / "dvc.lock").read_text().splitlines())
    # the first stage sleeps 1 s inside its process: counted there, not as DVC's
    assert 1.0 <= result["stage_processes_s"] < result["wall_s"]
    assert 0 < result["lock_writes_s"] <= result["dvc_own_s"]
    assert abs(result["wall_s"] - result["stage_processes_s"] - result["dvc_own_s"]) < 0.02
    text = "\n".join(render.dvc_section(result))
    assert f"{result['dvc_own_s']:.1f} s DVC's own" in text
    assert "after each of 2 stages" in text


def test_a_failed_repro_is_an_error_not_a_figure(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    two_stage_repo(repo)
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text().replace(
        "time.sleep(1)", "raise SystemExit(3)"))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dvc.py"), "--repo",
                           str(repo)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stdout == ""
    assert "dvc repro" in done.stderr and "failed" in done.stderr
