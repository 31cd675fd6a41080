"""Experiment tracking behind a small interface; MLflow is imported lazily and used on rank 0.

Runs are grouped as MLflow's UI expects for comparing configurations: one *parent* run per
pipeline configuration (every params.yaml value, the final summary metrics, the report's paired
tests), and one *child* run per stage execution (its curves and artifacts). Stages are separate
processes, so the parent is found again by a tag holding a fingerprint of the configuration and
the git commit. The parent starts with the first stage and ends with the latest one.

Tracking never stops or stalls a stage. MLflow's HTTP client retries a dead server for minutes
(7 retries, exponential backoff, 120 s timeout per attempt); `HTTP_BOUNDS` caps one failing call
at 3 attempts of at most 10 s plus 2 s of backoff, and after the first failure the stage makes no
further MLflow call. At its end one warning lists what was not logged. A run left RUNNING by a
killed stage is marked KILLED by the next stage run on the same host.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import yaml

from seed_core.config import flatten, parse_params
from seed_core.io import repo_root
from seed_core.program import start_ticks

log = logging.getLogger(__name__)

PIPELINE_TAG = "seed.pipeline_key"
PROCESS_TAG = "seed.process"  # host:pid:start of the process that holds a run RUNNING
HOST_TAG = "seed.host"
# the runs that stand for a whole pipeline configuration (each stage's run is their child)
PIPELINE_ROLE_FILTER = "tags.`seed.role` = 'pipeline'"
# MLflow 3's UI opens an experiment in its GenAI view unless this tag names another kind; the
# model-training view's value is in the UI's ExperimentKind enum (mlflow/server/js)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# caps on MLflow's HTTP retries (see the module docstring); a value set by the user wins
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_parent_metrics(self, metrics: Mapping[str, float]) -> None: ...
    def log_parent_artifact(self, path: str | Path) -> None: ...
    def note_reused_stages(self, finished_at: Mapping[str, float]) -> None: ...
    def log_model(self, model: Any, name: str, registered_name: str | None = None) -> None: ...
    def tag_model_version(self, registered_name: str, metrics: Mapping[str, float]) -> None: ...
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

    def log_parent_artifact(self, path: str | Path) -> None:
        pass

    def note_reused_stages(self, finished_at: Mapping[str, float]) -> None:
        pass

    def log_model(self, model: Any, name: str, registered_name: str | None = None) -> None:
        pass

    def tag_model_version(self, registered_name: str, metrics: Mapping[str, float]) -> None:
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


def committed_params(params_path: str | Path, rev: str = "HEAD") -> dict[str, Any] | None:
    """Every value of the params file as committed at `rev` (defaults filled in, like the
    run's own), or None when git, the commit or a valid file is missing."""
    path = Path(params_path).resolve()
    try:
        shown = subprocess.run(["git", "show", f"{rev}:./{path.name}"], cwd=path.parent,
                               capture_output=True, text=True, timeout=10)
        if shown.returncode != 0:
            return None
        return flatten(parse_params(yaml.safe_load(shown.stdout)))
    except Exception:  # only a description is at stake: an old or broken file gives none
        return None


def changed_params(current: Mapping[str, Any],
                   base: Mapping[str, Any] | None) -> dict[str, Any]:
    """The values of `current` that differ from `base`; none without a base (unknown)."""
    if base is None:
        return {}
    return {k: v for k, v in sorted(current.items()) if k not in base or base[k] != v}


def describe_changes(changed: Mapping[str, Any], limit: int | None = None) -> str:
    """`distill.epochs=3, student.arch=resnet10t`, cut to `limit` characters with a count."""
    text = ", ".join(f"{k}={v}" for k, v in changed.items())
    if limit is not None and len(text) > limit:
        shown = text[:limit].rsplit(", ", 1)[0]
        text = f"{shown}, … ({len(changed)} changed)"
    return text


def parent_run_name(exp_name: str, changed: Mapping[str, Any] | None, commit: str) -> str:
    """The DVC experiment's name; else the changed params; else the committed params."""
    if exp_name:
        return exp_name
    if changed:
        return describe_changes(changed, limit=80)
    suffix = f" @ {commit[:7]}" if commit != "unknown" else ""
    return ("committed params" if changed is not None else "params") + suffix


def parent_description(exp_name: str, changed: Mapping[str, Any] | None, commit: str,
                       params_path: str | Path) -> str:
    """Markdown for the parent run's description (MLflow's `mlflow.note.content`)."""
    what = f"DVC experiment `{exp_name}`" if exp_name else "A `dvc repro` run"
    lines = [f"{what} of the SEED pipeline at commit `{commit[:12]}`."]
    if changed is None:
        lines.append(f"\nThe committed `{Path(params_path).name}` could not be read, so the "
                     "changed params are unknown; every value is in this run's params.")
    elif not changed:
        lines.append(f"\nParams: as committed in `{Path(params_path).name}`.")
    else:
        lines.append(f"\nParams that differ from the committed `{Path(params_path).name}`:\n")
        lines += [f"- `{k}` = `{v}`" for k, v in changed.items()]
    lines.append("\nHeadline metrics, paired tests, `summary.md` and plots are on this run; "
                 "each stage is a child run.")
    return "\n".join(lines)


def reused_stages(finished_at: Mapping[str, float], since: float) -> list[str]:
    """Stages whose last execution ended before `since`, the parent run's start (DVC took
    them from its cache). Not their start: a stage's process starts before it creates the
    parent."""
    return sorted(name for name, at in finished_at.items() if at < since)


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))}


def split_timestamps(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics to chart, rounded to 6 significant digits: `58.0`, not `57.99999999999999`;
    tags for the `*_at` Unix times, as UTC ISO 8601, which charted as metrics read 1.8e9)."""
    values, times = {}, {}
    for key, value in metrics.items():
        if key.endswith("_at"):
            times[key] = datetime.datetime.fromtimestamp(value, datetime.timezone.utc) \
                .isoformat(timespec="seconds")
        else:
            values[key] = float(f"{value:.6g}")
    return values, times


# MLflow's run page charts a metric `a/b` in section `a`, sorts sections by name before the
# metrics with no section ("Model metrics") and charts by name inside each (mlflow 3.17,
# getBaseChartAndSectionConfigs): training curves under `train/` thus open the page, the
# method's own (loss, lr, agreement) above where and how fast it went, in `train/progress/`.
CURVES_SECTION = "train"
PROGRESS_SECTION = f"{CURVES_SECTION}/progress"
PROGRESS_KEYS = frozenset({"epoch", "data_seconds", "step_seconds"})


def curve_metrics(row: Mapping[str, float]) -> dict[str, float]:
    """A training log row as MLflow curves: `loss` -> `train/loss`, `step_seconds` ->
    `train/progress/step_seconds`. `step` is the curves' x axis already and is left out."""
    return {f"{PROGRESS_SECTION if key in PROGRESS_KEYS else CURVES_SECTION}/{key}": value
            for key, value in row.items() if key != "step"}


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


def _now_ms() -> int:
    return int(time.time() * 1000)


def process_tag(pid: int | None = None) -> str:
    """`host:pid:start` of a process: the start time tells a reused pid apart."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{start_ticks(pid)}"


def process_alive(tag: str) -> bool | None:
    """Whether the process of a `process_tag` still runs; None when it ran on another host."""
    parts = tag.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    host, pid, start = parts[0], int(parts[1]), parts[2]
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    return not start or start_ticks(pid) == start


def failure_reason(err: BaseException) -> str:
    """A short reason for a failed MLflow call: `experiments/get-by-name: [Errno 111]
    Connection refused` rather than urllib3's several hundred characters."""
    text = str(err)
    endpoint = re.search(r"/api/\d\.\d/mlflow/([\w/-]+)", text)
    cause = re.search(r"\[Errno -?\d+\][^'\")]*|Read timed out(\. \(read timeout=[\d.]+\))?"
                      r"|timed out", text)
    if cause:
        where = f"{endpoint.group(1)}: " if endpoint else ""
        return f"{type(err).__name__}: {where}{cause.group(0).strip().rstrip('.')}"
    first_line = (text.strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:300]}"


class _NoPickleWarning(logging.Filter):
    """Drops mlflow.pytorch's warning that pickled models are unsafe to load: the format is
    chosen (input shapes stay free), the model is ours, and the warning asks nothing of the
    user; other mlflow.pytorch messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


class _QuietRetries(logging.Filter):
    """Drops urllib3's "Retrying (...)" warnings: the tracker reports a dead server once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Retrying")


_QUIET_RETRIES = _QuietRetries()
_NO_PICKLE_WARNING = _NoPickleWarning()


@dataclass
class Unlogged:
    """What a stage could not send to MLflow, for the one warning at its end."""

    run: bool = False
    params: int = 0
    metric_values: int = 0
    metric_keys: set[str] = field(default_factory=set)
    artifacts: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    parent_metrics: set[str] = field(default_factory=set)
    status: str = ""

    def describe(self) -> str:
        def keys(names: set[str]) -> str:
            shown = sorted(names)
            return ", ".join(shown[:8]) + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")

        parts = ["the stage's run itself (and its parent)"] if self.run else []
        if self.params:
            parts.append(f"{self.params} params")
        if self.metric_values:
            parts.append(f"{self.metric_values} metric values ({keys(self.metric_keys)})")
        if self.parent_metrics:
            parts.append(f"the pipeline run's metrics ({keys(self.parent_metrics)})")
        if self.artifacts:
            parts.append(f"artifacts {', '.join(self.artifacts)}")
        if self.models:
            parts.append(f"models {', '.join(self.models)}")
        if self.status and not self.run:
            parts.append(f"the run's final status {self.status}")
        return "; ".join(parts) or "nothing"


class MlflowTracker:
    """A child run of the configuration's parent run (created on first use).

    Every MLflow call goes through `_call`: the first failure (server down, network, full
    store) switches tracking off for the rest of the stage, and `close` warns once with what
    was lost. The stage's own outputs and metrics files never depend on MLflow.
    """

    def __init__(self, stage: str, flat_params: Mapping[str, Any], experiment: str,
                 tracking_uri: str | None = None,
                 params_path: str | Path = "params.yaml") -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
        for name, value in HTTP_BOUNDS.items():
            os.environ.setdefault(name, value)
        logging.getLogger("urllib3.connectionpool").addFilter(_QUIET_RETRIES)
        logging.getLogger("mlflow.pytorch").addFilter(_NO_PICKLE_WARNING)
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self.uri = tracking_uri or default_tracking_uri()
        self.stage = stage
        self.failure: str | None = None
        self.unlogged = Unlogged()
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.run_id: str | None = None
        self.params_path = Path(params_path)
        self.tags: dict[str, str] = {}
        self._process = process_tag()
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self._call(self._start, lambda lost: setattr(lost, "run", True), flat_params, experiment)

    def _call(self, fn: Callable[..., Any], lost: Callable[[Unlogged], None], *args: Any,
              **kwargs: Any) -> Any:
        """`fn(*args)` unless an earlier call failed; what could not be logged goes to `lost`."""
        if self.failure is None:
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # any failure: tracking must never stop the stage
                self.failure = failure_reason(err)
                log.info("MLflow at %s failed (%s); no further MLflow calls in this stage: a "
                         "warning at its end lists what was not logged", self.uri, self.failure)
        lost(self.unlogged)
        return None

    def _start(self, flat_params: Mapping[str, Any], experiment: str) -> None:
        self.experiment_id = self._experiment(experiment)
        self._end_stale_runs()
        commit = git_commit()
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        # an experiment compares with the commit it was made on; a plain run with HEAD
        base = committed_params(self.params_path,
                                os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD")
        changed = changed_params(flat_params, base)
        key = pipeline_key(flat_params, commit)
        self.tags = {"git_commit": commit, "dvc_exp_name": exp_name, PIPELINE_TAG: key,
                     "seed.changed_params": (describe_changes(changed, limit=4000)
                                             if base is not None else "unknown")}
        owner = {PROCESS_TAG: self._process, HOST_TAG: socket.gethostname()}
        self.parent_id = self._find_or_create_parent(
            key, flat_params, parent_run_name(exp_name, changed if base is not None else None,
                                              commit),
            parent_description(exp_name, changed if base is not None else None, commit,
                               self.params_path))
        for name, value in owner.items():
            self.client.set_tag(self.parent_id, name, value)
        stage = os.environ.get("DVC_STAGE", self.stage)
        run = self.client.create_run(
            self.experiment_id, run_name=stage,
            tags={**self.tags, **owner, "dvc_stage": stage,
                  "mlflow.parentRunId": self.parent_id, "seed.role": "stage"})
        self.run_id = run.info.run_id
        # the child carries the values too: its params panel is not empty, and runs of one
        # stage compare across parents
        self._log_params(self.run_id, flat_params)
        log.info("MLflow: run %s (parent %s) at %s", self.run_id, self.parent_id, self.uri)

    def _experiment(self, name: str) -> str:
        """The experiment's id (created if needed), tagged to open in the model-training view."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, tags={EXPERIMENT_KIND_TAG:
                                                                 EXPERIMENT_KIND})
            except self._mlflow.exceptions.MlflowException:
                exp = self.client.get_experiment_by_name(name)  # another stage created it
                if exp is None:
                    raise
        # the UI stores its own guess (`..._inferred`); an explicit kind set by a user stays
        kind = exp.tags.get(EXPERIMENT_KIND_TAG, "")
        if not kind or kind.endswith("_inferred") or kind == "no_inferred_type":
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG,
                                           EXPERIMENT_KIND)
        return exp.experiment_id

    def _end_stale_runs(self) -> None:
        """Mark KILLED the runs this host left RUNNING whose process is gone (a stage killed
        with SIGKILL, or by a lost machine, never closes its run). Runs held by other hosts
        are left alone: their process cannot be checked from here."""
        stale = self.client.search_runs(
            [self.experiment_id], max_results=1000,
            filter_string=f"attributes.status = 'RUNNING' and "
                          f"tags.`{HOST_TAG}` = '{socket.gethostname()}'")
        for run in stale:
            owner = run.data.tags.get(PROCESS_TAG, "")
            if owner and owner != self._process and process_alive(owner) is False:
                self.client.set_tag(run.info.run_id, "seed.ended_by", f"stage {self.stage}: "
                                    f"process {owner} no longer runs")
                self.client.set_terminated(run.info.run_id, "KILLED")
                log.info("MLflow: marked KILLED the run %s (%s) that process %s left RUNNING",
                         run.info.run_id, run.info.run_name, owner)

    def _find_or_create_parent(self, key: str, flat_params: Mapping[str, Any], name: str,
                               description: str) -> str:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PIPELINE_TAG}` = '{key}' and {PIPELINE_ROLE_FILTER}",
            max_results=1)
        if found:
            # RUNNING while one of its stages runs; `close` ends it again at the stage's end
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**self.tags, "seed.role": "pipeline",
                                           "mlflow.note.content": description})
        self._log_params(run.info.run_id, flat_params)
        return run.info.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                 for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_params(self, params: Mapping[str, Any]) -> None:
        def lost(u: Unlogged) -> None:
            u.params += len(params)

        self._call(self._log_params, lost, self.run_id, params)

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric, RunTag

        now = _now_ms()
        values, times = split_timestamps(metrics)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, step)
                                               for k, v in values.items()],
                              tags=[RunTag(k, v) for k, v in times.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        finite = _finite(metrics)
        if not finite:
            return

        def lost(u: Unlogged) -> None:
            u.metric_values += len(finite)
            u.metric_keys.update(finite)

        self._call(self._log_metrics, lost, self.run_id, finite, step or 0)

    def log_parent_metrics(self, metrics: Mapping[str, float]) -> None:
        finite = _finite(metrics)
        if finite:
            self._call(self._log_metrics, lambda u: u.parent_metrics.update(finite),
                       self.parent_id, finite, 0)

    def _log_artifact(self, run_id: str, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(self._log_artifact, lambda u: u.artifacts.append(str(path)), self.run_id,
                   Path(path), artifact_path)

    def log_parent_artifact(self, path: str | Path) -> None:
        """An artifact of the whole pipeline run: the compare view shows the parents'."""
        self._call(self._log_artifact, lambda u: u.artifacts.append(f"{path} (pipeline run)"),
                   self.parent_id, Path(path), None)

    def _note_reused_stages(self, finished_at: Mapping[str, float]) -> None:
        parent = self.client.get_run(self.parent_id)
        reused = reused_stages(finished_at, parent.info.start_time / 1000)
        note = parent.data.tags.get("mlflow.note.content", "").split("\n\nReused from")[0]
        if reused:
            note += ("\n\nReused from DVC's cache (ran before this run started; their time is "
                     "not in this run's duration): " + ", ".join(f"`{s}`" for s in reused) + ".")
        self.client.set_tag(self.parent_id, "seed.reused_stages", ", ".join(reused) or "none")
        self.client.set_tag(self.parent_id, "mlflow.note.content", note)

    def note_reused_stages(self, finished_at: Mapping[str, float]) -> None:
        """Say on the parent which stages DVC did not re-run (`finished_at`: stage -> Unix time
        of its last end, from the metrics files)."""
        self._call(self._note_reused_stages,
                   lambda u: u.artifacts.append("the parent's reused-stages note"), finished_at)

    def _log_model(self, model: Any, name: str, registered_name: str | None) -> None:
        import mlflow.pytorch
        import timm
        import torch
        import torchvision

        # explicit requirements: inferring them imports and scans everything (~9 s)
        reqs = [f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
                f"timm=={timm.__version__}"]
        with self._mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(model, name=name, pip_requirements=reqs,
                                            serialization_format="pickle",
                                            registered_model_name=registered_name)
        version = getattr(info, "registered_model_version", None)
        if registered_name and version is not None:
            for tag, value in self.tags.items():
                self.client.set_model_version_tag(registered_name, str(version), tag, value)
            self.client.update_model_version(
                registered_name, str(version),
                description=f"{name} of run {self.run_id} ({self.stage}); changed params: "
                            f"{self.tags.get('seed.changed_params') or 'none'}")

    def log_model(self, model: Any, name: str, registered_name: str | None = None) -> None:
        """Log a torch module as an MLflow model (pickle format: input shapes stay free); a
        registered version is tagged with the commit, the experiment and the changed params."""
        label = f"{name} (registered as {registered_name})" if registered_name else name
        self._call(self._log_model, lambda u: u.models.append(label), model, name,
                   registered_name)

    def _tag_model_version(self, registered_name: str, metrics: Mapping[str, float]) -> None:
        key = self.tags[PIPELINE_TAG]
        versions = [v for v in self.client.search_model_versions(f"name='{registered_name}'")
                    if v.tags.get(PIPELINE_TAG) == key]
        if not versions:
            log.info("MLflow: no version of %s was registered by this configuration (its "
                     "distillation came from DVC's cache); headline metrics not tagged",
                     registered_name)
            return
        newest = max(versions, key=lambda v: int(v.version))
        values, _ = split_timestamps(metrics)
        for tag, value in values.items():
            self.client.set_model_version_tag(registered_name, newest.version, tag, str(value))

    def tag_model_version(self, registered_name: str, metrics: Mapping[str, float]) -> None:
        """Tag the newest version this configuration registered with the headline metrics."""
        finite = _finite(metrics)
        self._call(self._tag_model_version,
                   lambda u: u.models.append(f"{registered_name}'s metric tags"),
                   registered_name, finite)

    def _finish(self, status: str) -> None:
        now = _now_ms()
        self.client.set_terminated(self.run_id, status, end_time=now)
        # the parent spans its pipeline: from its first stage's start to its latest stage's end
        self.client.set_terminated(self.parent_id, status, end_time=now)

    def close(self, failed: bool = False) -> None:
        status = "FAILED" if failed else "FINISHED"
        self._call(self._finish, lambda u: setattr(u, "status", status), status)
        if self.failure is not None:
            log.warning(
                "MLflow at %s failed in this stage (%s). Not logged: %s. The stage's outputs "
                "and metrics files are complete (`dvc metrics show`); to log it, bring the "
                "server back and re-run `dvc repro -f -s %s`.", self.uri, self.failure,
                self.unlogged.describe(), self.stage)


def start_tracking(stage: str, flat_params: Mapping[str, Any], experiment: str,
                   is_main: bool = True, params_path: str | Path = "params.yaml") -> Tracker:
    """A tracker for one stage execution; a no-op off rank 0 or with SEED_TRACKING=0."""
    if not is_main or os.environ.get("SEED_TRACKING", "1") == "0":
        return NullTracker()
    return MlflowTracker(stage, flat_params, experiment, params_path=params_path)
