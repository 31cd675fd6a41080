"""The import graph: each dvc.yaml stage lists exactly the code it runs, the code map
(docs/code-map.md) is current, and dependencies point one way."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from seed_core.codemap import (ImportGraph, code_map, dvc_code_deps_problems, fix_dvc_code_deps,
                               rewrite_readme, stage_scripts)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph(ROOT)


def test_dvc_yaml_lists_exactly_the_code_each_stage_imports() -> None:
    assert dvc_code_deps_problems(ROOT) == []


def test_the_check_fails_when_a_stage_misses_or_adds_a_module(tmp_path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "seed_core", repo / "seed_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "dvc.yaml").read_text()
    (repo / "dvc.yaml").write_text(text.replace("        - seed_core/evaluation/knn.py\n", "", 1)
                                   .replace("      - seed_core/data/fashion_mnist.py\n",
                                            "      - seed_core/data/fashion_mnist.py\n"
                                            "      - seed_core/report/plots.py\n", 1))
    problems = dvc_code_deps_problems(repo)
    assert "stage knn: its deps miss ['seed_core/evaluation/knn.py']" in problems
    assert ("stage fashion_mnist: its deps list ['seed_core/report/plots.py'], which it does not "
            "import") in problems
    # a new import in a module shows up in every stage that runs it
    (repo / "seed_core" / "queue.py").write_text((repo / "seed_core" / "queue.py").read_text()
                                                  + "\nfrom seed_core.report import plots\n")
    (repo / "dvc.yaml").write_text(fix_dvc_code_deps(repo, repo / "dvc.yaml"))
    assert dvc_code_deps_problems(repo) == []
    assert "seed_core/report/plots.py" in (repo / "dvc.yaml").read_text()


def test_each_edit_reruns_only_what_it_can_affect(graph) -> None:
    """Issue 9's three edits, by the import graph (the e2e test runs them through dvc)."""
    users = {name: set().union(*(graph.paths(graph.closure(s)) for s in scripts))
             for name, scripts in stage_scripts(ROOT / "dvc.yaml").items()}

    def affected(path: str) -> set[str]:
        return {name for name, files in users.items() if path in files}

    assert affected("seed_core/report/plots.py") == {"report"}
    assert affected("seed_core/evaluation/knn.py") <= {"knn", "teacher", "report"}
    assert "knn" in affected("seed_core/evaluation/knn.py")
    assert affected("seed_core/train/distill.py") == {"distill"}
    assert affected("seed_core/train/moco.py") == {"pretrain"}


def test_report_is_a_leaf_and_no_module_imports_a_stage(graph) -> None:
    for module, path in graph.files.items():
        imported = graph.direct_imports(path, module if graph.is_package(module)
                                        else module.rpartition(".")[0])
        if not module.startswith("seed_core.report"):
            assert not any(m.startswith("seed_core.report") for m in imported), module
        if module.startswith("seed_core.evaluation"):
            assert not any(m.startswith(("seed_core.train", "seed_core.teachers.verify"))
                           for m in imported), module
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("stages"), (module, node.module)


def test_seed_core_imports_sit_at_the_top_of_modules(graph) -> None:
    """Imports inside functions hide dependencies (and cost time on hot paths)."""
    for module, path in graph.files.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith(
                            "seed_core"):
                        pytest.fail(f"{path}:{inner.lineno}: import of {inner.module} inside "
                                    f"{node.name}()")


def test_lazy_exports_resolve_to_their_modules(graph) -> None:
    import importlib

    for package in ("seed_core.data", "seed_core.evaluation"):
        for name, module in graph.lazy_exports(package).items():
            assert getattr(importlib.import_module(package), name) is getattr(
                importlib.import_module(module), name)
    # the contract names
    from seed_core.data import open_shards, steps_per_epoch, train_loader  # noqa: F401
    from seed_core.evaluation import knn_classify  # noqa: F401
    from seed_core.losses import seed_loss  # noqa: F401


def test_readme_code_map_is_generated_from_the_graph() -> None:
    table = code_map(ROOT)
    row = next(line for line in table.splitlines() if line.startswith("| `seed_core/report/` |"))
    assert row.endswith("| report, reproduce:reproduce |")
    readme = (ROOT / "docs" / "code-map.md").read_text()
    assert rewrite_readme(readme, table) == readme, \
        "docs/code-map.md is stale: run python -m seed_core.codemap --readme docs/code-map.md"
    done = subprocess.run([sys.executable, "-m", "seed_core.codemap", "--readme",
                           str(ROOT / "docs" / "code-map.md"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "stages").glob("*.py")))
def test_stages_run_the_seed_core_of_their_own_checkout(tmp_path, script: str) -> None:
    """`dvc exp run --temp` / `--queue` run the stages in a copy of the repository while the
    installed (editable) seed_core points at the original: the copy's code must be what runs."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "stages", copy / "stages")
    shutil.copytree(ROOT / "seed_core", copy / "seed_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "seed_core" / "__init__.py"
    marker = "\nimport sys\nprint('copy of seed_core', file=sys.stderr)\n"
    init.write_text(init.read_text() + marker)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, f"stages/{script}", "--help"], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "copy of seed_core" in done.stderr
