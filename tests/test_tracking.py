"""Tracking: where runs go, who logs, and how stage runs hang under one pipeline run."""

from pathlib import Path

import pytest

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
    assert child.data.metrics == {"loss": 1.5}
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
