"""End to end: the whole DVC pipeline on tiny settings, in a scratch git copy of the repository,
tracked by a real MLflow server on 127.0.0.1 with a sqlite store."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from seed_core import warm
from seed_core.smoke import scratch_copy

FMNIST = Path("/usr/share/datasets/fashion-mnist")
ALL_STAGES = {"fashion_mnist", "shards@train", "shards@val", "pretrain@teacher",
              "pretrain@baseline", "teacher", "teacher_cache", "distill", "features@teacher",
              "features@baseline", "features@student", "knn@teacher", "knn@baseline",
              "knn@student", "linear@teacher", "linear@baseline", "linear@student", "report"}

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                       reason="needs Debian's dataset-fashion-mnist (make test installs it)"),
]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` with a sqlite backend; yields its base URL."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                                   "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()}")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


class Repo:
    """A scratch git copy of the project, with tiny params, run through `dvc`."""

    def __init__(self, path: Path, tracking_uri: str) -> None:
        self.path = path
        # PYTHONPATH: the stages run this copy's seed_core, so an edit here changes behaviour
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "PYTHONPATH": str(path),
                    "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": tracking_uri,
                    "SEED_TRACKING": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
        self.env.pop("DVC_ROOT", None)

    def run(self, *cmd: str, timeout: int = 900) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), cwd=self.path, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                                 f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        return done

    def repro(self, *targets: str) -> set[str]:
        """Run `dvc repro [targets]`; return the names of the stages that ran."""
        out = self.run("dvc", "repro", *targets).stdout
        return set(re.findall(r"Running stage '([^']+)'", out))

    def set_params(self, **changes: object) -> None:
        params = yaml.safe_load((self.path / "params.yaml").read_text())
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            params[section][key] = value
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message)

    def read_json(self, relative: str) -> dict:
        return json.loads((self.path / relative).read_text())


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlflow_server) -> Repo:
    path = scratch_copy(tmp_path_factory.mktemp("pipeline") / "repo")  # `make smoke`'s copy
    scratch = Repo(path, mlflow_server)
    ran = scratch.repro()
    assert ran == ALL_STAGES
    scratch.commit("first run")
    return scratch


def test_dvc_metrics_show_is_one_table_of_the_headline_rows(repo: Repo) -> None:
    """Issue 19: the stages' detailed metrics and summary.json are plain outputs, so
    `dvc metrics show` is a row each for teacher, baseline, SEED and SEED - baseline over 7
    shared columns: test and holdout top-1, training seconds, the paired test's p."""
    shown = json.loads(repo.run("dvc", "metrics", "show", "--json").stdout)
    files = {path: entry["data"] for path, entry in shown[""]["data"].items()}
    names = ["teacher", "baseline", "student", "seed_minus_baseline"]
    assert sorted(files) == sorted(f"metrics/headline/{name}.json" for name in names)
    summary = repo.read_json("metrics/summary.json")
    for model in ("teacher", "baseline", "student"):
        row = files[f"metrics/headline/{model}.json"]
        assert row["knn"] == round(summary[model]["knn_top1"], 2)
        assert row["linear_holdout"] == round(
            repo.read_json(f"metrics/linear_{model}.json")["holdout"]["top1"], 2)
    assert files["metrics/headline/student.json"]["train_s"] == round(
        repo.read_json("metrics/distill.json")["seconds"], 1)
    gain = files["metrics/headline/seed_minus_baseline.json"]
    paired = repo.read_json("metrics/paired.json")["linear"]["student_vs_baseline"]
    assert gain["linear"] == round(paired["difference"], 2)
    assert float(gain["linear_p"]) == pytest.approx(paired["p_value"], rel=0.05)
    text = repo.run("dvc", "metrics", "show").stdout.splitlines()
    assert len(text) == 5, text  # the header and one row per file, in that order
    assert [line.split()[0] for line in text[1:]] == [f"metrics/headline/{n}.json" for n in names]
    assert text[0].split() == ["Path", "knn", "knn_holdout", "knn_p", "linear",
                               "linear_holdout", "linear_p", "train_s"]
    # (it was 2 files, 25 columns, 676 characters in the demo; 22 rows of ~7,100 before that)
    assert max(map(len, text)) < 160, max(map(len, text))


def test_outputs_have_their_contract_shapes(repo: Repo) -> None:
    summary = repo.read_json("metrics/summary.json")
    assert set(summary) == {"teacher", "baseline", "student"}
    for row in summary.values():
        assert set(row) == {"knn_top1", "knn_top5", "linear_top1", "linear_top5"}
        assert all(0.0 <= v <= 100.0 for v in row.values())
        assert row["knn_top5"] >= row["knn_top1"]
    table = (repo.path / "reports" / "summary.md").read_text()
    assert "| Teacher |" in table and "✗" in table and "| SEED |" in table
    for png in ("training_curves", "per_class_accuracy", "embedding_projection"):
        assert (repo.path / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    teacher = repo.read_json("models/teacher/teacher.json")
    assert teacher["format"] == "seed_distill" and teacher["head"] is True
    assert "knn_top1" not in teacher  # the check's numbers live in the metrics, not the model
    assert 0.0 <= repo.read_json("metrics/teacher.json")["knn_top1"] <= 100.0
    manifest = repo.read_json("data/shards/train/manifest.json")
    assert manifest["samples"] == 400 and manifest["skipped"] == []
    assert repo.read_json("metrics/distill.json")["steps_run"] == 400 // 64
    # the fresh run's wall time, split into the stages' seconds and the overhead
    timing = repo.read_json("metrics/pipeline.json")
    assert timing["one_run"] is True and timing["stages"] == len(ALL_STAGES)
    assert timing["wall_seconds"] == pytest.approx(
        timing["stage_seconds"] + timing["overhead_seconds"], abs=0.2)
    assert timing["overhead_seconds"] == pytest.approx(
        timing["startup_seconds"] + timing["between_stages_seconds"], abs=0.2)
    assert 0 < timing["between_stages_seconds"] and 0 < timing["startup_seconds"]
    assert "Wall time of the run" in table


def test_dvc_plots_show_is_viewable_offline(repo: Repo) -> None:
    """Data plots would load Vega from a CDN (blank offline): every plot is a local image."""
    repo.run("dvc", "plots", "show")
    html = (repo.path / "dvc_plots" / "index.html").read_text()
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', html)
    images = re.findall(r'<img[^>]* src="([^"]+)"', html)
    assert len(images) == 3 and all((repo.path / "dvc_plots" / src).stat().st_size > 10_000
                                    for src in images)
    assert "dvc_plots" not in repo.run("git", "status", "--porcelain").stdout


def test_second_repro_is_up_to_date(repo: Repo) -> None:
    assert repo.repro() == set()
    assert "up to date" in repo.run("dvc", "status").stdout


def test_mlflow_server_has_runs_params_and_metrics(repo: Repo, mlflow_server: str) -> None:
    experiment = _get(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name"
                      "?experiment_name=seed-distill")["experiment"]
    runs = _post(f"{mlflow_server}/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [experiment["experiment_id"]], "max_results": 500})["runs"]

    def tags(run: dict) -> dict:
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    parents = [r for r in runs if tags(r).get("seed.role") == "pipeline"]
    children = [r for r in runs if tags(r).get("seed.role") == "stage"]
    assert len(parents) == 1
    parent = parents[0]
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["distill.t_student"] == "0.2" and params["data.limit_train"] == "400"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    summary = repo.read_json("metrics/summary.json")
    assert metrics["student.knn_top1"] == pytest.approx(summary["student"]["knn_top1"])
    stages = {tags(r)["dvc_stage"] for r in children}
    assert ALL_STAGES - {"fashion_mnist"} <= stages | {"fashion_mnist"}
    assert all(tags(r)["mlflow.parentRunId"] == parent["info"]["run_id"] for r in children)
    assert all(re.fullmatch(r"[0-9a-f]{40}", tags(r)["git_commit"]) for r in children)
    distill = next(r for r in children if tags(r)["dvc_stage"] == "distill")
    history = _get(f"{mlflow_server}/api/2.0/mlflow/metrics/get-history?run_id="
                   f"{distill['info']['run_id']}&metric_key=train%2Floss")["metrics"]
    assert len(history) >= 1
    model = _get(f"{mlflow_server}/api/2.0/mlflow/registered-models/get?name=seed-student")
    assert model["registered_model"]["name"] == "seed-student"


def test_changing_knn_k_reruns_only_knn_and_report(repo: Repo) -> None:
    repo.set_params(knn__k=5)
    assert repo.repro() == {"knn@teacher", "knn@baseline", "knn@student", "report"}
    assert repo.read_json("metrics/knn_student.json")["configured"]["k"] == 5
    repo.commit("k=5")


def test_the_baselines_epochs_leave_the_teachers_pretraining_cached(repo: Repo) -> None:
    """A user tuning the student's epochs does not pay for the teacher's pre-training again."""
    def stale() -> set[str]:
        return set(json.loads(repo.run("dvc", "status", "--json").stdout))

    assert stale() == set()
    repo.set_params(pretrain__epochs=2)
    assert {"pretrain@baseline"} <= stale() and "pretrain@teacher" not in stale()
    repo.set_params(pretrain__epochs=1, pretrain__teacher_epochs=2)
    assert "pretrain@teacher" in stale() and "pretrain@baseline" not in stale()
    repo.run("git", "checkout", "params.yaml")
    assert stale() == set()


def test_changing_limit_train_reruns_only_its_dependents(repo: Repo) -> None:
    """Two stages run, not the 17 a whole `dvc repro` would (~2 min of CI): that everything
    downstream of a changed output re-runs is DVC's own rule, shown by the stages it marks."""
    def stale() -> set[str]:
        return set(json.loads(repo.run("dvc", "status", "--json").stdout))

    repo.set_params(data__limit_train=360)
    # the validation TSV comes out byte-identical, so DVC stops there
    assert repo.repro("shards@val") == {"fashion_mnist"}
    assert repo.repro("shards@train") == {"shards@train"}
    assert repo.read_json("data/shards/train/manifest.json")["samples"] == 360
    # every stage that reads the training shards sees the new ones; the rest follow from theirs
    reads_train_shards = {"pretrain@teacher", "pretrain@baseline", "teacher", "teacher_cache",
                          "distill", *(f"{stage}@{model}" for stage in ("features", "linear")
                                       for model in ("teacher", "baseline", "student"))}
    assert stale() == reads_train_shards
    repo.run("git", "checkout", "--", ".")
    repo.run("dvc", "checkout", "--force")
    assert stale() == set()


def test_dvc_experiment_with_a_changed_temperature(repo: Repo, mlflow_server: str) -> None:
    repo.run("dvc", "exp", "run", "-n", "tstudent01", "-S", "distill.t_student=0.1")
    shown = json.loads(repo.run("dvc", "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "tstudent01" in text and '"t_student": 0.1' in text
    experiment = _get(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name"
                      "?experiment_name=seed-distill")["experiment"]
    found = _post(f"{mlflow_server}/api/2.0/mlflow/runs/search",
                  {"experiment_ids": [experiment["experiment_id"]],
                   "filter": "tags.dvc_exp_name = 'tstudent01' and tags.`seed.role` = 'pipeline'"})
    assert len(found.get("runs", [])) == 1
    check_experiment_in_mlflow(repo, mlflow_server, "tstudent01")
    # the comparison users read: the committed run and the experiment, side by side
    compared = repo.run(sys.executable, "-m", "seed_core.report.compare").stdout
    assert compared.startswith("Top-1 (%) on the test split")
    row = next(line for line in compared.splitlines() if line.startswith("| tstudent01 |"))
    student = repo.read_json("metrics/summary.json")["student"]  # the experiment's, in place
    assert "`distill.t_student=0.1`" in row and "`dvc exp run -S distill.t_student=0.1`" in row
    assert f"{student['knn_top1']:.2f} / {student['linear_top1']:.2f}" in row
    holdout = repo.run(sys.executable, "-m", "seed_core.report.compare", "--split",
                       "holdout").stdout
    row = next(line for line in holdout.splitlines() if line.startswith("| tstudent01 |"))
    knn = repo.read_json("metrics/knn_student.json")["holdout"]["top1"]
    linear = repo.read_json("metrics/linear_student.json")["holdout"]["top1"]
    assert f"{knn:.2f} / {linear:.2f}" in row


def test_make_ui_link_opens_the_pipeline_runs_with_headline_columns(
        repo: Repo, mlflow_server: str) -> None:
    """`make ui`'s link, loaded from the pinned MLflow's server: the page, the bundle that
    reads the link's parameters, and the shared view it names, resolved against the runs."""
    printed = repo.run(sys.executable, "-m", "seed_core.ui", "--no-serve").stdout
    link = re.search(r"http://\S+", printed).group(0)
    page, fragment = link.split("#", 1)
    assert page == f"{mlflow_server}/" and fragment.startswith("/experiments/")
    with urllib.request.urlopen(page, timeout=10) as response:
        html = response.read().decode()
    bundle = re.search(r'src="([^"]*static/js/main[^"]*\.js)"', html).group(1)
    with urllib.request.urlopen(f"{mlflow_server}/{bundle.lstrip('./')}", timeout=30) as js:
        code = js.read().decode()
    # the names the link and the view rely on, as this MLflow version spells them
    for name in ("workflowType", "machine_learning", "viewStateShareKey",
                 "mlflow.sharedViewState.", '"attributes.start_time"'):
        assert name in code, name
    query = dict(urllib.parse.parse_qsl(fragment.split("?", 1)[1]))
    assert query["workflowType"] == "machine_learning"
    experiment_id = fragment.split("/")[2]
    experiment = _get(f"{mlflow_server}/api/2.0/mlflow/experiments/get"
                      f"?experiment_id={experiment_id}")["experiment"]
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert experiment["name"] == "seed-distill"
    view = json.loads(tags[f"mlflow.sharedViewState.{query['viewStateShareKey']}"])
    runs = _post(f"{mlflow_server}/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [experiment_id], "filter": view["searchFilter"],
                  "order_by": [f"{view['orderByKey']} DESC"]})["runs"]
    assert len(runs) >= 2  # the committed configuration and the experiment, no stage runs
    names = [r["info"]["run_name"] for r in runs]
    assert names[0] == "tstudent01"  # newest first
    # a `dvc repro <stage>` that stops before the report (the limit_train test's) is a pipeline
    # run without headline metrics; every run whose report ran fills every column
    reported = [run for run in runs
                if any(t["key"] == "seed.reused_stages" for t in run["data"].get("tags", []))]
    assert len(reported) >= 2 and reported[0]["info"]["run_name"] == "tstudent01"
    for run in reported:
        have = {f"metrics.`{m['key']}`" for m in run["data"].get("metrics", [])} | {
            f"tags.`{t['key']}`" for t in run["data"]["tags"]}
        assert set(view["selectedColumns"]) <= have, set(view["selectedColumns"]) - have


def check_experiment_in_mlflow(repo: Repo, uri: str, name: str) -> None:
    """What the MLflow UI shows of a DVC experiment, read as users' scripts read it: the
    parent run, named and described, with the headline metrics and the report; the newest
    registered student, tagged with where it came from and what it scores."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("seed-distill")
    parent, = client.search_runs([experiment.experiment_id],
                                 f"tags.dvc_exp_name = '{name}' and tags.`seed.role` = 'pipeline'")
    summary = repo.read_json("metrics/summary.json")
    assert parent.info.run_name == name
    assert "- `distill.t_student` = `0.1`" in parent.data.tags["mlflow.note.content"]
    assert parent.data.metrics["student.knn_top1"] == pytest.approx(summary["student"]["knn_top1"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "summary.md" in artifacts and any(p.endswith(".png") for p in artifacts)
    # the teacher's pre-training is not the experiment's to run: DVC took it from its cache
    assert "pretrain_teacher" in parent.data.tags["seed.reused_stages"].split(", ")
    assert "distill" not in parent.data.tags["seed.reused_stages"].split(", ")
    newest = max(client.search_model_versions("name='seed-student'"), key=lambda v: int(v.version))
    assert newest.tags["dvc_exp_name"] == name
    assert newest.tags["seed.changed_params"] == "distill.t_student=0.1"
    assert float(newest.tags["student.knn_top1"]) == pytest.approx(summary["student"]["knn_top1"])
    # the run page's charts open with the training curves (section `train/`, before the
    # unsectioned summary numbers), the loss and lr before progress and timing
    distill, = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                  "tags.dvc_stage = 'distill'")
    logged = set(distill.data.metrics)
    assert {"train/loss", "train/lr", "train/progress/epoch"} <= logged, logged
    assert not {"loss", "lr", "step", "train/step"} & logged, logged
    curves = {key for key in logged  # what was logged at a training step: the curves
              if any(m.step for m in client.get_metric_history(distill.info.run_id, key))}
    assert curves and all(key.startswith("train/") for key in curves), curves


TIMING_KEYS = {"seconds", "images_per_s", "records_per_s", "data_seconds", "compute_seconds",
               "data_wait_fraction", "started_at", "finished_at", "train_seconds", "train_s"}


def without_timing(metrics: object) -> object:
    """A metrics JSON without its wall-clock numbers (they differ between any two runs)."""
    if isinstance(metrics, dict):
        return {k: without_timing(v) for k, v in metrics.items() if k not in TIMING_KEYS}
    if isinstance(metrics, list):
        return [without_timing(v) for v in metrics]
    return metrics


def test_code_edits_rerun_exactly_the_stages_that_import_them(repo: Repo) -> None:
    """Issue 9: DVC's code deps follow the imports (seed_core.codemap)."""
    def edit(relative: str, text: str) -> set[str]:
        path = repo.path / relative
        path.write_text(path.read_text() + text)
        ran = repo.repro()
        repo.commit(f"edit {relative}")
        return ran

    # a plot label: only the report
    assert edit("seed_core/report/plots.py", "\n# a plot label changed\n") == {"report"}
    # the kNN code: the kNN stages and the report; the teacher's check imports it too and
    # re-runs, but writes the same model, so nothing downstream of it re-runs
    assert edit("seed_core/evaluation/knn.py", "\n# kNN code edited\n") == {
        "knn@teacher", "knn@baseline", "knn@student", "teacher", "report"}
    # the SEED step (MoCo does not share it), changed in behaviour: distillation and what
    # follows it re-run, pre-training and the other models' evaluations do not
    changed = edit("seed_core/train/distill.py", (
        "\n\n_plain_seed_step = seed_step\n\n\n"
        "def seed_step(*args, **kwargs):  # an edit that changes what the step computes\n"
        "    kwargs['t_student'] *= 1.01\n"
        "    return _plain_seed_step(*args, **kwargs)\n"))
    assert changed == {"distill", "features@student", "knn@student", "linear@student",
                       "report"}


def _weights_and_features(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for pattern in ("models/**/*.safetensors", "data/features/**/*.safetensors",
                            "data/teacher_cache/**/*.safetensors")
            for p in sorted(path.glob(pattern))}


def test_same_params_and_seed_give_identical_metrics(repo: Repo) -> None:
    """Issue 12: on CPU a second run of the whole pipeline reproduces every metric; the second
    run starts its stages warm (seed_core.warm, as `make demo` does), so that the weights,
    features and metrics of forked stage processes are also those of fresh ones."""
    # pipeline.json is about the wall clock only (which stages ran in one repro, and when)
    metrics = sorted(p for p in (repo.path / "metrics").rglob("*.json")
                     if p.name != "pipeline.json")
    before = {str(p.relative_to(repo.path)): without_timing(json.loads(p.read_text()))
              for p in metrics}
    files_before = _weights_and_features(repo.path)
    assert len(files_before) >= 6
    warm_dir = tempfile.mkdtemp(prefix="warm", dir="/tmp")
    cold_env = repo.env
    repo.env = {**cold_env, warm.SWITCH_ENV: "1", warm.DIR_ENV: warm_dir}
    try:
        assert repo.run("dvc", "repro", "--force").returncode == 0
    finally:
        repo.env = cold_env
        logs = "".join(p.read_text() for p in Path(warm_dir).glob("*.log"))
        for line in logs.splitlines():  # the server leaves when idle; not to wait for that
            if "serving" in line:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(line.rsplit("pid ", 1)[1].rstrip(")")), signal.SIGTERM)
    handed_over = re.findall(r"stages/(\w+)\.py[^:]*: pid", logs)
    # the first stages start cold while the server imports; every later one is forked
    assert {"distill", "pretrain", "knn", "linear", "features", "report"} <= set(handed_over)
    assert len(handed_over) >= 10  # of 18
    after = {str(p.relative_to(repo.path)): without_timing(json.loads(p.read_text()))
             for p in metrics}
    assert after == before
    assert _weights_and_features(repo.path) == files_before


def test_replacing_the_teacher_checkpoint_in_place_reruns_the_teacher(repo: Repo) -> None:
    """Issue 12: `teacher.checkpoint` is a real DVC dependency, not only a path in params."""
    from safetensors.torch import load_file, save_file

    external = repo.path / "external" / "teacher.safetensors"
    external.parent.mkdir()
    external.write_bytes((repo.path / "models/pretrain/teacher/model.safetensors").read_bytes())
    repo.set_params(teacher__checkpoint="external/teacher.safetensors")
    assert "teacher" in repo.run("dvc", "repro", "-s", "teacher").stdout
    assert "teacher:" not in repo.run("dvc", "status", "teacher").stdout
    # another file at the same path: other weights, same layout and metadata
    tensors = load_file(str(external))
    from safetensors import safe_open
    with safe_open(str(external), framework="pt") as f:
        metadata = f.metadata()
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in tensors.items()},
              str(external), metadata=metadata)
    status = repo.run("dvc", "status", "teacher").stdout
    assert "teacher:" in status and "modified:" in status and "external/teacher.safetensors" \
        in status
    assert "teacher" in repo.run("dvc", "repro", "-s", "teacher").stdout
