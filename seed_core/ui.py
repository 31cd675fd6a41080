"""`make ui`: MLflow's UI on 127.0.0.1, opened on the runs table that compares configurations.

    python -m seed_core.ui [--port 5000] [--no-serve]

MLflow 3's UI opens an experiment in its GenAI view, shows every stage's child run, and no
metric column until one is added by hand. Its URL cannot name columns, but a *shared view*
can: the UI reads the view named by `?viewStateShareKey=KEY` from the experiment tag
`mlflow.sharedViewState.KEY` (a JSON of the search facets and the table's UI state; read in
the pinned MLflow's `mlflow/server/js` bundle). This writes that tag, with one row per
pipeline run (the parents), the changed params and the headline metrics as columns, prints the
link, and starts `mlflow server` on the repository's `mlflow.db` (with `--no-serve`, or when
`MLFLOW_TRACKING_URI` names a running server, it only writes the view and prints the link).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from seed_core.config import load_params
from seed_core.tracking import PIPELINE_ROLE_FILTER, default_tracking_uri

VIEW_KEY = "seed-pipelines"
SHARED_VIEW_TAG = "mlflow.sharedViewState."
HEADLINE_METRICS = tuple(f"{model}.{protocol}_top1" for model in ("student", "baseline", "teacher")
                         for protocol in ("knn", "linear")) + tuple(
    f"paired.{protocol}.student_vs_baseline.{key}" for protocol in ("knn", "linear")
    for key in ("difference", "p_value"))


def column(kind: str, key: str) -> str:
    """A runs-table column id as the UI spells it: ``metrics.`student.knn_top1` ``."""
    return f"{kind}.`{key}`"


def pipeline_view(metrics: Sequence[str] = HEADLINE_METRICS) -> dict[str, Any]:
    """The shared view: parent runs only, newest first, the comparison's columns."""
    return {"searchFilter": PIPELINE_ROLE_FILTER,
            "orderByKey": "attributes.start_time", "orderByAsc": False,
            "selectedColumns": [column("tags", "seed.changed_params"),
                                *(column("metrics", m) for m in metrics)]}


def ui_link(base_url: str, experiment_id: str, key: str = VIEW_KEY) -> str:
    """The runs table of the experiment in the model-training view, in the shared view `key`."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={key}")


def write_view(tracking_uri: str, experiment: str) -> str:
    """Store the shared view on the experiment; returns the experiment's id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} at {tracking_uri}: run the "
                         "pipeline first (`make demo` or `dvc repro`), or set mlflow.experiment "
                         "in params.yaml to the experiment to open")
    client.set_experiment_tag(found.experiment_id, SHARED_VIEW_TAG + VIEW_KEY,
                              json.dumps(pipeline_view()))
    return found.experiment_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--no-serve", action="store_true",
                        help="write the view and print the link; start no server")
    args = parser.parse_args(argv)
    uri = default_tracking_uri()
    remote = uri.startswith(("http://", "https://"))
    experiment_id = write_view(uri, load_params(args.params).mlflow.experiment)
    base = uri if remote else f"http://{args.host}:{args.port}"
    print(f"MLflow runs table (one row per pipeline run, headline metrics as columns):\n"
          f"  {ui_link(base, experiment_id)}", flush=True)
    if args.no_serve or remote:
        return 0
    command = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
               "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    print(f"starting {' '.join(command)} (Ctrl-C stops it)", flush=True)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
