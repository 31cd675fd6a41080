"""Tracking server outages injected from outside the code: a real `mlflow server` on 127.0.0.1
that is never started, killed with SIGKILL in the middle of a stage, or frozen with SIGSTOP; and a
stage killed while its MLflow run is RUNNING. The stage must finish (or be cleaned up after) in
every case, write its outputs and metrics, and warn once about what MLflow did not get."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import free_port, write_tiny_shards

ROOT = Path(__file__).resolve().parent.parent
KNN_PARAMS = {"data": {"holdout_fraction": 0.2}, "knn": {"k": 5, "sweep_k": [1, 5, 10]}}
PRETRAIN_PARAMS = {"data": {"image_size": 16, "workers": 0},
                   "pretrain": {"epochs": 5, "batch_size": 16, "queue_size": 32, "log_every": 1,
                                "shuffle_bn_group": 8,
                                "embed_dim": 16, "hidden_dim": 32, "warmup_epochs": 0.5}}
# one failing call costs at most 3 attempts (2 retries) and 2 s of backoff; a refused connection
# fails at once, a frozen server after the request timeout (10 s; 2 s in the frozen test)
REFUSED_BOUND_S = 6.0
TRACKING_WARNING = re.compile(r"seed_core\.tracking WARNING (.*)")

pytestmark = pytest.mark.faults


class Server:
    """A real `mlflow server` (sqlite store) in its own process group, so that a kill or a stop
    reaches its workers too."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        root = self.root
        self.log = open(root / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
             str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if self.proc.poll() is not None or time.time() > deadline:
                    self.signal(signal.SIGKILL)
                    pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()}")
                time.sleep(0.3)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()

    def get(self, endpoint: str) -> dict:
        with urllib.request.urlopen(f"{self.url}/api/2.0/mlflow/{endpoint}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{endpoint}",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def run(self, run_id: str) -> dict:
        return self.get(f"runs/get?run_id={run_id}")["run"]


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.signal(signal.SIGCONT)
    server.kill()


@pytest.fixture
def server(shared_server: Server) -> Server:
    """The module's server, started again if a test killed it (same store, same port)."""
    if shared_server.proc.poll() is not None:
        shared_server.start()
    return shared_server


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Tiny inputs of two stages: cached features for `knn`, shards for `pretrain`."""
    root = tmp_path_factory.mktemp("outage")
    gen = torch.Generator().manual_seed(0)
    (root / "features").mkdir()
    for split, n in (("train", 60), ("val", 20)):
        labels = torch.arange(n) % 4  # separable: class c is shifted along axis c
        features = torch.randn(n, 8, generator=gen) + 2.0 * torch.nn.functional.one_hot(
            labels, 8).float()
        save_file({"features": features, "labels": labels, "index": torch.arange(n)},
                  str(root / "features" / f"{split}.safetensors"))
    write_tiny_shards(root / "shards", [30, 25, 15])
    (root / "knn.yaml").write_text(yaml.safe_dump(KNN_PARAMS))
    (root / "pretrain.yaml").write_text(yaml.safe_dump(PRETRAIN_PARAMS))
    return root


def stage_env(uri: str | None, **extra: str) -> dict:
    env = {**os.environ, "SEED_TRACKING": "1" if uri else "0", "SEED_NUM_THREADS": "1", **extra}
    for name in ("DVC_STAGE", "DVC_EXP_NAME", "DVC_ROOT"):
        env.pop(name, None)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def knn_cmd(work: Path, name: str) -> list[str]:
    return [sys.executable, str(ROOT / "stages" / "knn.py"), "--name", "student", "--features",
            str(work / "features"), "--metrics", str(work / name / "knn.json"),
            "--params", str(work / "knn.yaml")]


def pretrain_cmd(work: Path, name: str) -> list[str]:
    out = work / name
    return [sys.executable, str(ROOT / "stages" / "pretrain.py"), "--target", "baseline",
            "--shards", str(work / "shards"), "--out", str(out / "model"), "--curves",
            str(out / "curves.csv"), "--metrics", str(out / "metrics.json"), "--params",
            str(work / "pretrain.yaml"), "--checkpoint-dir", str(out / "ckpt")]


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - start


def tracking_warnings(stderr: str) -> list[str]:
    """The run's warnings about tracking: the tracker's own, MLflow's, urllib3's retries
    (the stages' warnings about their results are not counted)."""
    about = re.compile(r"(seed_core\.tracking|mlflow|urllib3)\S* WARNING|Retrying|MLflow", re.I)
    return [line for line in stderr.splitlines() if "WARNING" in line and about.search(line)]


class StageProcess:
    """A stage started in the background whose stderr is read up to a line of interest."""

    def __init__(self, cmd: list[str], env: dict, cwd: Path) -> None:
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def wait_for(self, pattern: str) -> re.Match:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(pattern, line)
            if found:
                return found
        raise AssertionError(f"the stage ended without printing {pattern!r}:\n"
                             + "".join(self.lines[-30:]))

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        _, rest = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, "".join(self.lines) + rest


def test_server_never_started_costs_one_refused_call(work: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    untracked, untracked_s = timed(knn_cmd(work, "off"), stage_env(None), work)
    assert untracked.returncode == 0, untracked.stderr
    done, seconds = timed(knn_cmd(work, "dead"), stage_env(dead), work)
    assert done.returncode == 0, done.stderr
    # the outputs are those of an untracked run
    dead_metrics = json.loads((work / "dead" / "knn.json").read_text())
    off_metrics = json.loads((work / "off" / "knn.json").read_text())
    assert dead_metrics["test"] == off_metrics["test"] and dead_metrics["test"]["top1"] > 50
    warnings = tracking_warnings(done.stderr)
    assert len(warnings) == 1, warnings  # urllib3's "Retrying" warnings are silenced
    message = TRACKING_WARNING.search(warnings[0]).group(1)
    assert dead in message and "[Errno 111] Connection refused" in message
    assert "Not logged: the stage's run itself" in message
    assert int(re.search(r"(\d+) metric values \(configured\.k, ", message).group(1)) > 2
    assert "dvc repro -f -s knn@student" in message
    # importing mlflow costs ~2 s more than an untracked run; the refused call itself ~2 s
    assert seconds - untracked_s < REFUSED_BOUND_S + 4.0, (seconds, untracked_s)


def test_frozen_server_costs_three_timeouts_at_most(work: Path, server: Server) -> None:
    server.signal(signal.SIGSTOP)  # accepts connections (kernel backlog) but never answers
    try:
        done, seconds = timed(knn_cmd(work, "frozen"), stage_env(
            server.url, MLFLOW_HTTP_REQUEST_TIMEOUT="2"), work)
    finally:
        server.signal(signal.SIGCONT)
    assert done.returncode == 0, done.stderr
    assert (work / "frozen" / "knn.json").is_file()
    warnings = tracking_warnings(done.stderr)
    assert len(warnings) == 1 and "timed out" in warnings[0], warnings
    # 3 attempts x 2 s + 2 s backoff, plus the stage itself (~5 s with the mlflow import)
    assert seconds < 3 * 2 + 2 + 12, seconds


def test_killed_stage_run_is_marked_killed_by_the_next_run(work: Path, server: Server) -> None:
    stage = StageProcess(knn_cmd(work, "killed_stage"), stage_env(server.url), work)
    run_id = stage.wait_for(r"MLflow: run (\w+) \(parent").group(1)
    stage.proc.send_signal(signal.SIGKILL)
    stage.finish()
    assert stage.proc.returncode == -signal.SIGKILL
    killed = server.run(run_id)
    assert killed["info"]["status"] == "RUNNING"  # nobody closed it
    parent_id = next(t["value"] for t in killed["data"]["tags"]
                     if t["key"] == "mlflow.parentRunId")

    again = StageProcess(knn_cmd(work, "killed_stage"), stage_env(server.url), work)
    new_id = again.wait_for(r"MLflow: run (\w+) \(parent").group(1)
    code, stderr = again.finish()
    assert code == 0, stderr
    killed = server.run(run_id)
    assert killed["info"]["status"] == "KILLED"
    tags = {t["key"]: t["value"] for t in killed["data"]["tags"]}
    assert "no longer runs" in tags["seed.ended_by"]
    new = server.run(new_id)
    assert new["info"]["status"] == "FINISHED"
    parent = server.run(parent_id)
    assert parent["info"]["status"] == "FINISHED"
    # the parent spans both stage runs: the first one's start to the second one's end
    assert int(parent["info"]["start_time"]) <= int(killed["info"]["start_time"])
    assert int(parent["info"]["end_time"]) >= int(new["info"]["end_time"])
    assert not tracking_warnings(stderr)


def test_a_live_run_of_another_process_is_left_running(work: Path, server: Server) -> None:
    """The clean-up must not end the run of a stage that is still running (dvc exp --queue -j2
    runs stages side by side)."""
    first = StageProcess(knn_cmd(work, "side_a"), stage_env(server.url), work)
    first_id = first.wait_for(r"MLflow: run (\w+) \(parent").group(1)
    first.proc.send_signal(signal.SIGSTOP)  # alive, and holding its run RUNNING
    try:
        done, _ = timed(knn_cmd(work, "side_b"), stage_env(server.url), work)
        assert done.returncode == 0, done.stderr
        assert server.run(first_id)["info"]["status"] == "RUNNING"
    finally:
        first.proc.send_signal(signal.SIGCONT)
    code, stderr = first.finish()
    assert code == 0, stderr
    assert server.run(first_id)["info"]["status"] == "FINISHED"
    # as a browser sees it: the experiment opens in MLflow 3's model-training view
    experiment = server.get("experiments/get-by-name?experiment_name=seed-distill")["experiment"]
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_server_killed_mid_stage(work: Path, server: Server) -> None:
    # last in the module: it kills the shared server
    try:
        stage = StageProcess(pretrain_cmd(work, "killed_server"), stage_env(server.url), work)
        run_id = stage.wait_for(r"MLflow: run (\w+) \(parent").group(1)
        deadline = time.time() + 60
        loss = f"metrics/get-history?run_id={run_id}&metric_key=train%2Floss"  # train/loss
        while not server.get(loss).get("metrics"):
            assert time.time() < deadline, "no loss value reached the server"
            time.sleep(0.05)
        logged = len(server.get(loss)["metrics"])
    finally:
        server.kill()
    killed_at = time.perf_counter()
    code, stderr = stage.finish()
    after_kill_s = time.perf_counter() - killed_at
    assert code == 0, stderr
    out = work / "killed_server"
    assert (out / "model" / "model.safetensors").is_file()
    steps = json.loads((out / "metrics.json").read_text())["steps_run"]
    assert steps == 5 * 4 and len((out / "curves.csv").read_text().splitlines()) == 1 + steps
    assert logged < steps  # the kill landed while the stage was still training
    warnings = tracking_warnings(stderr)
    assert len(warnings) == 1, warnings
    message = TRACKING_WARNING.search(warnings[0]).group(1)
    assert "Connection refused" in message and "the stage's run itself" not in message
    assert re.search(r"\d+ metric values \(.*loss", message)
    assert f"artifacts {out / 'curves.csv'}" in message
    assert "final status FINISHED" in message
    print(f"stage ran {after_kill_s:.1f} s after the server was killed ({steps - logged} "
          f"of {steps} steps left)")
    # the rest of the run (at most 20 steps here, ~3 s) plus one refused call
    assert after_kill_s < 4.0 + REFUSED_BOUND_S + 10.0, after_kill_s
