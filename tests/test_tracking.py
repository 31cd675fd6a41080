"""Tracking: where runs go, who logs, and how stage runs hang under one pipeline run."""

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from seed_core import tracking
from seed_core.config import flatten, parse_params
from seed_core.stagekit import tracked


def test_default_uri_is_an_absolute_sqlite_file_at_dvc_root(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir("/")  # `dvc exp run --temp` runs elsewhere: DVC_ROOT decides
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_default_uri_without_dvc_root_is_the_repository_root(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "stages").mkdir()
    monkeypatch.chdir(tmp_path / "stages")
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_environment_uri_overrides(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.default_tracking_uri() == "http://127.0.0.1:5000"


def test_only_rank_zero_tracks(monkeypatch) -> None:
    monkeypatch.setenv("SEED_TRACKING", "1")
    assert isinstance(tracking.start_tracking("x", {}, "e", is_main=False), tracking.NullTracker)
    monkeypatch.setenv("SEED_TRACKING", "0")
    assert isinstance(tracking.start_tracking("x", {}, "e", is_main=True), tracking.NullTracker)


def test_pipeline_key_depends_on_params_and_commit() -> None:
    a = tracking.pipeline_key({"distill.t_student": 0.2}, "abc")
    assert a == tracking.pipeline_key({"distill.t_student": 0.2}, "abc")
    assert a != tracking.pipeline_key({"distill.t_student": 0.1}, "abc")
    assert a != tracking.pipeline_key({"distill.t_student": 0.2}, "abd")


@pytest.fixture
def sqlite_store(monkeypatch, tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SEED_TRACKING", "1")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return uri


def test_stage_runs_share_one_parent_holding_every_param(sqlite_store: str) -> None:
    from mlflow.tracking import MlflowClient

    params = parse_params({"distill": {"t_student": 0.1}})
    with tracked("distill", params) as first:
        first.log_metrics({"loss": 1.5, "nan_is_dropped": float("nan")}, step=3)
        # a stage's summary: a sum that missed 58 by a rounding, and its Unix times
        first.log_metrics({"top1": 57.99999999999999, "started_at": 1796457226.144})
    with tracked("report", params) as second:
        second.log_parent_metrics({"student.knn_top1": 80.0})
    with pytest.raises(ValueError, match="boom"):
        with tracked("knn@student", params) as third:
            raise ValueError("boom")

    client = MlflowClient(sqlite_store)
    parent = client.get_run(first.parent_id)
    assert first.parent_id == second.parent_id == third.parent_id
    assert parent.data.params["distill.t_student"] == "0.1"
    assert len(parent.data.params) == len(flatten(params))
    assert parent.data.metrics == {"student.knn_top1": 80.0}
    assert parent.data.tags["dvc_exp_name"] == "exp-a"
    assert parent.info.run_name == "exp-a"

    child = client.get_run(first.run_id)
    assert child.data.tags["mlflow.parentRunId"] == first.parent_id
    assert child.data.tags["dvc_stage"] == "distill" and child.data.tags["seed.role"] == "stage"
    assert child.data.metrics == {"loss": 1.5, "top1": 58.0}
    assert child.data.tags["started_at"] == "2026-12-05T07:53:46+00:00"  # a tag, not a chart
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [3]
    assert child.info.status == "FINISHED"
    assert client.get_run(third.run_id).info.status == "FAILED"


def test_another_configuration_gets_another_parent(sqlite_store: str) -> None:
    with tracked("distill", parse_params({})) as a:
        pass
    with tracked("distill", parse_params({"knn": {"k": 5}})) as b:
        pass
    assert a.parent_id != b.parent_id


def test_no_params_means_no_tracking() -> None:
    with tracked("shards", None) as tracker:
        assert isinstance(tracker, tracking.NullTracker)


def test_experiment_opens_in_the_model_training_view(sqlite_store: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_store)
    with tracked("distill", parse_params({})):
        pass
    exp = client.get_experiment_by_name("seed-distill")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment made elsewhere, or one the UI tagged with its own guess, is re-tagged ...
    other = client.create_experiment("other", tags={tracking.EXPERIMENT_KIND_TAG:
                                                    "genai_development_inferred"})
    tracking.MlflowTracker("knn", {}, "other").close()
    assert client.get_experiment(other).tags[tracking.EXPERIMENT_KIND_TAG] == \
        "custom_model_development"
    # ... but a kind chosen by a person stays
    client.set_experiment_tag(other, tracking.EXPERIMENT_KIND_TAG, "genai_development")
    tracking.MlflowTracker("knn", {}, "other").close()
    assert client.get_experiment(other).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_parent_spans_its_pipeline_from_first_start_to_last_end(sqlite_store: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_store)
    params = parse_params({"knn": {"k": 7}})
    with tracked("fashion_mnist", params) as first:
        time.sleep(0.05)
    parent = client.get_run(first.parent_id).info
    first_run = client.get_run(first.run_id).info
    assert parent.start_time <= first_run.start_time and parent.end_time == first_run.end_time
    time.sleep(0.3)
    with tracked("report", params) as last:
        # RUNNING while one of its stages runs
        assert client.get_run(last.parent_id).info.status == "RUNNING"
        time.sleep(0.05)
    parent = client.get_run(last.parent_id).info
    assert last.parent_id == first.parent_id
    assert parent.start_time == client.get_run(first.parent_id).info.start_time
    assert parent.end_time == client.get_run(last.run_id).info.end_time
    assert parent.end_time - parent.start_time >= 400  # not the 11 ms of a container run
    assert parent.status == "FINISHED"


def test_stale_runs_of_dead_processes_on_this_host_are_marked_killed(sqlite_store: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_store)
    exp = client.create_experiment("seed-distill")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid whose process is gone
    alive = subprocess.Popen(["sleep", "60"])  # another stage, still running
    host = socket.gethostname()
    owners = {"dead": tracking.process_tag(child.pid),
              "alive": tracking.process_tag(alive.pid),
              "other_host": f"elsewhere:{child.pid}:1",
              "reused_pid": f"{host}:{alive.pid}:0"}  # a live pid, another start time
    runs = {name: client.create_run(exp, run_name=name, tags={
        tracking.PROCESS_TAG: owner, tracking.HOST_TAG: owner.rsplit(":", 2)[0]}).info.run_id
        for name, owner in owners.items()}
    try:
        with tracked("knn@student", parse_params({})):
            pass
    finally:
        alive.kill()
        alive.wait()
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "other_host": "RUNNING",
                      "reused_pid": "KILLED"}


def test_process_alive() -> None:
    assert tracking.process_alive(tracking.process_tag()) is True
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    tag = tracking.process_tag(child.pid)
    child.wait()
    assert tracking.process_alive(tag) is False
    assert tracking.process_alive(f"not-{socket.gethostname()}:1:5") is None
    assert tracking.process_alive("garbage") is None


def test_failure_reason_is_short_and_names_the_endpoint() -> None:
    refused = RuntimeError(
        "API request to http://127.0.0.1:5999/api/2.0/mlflow/runs/log-batch failed with "
        "exception HTTPConnectionPool(host='127.0.0.1', port=5999): Max retries exceeded with url:"
        " /api/2.0/mlflow/runs/log-batch (Caused by NewConnectionError(\"HTTPConnection(host="
        "'127.0.0.1', port=5999): Failed to establish a new connection: [Errno 111] Connection "
        "refused\"))")
    assert tracking.failure_reason(refused) == \
        "RuntimeError: runs/log-batch: [Errno 111] Connection refused"
    slow = RuntimeError("API request to http://h/api/2.0/mlflow/runs/create failed with "
                        "exception HTTPConnectionPool(host='h', port=1): Read timed out. "
                        "(read timeout=10)")
    assert tracking.failure_reason(slow) == \
        "RuntimeError: runs/create: Read timed out. (read timeout=10)"
    assert tracking.failure_reason(ValueError("bad\nsecond line")) == "ValueError: bad"


def test_after_the_first_failure_no_call_reaches_mlflow(monkeypatch, caplog) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    tracker = tracking.MlflowTracker("distill", {"distill.lr": 0.03}, "seed-distill", dead)
    first_call_s = time.perf_counter() - started
    assert tracker.failure and "Connection refused" in tracker.failure

    def no_call(*args, **kwargs):
        raise AssertionError("an MLflow call after the first failure")

    monkeypatch.setattr(tracker.client, "log_batch", no_call)
    monkeypatch.setattr(tracker.client, "set_terminated", no_call)
    started = time.perf_counter()
    for step in range(200):
        tracker.log_metrics({"loss": 1.0, "lr": 0.1, "nan": float("nan")}, step=step)
    tracker.log_parent_metrics({"student.knn_top1": 80.0})
    tracker.log_artifact("plots/distill.csv")
    tracker.log_model(object(), "student", registered_name="seed-student")
    with caplog.at_level(logging.INFO, logger="seed_core.tracking"):
        tracker.close()
    assert time.perf_counter() - started < 0.5
    assert first_call_s < 8  # 3 refused attempts and 2 s of backoff
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert ("Not logged: the stage's run itself (and its parent); 400 metric values (loss, lr); "
            "the pipeline run's metrics (student.knn_top1); artifacts plots/distill.csv; models "
            "student (registered as seed-student).") in message
    assert dead in message and "dvc repro -f -s distill" in message


def test_http_retries_are_bounded_unless_the_user_chose(monkeypatch, tmp_path: Path) -> None:
    for name in tracking.HTTP_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    tracking.MlflowTracker("x", {}, "e", f"sqlite:///{tmp_path / 'm.db'}").close()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"


def test_changed_params_name_and_describe_a_parent() -> None:
    base = {"distill.epochs": 8, "student.arch": "mobilenetv3_small_050", "knn.k": 20}
    current = {**base, "distill.epochs": 3, "knn.k": 20, "new.key": 1}
    changed = tracking.changed_params(current, base)
    assert changed == {"distill.epochs": 3, "new.key": 1}
    assert tracking.changed_params(current, None) == {}
    assert tracking.parent_run_name("exp-a", changed, "0123456789") == "exp-a"
    assert tracking.parent_run_name("", changed, "0123456789") == "distill.epochs=3, new.key=1"
    assert tracking.parent_run_name("", {}, "0123456789") == "committed params @ 0123456"
    assert tracking.parent_run_name("", None, "unknown") == "params"
    many = {f"section.key_{i}": i for i in range(20)}
    short = tracking.describe_changes(many, limit=80)
    assert len(short) <= 100 and short.endswith("(20 changed)")
    assert tracking.reused_stages({"teacher": 10.0, "knn_student": 30.0, "report": 31.0},
                                  since=20.0) == ["teacher"]


def _commit(repo: Path, text: str) -> None:
    (repo / "params.yaml").write_text(text)
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=repo, check=True)


def test_parent_is_named_and_described_by_what_differs_from_the_committed_params(
        sqlite_store: str, monkeypatch, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    repo = tmp_path / "repo"
    repo.mkdir()
    _commit(repo, "distill:\n  epochs: 8\n")
    assert tracking.committed_params(repo / "params.yaml")["distill.epochs"] == 8
    assert tracking.committed_params(repo / "params.yaml", rev="no-such-rev") is None
    (repo / "params.yaml").write_text("distill:\n  epochs: 3\nknn:\n  k: 5\n")
    params = parse_params({"distill": {"epochs": 3}, "knn": {"k": 5}})
    monkeypatch.delenv("DVC_EXP_NAME")
    with tracked("distill", params, params_path=repo / "params.yaml") as run:
        pass
    client = MlflowClient(sqlite_store)
    parent = client.get_run(run.parent_id)
    assert parent.info.run_name == "distill.epochs=3, knn.k=5"
    note = parent.data.tags["mlflow.note.content"]
    assert "- `distill.epochs` = `3`\n- `knn.k` = `5`" in note
    assert "dvc_stage" not in parent.data.tags  # a stage's tag: the parent spans them all
    assert parent.data.tags["seed.changed_params"] == "distill.epochs=3, knn.k=5"
    # the child run holds the values too (MLflow's params panel of a stage is not empty)
    assert client.get_run(run.run_id).data.params["knn.k"] == "5"

    # a DVC experiment compares with its baseline commit, and is named after itself
    (repo / "params.yaml").write_text("distill:\n  epochs: 8\n")
    monkeypatch.setenv("DVC_EXP_NAME", "fewer-epochs")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "HEAD")
    with tracked("distill", parse_params({}), params_path=repo / "params.yaml") as exp:
        pass
    parent = client.get_run(exp.parent_id)
    assert parent.info.run_name == "fewer-epochs"
    assert "Params: as committed" in parent.data.tags["mlflow.note.content"]


def test_report_outputs_and_model_tags_reach_the_parent_and_the_registry(
        sqlite_store: str, tmp_path: Path) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    class Seen(logging.Handler):
        messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    params = parse_params({"knn": {"k": 9}})
    seen = Seen()
    # on mlflow's own logger: it does not propagate to the root logger that caplog watches
    logging.getLogger("mlflow.pytorch").addHandler(seen)
    try:
        with tracked("distill", params) as distill:
            distill.log_model(torch.nn.Linear(2, 2), name="student", registered_name="seed-test")
    finally:
        logging.getLogger("mlflow.pytorch").removeHandler(seen)
    assert not [m for m in seen.messages if "Pickle" in m]
    summary = tmp_path / "summary.md"
    summary.write_text("# summary\n")
    with tracked("report", params) as report:
        report.log_parent_artifact(summary)
        report.note_reused_stages({"teacher": 0.0, "report": time.time()})
        report.tag_model_version("seed-test", {"student.knn_top1": 75.00000000001})

    client = MlflowClient(sqlite_store)
    assert [a.path for a in client.list_artifacts(report.parent_id)] == ["summary.md"]
    parent = client.get_run(report.parent_id)
    assert parent.data.tags["seed.reused_stages"] == "teacher"
    assert "Reused from DVC's cache" in parent.data.tags["mlflow.note.content"]
    version = client.get_model_version("seed-test", "1")
    assert version.tags["student.knn_top1"] == "75.0"
    assert version.tags["dvc_exp_name"] == "exp-a"
    assert version.tags["git_commit"] == parent.data.tags["git_commit"]
    assert version.tags[tracking.PIPELINE_TAG] == parent.data.tags[tracking.PIPELINE_TAG]
    # another configuration's report finds no version of its own: nothing is mis-tagged
    with tracked("report", parse_params({"knn": {"k": 11}})) as other:
        other.tag_model_version("seed-test", {"student.knn_top1": 1.0})
    assert client.get_model_version("seed-test", "1").tags["student.knn_top1"] == "75.0"


def test_training_rows_become_sectioned_curves() -> None:
    """MLflow's run page charts `a/b` in section `a`, sections before unsectioned metrics: the
    method's curves under `train/`, progress and timing under `train/progress/`, no `step`."""
    row = {"step": 7, "epoch": 0.5, "loss": 2.0, "lr": 0.03, "agreement": 0.4,
           "data_seconds": 0.01, "step_seconds": 0.2}
    assert tracking.curve_metrics(row) == {
        "train/loss": 2.0, "train/lr": 0.03, "train/agreement": 0.4,
        "train/progress/epoch": 0.5, "train/progress/data_seconds": 0.01,
        "train/progress/step_seconds": 0.2}
