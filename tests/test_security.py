"""Security by inspection: no code path unpickles a user's file, and the MLflow commands of the
README and docs/*.md serve on the loopback interface only. (Refusing a code-executing checkpoint at
run time is tested in tests/test_checkpoints.py and tests/test_teacher_stage.py.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("seed_core", "stages", "bench")

# calls that run code from the bytes they read: pickle and its relatives
UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load",
              "_pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load",
              "dill.loads", "joblib.load", "pandas.read_pickle", "mlflow.pytorch.load_model",
              "mlflow.pyfunc.load_model"}


def _qualified(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`torch.load` for `torch.load`, `th.load` (import torch as th) or `load` (from torch
    import load); None for anything that is not a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _aliases(tree: ast.AST) -> dict[str, str]:
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """`file:line: call` of every unpickling call in `source`: `torch.load` without
    `weights_only=True`, `numpy.load` with `allow_pickle=True`, and the `UNPICKLERS`."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _qualified(node.func, aliases)
        if name in ("torch.load", "torch.serialization.load"):
            unsafe = not _keyword_is(node, "weights_only", True)
        elif name == "numpy.load":
            unsafe = not _keyword_is(node, "allow_pickle", False) and any(
                k.arg == "allow_pickle" for k in node.keywords)
        else:
            unsafe = name in UNPICKLERS
        if unsafe:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def python_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))


def test_the_scan_covers_the_code() -> None:
    files = {str(p.relative_to(ROOT)) for p in python_files()}
    assert {"seed_core/teachers/untrusted.py", "seed_core/train/resume.py",
            "stages/teacher.py", "bench/bench_knn.py"} <= files


def test_no_code_path_unpickles_a_file() -> None:
    found = [hit for path in python_files()
             for hit in unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == [], ("calls that can run code from a file; read checkpoints with "
                         "seed_core.teachers.untrusted.load_untrusted or torch.load(..., "
                         "weights_only=True):\n" + "\n".join(found))


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, map_location='cpu', weights_only=False)",
    "import torch\ntorch.load(p, weights_only=flag)",  # not provably True
    "import torch as th\nth.load(p)",
    "from torch import load\nload(p)",
    "import torch\ntorch.serialization.load(p)",
    "import pickle\npickle.load(f)",
    "import pickle as pk\npk.loads(b)",
    "from pickle import Unpickler\nUnpickler(f).load()",
    "import numpy as np\nnp.load(p, allow_pickle=True)",
    "import joblib\njoblib.load(p)",
    "import mlflow.pytorch\nmlflow.pytorch.load_model(uri)",
])
def test_the_scan_finds_unsafe_loads(source: str) -> None:
    assert len(unsafe_loads(source, "x.py")) == 1, source


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load(p)",
    "import numpy as np\nnp.load(p, allow_pickle=False)",
    "import pickle\npickle.dumps(obj)",
    "import json\njson.load(f)",
    "from safetensors.torch import load_file\nload_file(p)",
])
def test_the_scan_passes_safe_loads(source: str) -> None:
    assert unsafe_loads(source, "x.py") == []


MLFLOW_COMMAND = re.compile(r"\bmlflow\s+(server|ui)\b")


def exposed_mlflow_commands(markdown: str) -> list[str]:
    """`line N: command` of each `mlflow server` / `mlflow ui` command in `markdown` (a line of
    a fenced code block, or an inline code span) that does not bind 127.0.0.1 explicitly
    (MLflow's default today, but a default can change and a copied command should say where
    it listens). Prose that names the command is not a command."""
    bad, fenced = [], False
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        commands = [line] if fenced else re.findall(r"`([^`]+)`", line)
        for command in commands:
            if MLFLOW_COMMAND.search(command) and not re.search(
                    r"(--host|-h)[ =]127\.0\.0\.1\b", command):
                bad.append(f"line {number}: {command.strip()}")
    return bad


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_readme_mlflow_commands_bind_the_loopback_interface(document: Path) -> None:
    bad = exposed_mlflow_commands(document.read_text())
    name = document.relative_to(ROOT)
    assert bad == [], (f"{name}: add `--host 127.0.0.1` to these MLflow commands (a tracking "
                       "server has no authentication):\n" + "\n".join(bad))


def test_the_readme_check_finds_exposed_commands() -> None:
    text = ("```bash\nmlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000\n"
            "mlflow server --host 0.0.0.0 --port 5000\n"
            "mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1\n"
            "mlflow ui -h 127.0.0.1\n```\nStart the mlflow server first, then run\n"
            "`mlflow server --port 5000` or `mlflow ui --host 127.0.0.1`.\n")
    assert exposed_mlflow_commands(text) == [
        "line 2: mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000",
        "line 3: mlflow server --host 0.0.0.0 --port 5000",
        "line 8: mlflow server --port 5000"]
