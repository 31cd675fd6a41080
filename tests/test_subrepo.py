"""`reproduce/` is a DVC subrepo: the demo's `dvc dag` and `dvc status` list the demo alone, the
subrepo shares the project's cache and `mlflow.db`, and its code deps are files, which a
`__pycache__` outside the subrepo cannot change (a directory dep there is hashed without any
.dvcignore)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from seed_core.codemap import dvc_code_deps_problems, fix_dvc_code_deps
from seed_core.io import repo_root

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}


def dvc(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} in {cwd}: {done.stderr[-2000:]}"
    return done.stdout


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_reproduce_is_a_subrepo_of_the_project_with_its_cache() -> None:
    demo = dvc("stage", "list", "--name-only", cwd=ROOT).split()
    reproduce = dvc("stage", "list", "--name-only", cwd=ROOT / "reproduce").split()
    assert "report" in demo and not any(s.startswith(("baseline@", "evaluate@")) for s in demo)
    assert "reproduce" in reproduce and any(s.startswith("baseline@") for s in reproduce)
    assert (dvc("cache", "dir", cwd=ROOT / "reproduce").strip()
            == dvc("cache", "dir", cwd=ROOT).strip())
    assert dvc("config", "core.analytics", cwd=ROOT / "reproduce").strip() == "false"
    # every code dep of the subrepo is a file (the check below fails on a directory)
    stages = yaml.safe_load((ROOT / "reproduce" / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for dep in stage["deps"]:
            if dep.startswith("../seed_core") or dep.startswith("../stages"):
                assert dep.endswith(".py"), f"{name}: {dep}"


def test_a_code_directory_in_the_subrepo_is_reported_and_fixed(tmp_path) -> None:
    repo = tmp_path / "repo"
    for part in ("seed_core", "stages"):
        shutil.copytree(ROOT / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "reproduce").mkdir()
    models = sorted(f"      - ../seed_core/models/{p.name}\n"
                    for p in (ROOT / "seed_core" / "models").glob("*.py"))
    text = (ROOT / "reproduce" / "dvc.yaml").read_text()
    assert models[0] in text
    for line in models[1:]:
        text = text.replace(line, "")
    (repo / "reproduce" / "dvc.yaml").write_text(text.replace(models[0],
                                                              "      - ../seed_core/models\n"))
    problems = dvc_code_deps_problems(repo)
    assert any("stage reproduce/dvc.yaml:baseline: its deps list the directory "
               "seed_core/models, which this subrepo hashes with its __pycache__" in p
               for p in problems), problems
    fixed = fix_dvc_code_deps(repo, repo / "reproduce" / "dvc.yaml")
    assert "../seed_core/models\n" not in fixed and models[0] in fixed
    (repo / "reproduce" / "dvc.yaml").write_text(fixed)
    assert dvc_code_deps_problems(repo) == []
    # the demo's own dvc.yaml keeps its package directories (its .dvcignore applies there)
    assert "      - seed_core/models\n" in fix_dvc_code_deps(repo, repo / "dvc.yaml")


def test_a_subrepo_stage_sees_the_project_and_only_file_deps_survive_pycache(tmp_path) -> None:
    """What the layout relies on, through dvc itself: the project's `dvc status` does not list
    the subrepo's stages, a stage there finds the project's root (its `DVC_ROOT` is the
    subrepo), and a `__pycache__` beside a code file changes a directory dep only."""
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg" / "mod.py").write_text("VALUE = 1\n")
    git("init", "-q", cwd=project)
    dvc("init", "-q", cwd=project)
    (project / ".dvcignore").write_text("__pycache__/\n")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"top": {
        "cmd": "echo top > top.txt", "outs": ["top.txt"]}}}))
    sub = project / "sub"
    sub.mkdir()
    dvc("init", "--subdir", "-q", cwd=sub)
    where = (f"{sys.executable} -c \"from seed_core.io import repo_root; "
             f"print(repo_root())\" > root.txt")
    (sub / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "by_directory": {"cmd": "echo d > d.txt", "deps": ["../pkg"], "outs": ["d.txt"]},
        "by_file": {"cmd": where, "deps": ["../pkg/mod.py"], "outs": ["root.txt"]}}}))
    dvc("repro", "-q", cwd=project)
    dvc("repro", "-q", cwd=sub)
    assert (sub / "root.txt").read_text().strip() == str(project.resolve())
    assert "sub" not in dvc("status", cwd=project) and "by_" not in dvc("dag", cwd=project)
    assert "up to date" in dvc("status", cwd=sub)

    (project / "pkg" / "__pycache__").mkdir()
    (project / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\x00compiled")
    status = dvc("status", cwd=sub)
    assert "by_directory" in status and "by_file" not in status
    assert "up to date" in dvc("status", cwd=project)


def test_repo_root_climbs_out_of_a_subrepo_only(tmp_path, monkeypatch) -> None:
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".dvc").mkdir()
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / "sub" / ".dvc").mkdir(parents=True)
    (project / "sub" / "dvc.yaml").write_text("stages: {}\n")
    (project / "plain").mkdir()
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(project / "sub")
    assert repo_root() == project.resolve()
    monkeypatch.chdir(project / "plain")
    assert repo_root() == project.resolve()
    monkeypatch.setenv("DVC_ROOT", str(project / "sub"))
    assert repo_root() == project.resolve()
    # a git checkout of its own (`dvc exp run --temp`) is a root even below a project
    (project / "sub" / ".git").mkdir()
    assert repo_root() == (project / "sub").resolve()
    # a directory with dvc.yaml outside any project stays the root
    lone = tmp_path / "lone"
    (lone / "inner").mkdir(parents=True)
    (lone / "inner" / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("DVC_ROOT", str(lone / "inner"))
    assert repo_root() == (lone / "inner").resolve()
