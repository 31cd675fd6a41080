"""Experiment tracking behind a small interface; MLflow is imported lazily and used on rank 0.

Runs are grouped as MLflow's UI expects for comparing configurations: one *parent* run per
pipeline configuration (every params.yaml value, the final summary metrics), and one *child* run
per stage execution (its curves and artifacts). Stages are separate processes, so the parent is
found again by a tag holding a fingerprint of the configuration and the git commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping, Protocol

from seed_core.io import repo_root

log = logging.getLogger(__name__)

PIPELINE_TAG = "seed.pipeline_key"


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_parent_metrics(self, metrics: Mapping[str, float]) -> None: ...
    def log_model(self, model: Any, name: str, registered_name: str | None = None) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class NullTracker:
    """What ranks other than 0 (and runs with tracking off) get: every call is a no-op."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_parent_metrics(self, metrics: Mapping[str, float]) -> None:
        pass

    def log_model(self, model: Any, name: str, registered_name: str | None = None) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else an absolute sqlite file at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or repo_root(),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def pipeline_key(flat_params: Mapping[str, Any], commit: str) -> str:
    """Fingerprint of one configuration of the pipeline: all params values and the code commit."""
    blob = json.dumps({"params": dict(flat_params), "commit": commit}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))}


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a nested metrics dict as `{"holdout.top1": ..}`; lists and text are left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


class MlflowTracker:
    """A child run of the configuration's parent run (created on first use)."""

    def __init__(self, stage: str, flat_params: Mapping[str, Any], experiment: str,
                 tracking_uri: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        uri = tracking_uri or default_tracking_uri()
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

        commit = git_commit()
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        key = pipeline_key(flat_params, commit)
        tags = {"git_commit": commit, "dvc_stage": os.environ.get("DVC_STAGE", stage),
                "dvc_exp_name": exp_name, PIPELINE_TAG: key}
        self.parent_id = self._find_or_create_parent(key, flat_params, tags, exp_name)
        run = self.client.create_run(
            self.experiment_id, run_name=tags["dvc_stage"],
            tags={**tags, "mlflow.parentRunId": self.parent_id, "seed.role": "stage"})
        self.run_id = run.info.run_id
        log.info("MLflow: run %s (parent %s) at %s", self.run_id, self.parent_id, uri)

    def _find_or_create_parent(self, key: str, flat_params: Mapping[str, Any],
                               tags: Mapping[str, str], exp_name: str) -> str:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PIPELINE_TAG}` = '{key}' and tags.`seed.role` = 'pipeline'",
            max_results=1)
        if found:
            return found[0].info.run_id
        name = exp_name or f"pipeline-{key[:8]}"
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**tags, "seed.role": "pipeline"})
        self._log_params(run.info.run_id, flat_params)
        # the parent stays RUNNING-free: it is a container; mark it finished at once
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                 for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._log_params(self.run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step or 0) for k, v in _finite(metrics).items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_parent_metrics(self, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, 0) for k, v in _finite(metrics).items()]
        if items:
            self.client.log_batch(self.parent_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model: Any, name: str, registered_name: str | None = None) -> None:
        """Log a torch module as an MLflow model (pickle format: input shapes stay free)."""
        import mlflow.pytorch
        import torch
        import torchvision
        import timm

        # explicit requirements: inferring them imports and scans everything (~9 s)
        reqs = [f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
                f"timm=={timm.__version__}"]
        with self._mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(model, name=name, pip_requirements=reqs,
                                     serialization_format="pickle",
                                     registered_model_name=registered_name)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def start_tracking(stage: str, flat_params: Mapping[str, Any], experiment: str,
                   is_main: bool = True) -> Tracker:
    """A tracker for one stage execution; a no-op off rank 0 or with SEED_TRACKING=0."""
    if not is_main or os.environ.get("SEED_TRACKING", "1") == "0":
        return NullTracker()
    return MlflowTracker(stage, flat_params, experiment)
