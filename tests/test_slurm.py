"""The SLURM launcher (`seed_core.cluster`): the batch script it writes, and real jobs on a real
SLURM cluster that a module fixture starts on this machine (Debian's slurmctld, two slurmd
"nodes", munged, all under a scratch directory; `make test` installs the packages).

The jobs run the real `distill` stage on the tiny data of tests/test_train_stages.py: 2 nodes x 1
rank equal the local 1-process run; `scontrol requeue`, a time limit (SIGUSR1 before it, then a
requeue) resume it to the same weights; `scancel`, a failed task, a lost node and SIGTERM to the
waiting command end that command promptly, naming the job and its log."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port, write_tiny_shards
from seed_core.cluster import batch_script, parse_fields, task_env, wait_for_job
from seed_core.config import ConfigError, LaunchConfig, load_params, parse_params
from test_train_stages import ENV, TINY, assert_same_training, command, outputs, stage_inputs

ROOT = Path(__file__).resolve().parent.parent
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


# --- the batch script and the config, without SLURM -------------------------------------------

def test_the_batch_script_asks_for_nodes_ranks_a_signal_and_requeue() -> None:
    launch = LaunchConfig(backend="slurm", nodes=3, partition="gpu", account="proj", qos="high",
                          time="2-00:00:00", gpus_per_task=1, cpus_per_task=6, mem="64G",
                          constraint="a100", sbatch_args=["--exclusive"], signal_delay_s=300)
    script = batch_script(launch, 4, ["stages/distill.py", "--out", "models/student"],
                          "seed-distill", "/shared/logs/distill-%j.log", "/shared/repo",
                          python="/shared/venv/bin/python")
    options = re.findall(r"^#SBATCH (\S+)$", script, re.M)
    assert options == ["--job-name=seed-distill", "--nodes=3", "--ntasks-per-node=4",
                       "--output=/shared/logs/distill-%j.log", "--open-mode=append",
                       "--chdir=/shared/repo", "--requeue", "--signal=B:USR1@300",
                       "--partition=gpu", "--account=proj", "--qos=high", "--time=2-00:00:00",
                       "--mem=64G", "--constraint=a100", "--gpus-per-task=1",
                       "--cpus-per-task=6", "--exclusive"]
    assert "trap requeue USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    # the ranks are asked to write a checkpoint and stop before the job is requeued
    assert script.index('kill -USR1 "$task"') < script.index('scontrol requeue "$SLURM_JOB_ID"')
    assert ("srun --kill-on-bad-exit=1 /shared/venv/bin/python -m seed_core.cluster task -- "
            "stages/distill.py --out models/student &") in script
    # unset options are left to the cluster's defaults
    plain = batch_script(LaunchConfig(), 1, ["s.py"], "j", "l", "w")
    assert "--partition" not in plain and "--time" not in plain and "--gpus" not in plain


def test_a_task_gets_torch_distributed_ranks_from_slurm() -> None:
    env = task_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                    "SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "2", "MASTER_ADDR": "n1"})
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"],
            env["GROUP_RANK"], env["MASTER_ADDR"]) == ("5", "8", "1", "2", "2", "n1")


def test_launch_settings_are_checked_and_no_dvc_param() -> None:
    with pytest.raises(ConfigError, match=r"'launch\.nodes' > 1 needs launch\.backend: slurm"):
        parse_params({"launch": {"nodes": 2}})
    with pytest.raises(ConfigError, match=r"'launch\.backend' must be one of"):
        parse_params({"launch": {"backend": "k8s"}})
    with pytest.raises(ConfigError, match=r"'pretrain\.batch_size' must be divisible by "
                                          r"launch\.nodes x pretrain\.nproc = 3"):
        parse_params({"launch": {"backend": "slurm", "nodes": 3}})
    assert load_params(ROOT / "params.yaml").launch.backend == "local"  # the contract default
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("pretrain", "distill"):
        body = stages[name].get("do", stages[name])
        assert body["cmd"].startswith("python -m seed_core.cluster run --nproc ${"), name
        assert "launch" not in body["cmd"] and not any("launch" in str(p)
                                                       for p in body["params"]), name


def test_local_backend_is_torchrun_on_this_machine() -> None:
    done = subprocess.run([sys.executable, "-m", "seed_core.cluster", "run", "--nproc", "2",
                           "--dry-run", "--", "stages/distill.py", "--out", "x"],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, check=True)
    assert done.stdout.split()[1:] == ["-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node", "2", "stages/distill.py", "--out", "x"]
    one = subprocess.run([sys.executable, "-m", "seed_core.cluster", "run", "--nproc", "1",
                          "--dry-run", "--", "stages/distill.py", "--out", "x"],
                         cwd=ROOT, capture_output=True, text=True, env=ENV, check=True)
    assert one.stdout.split()[1:] == ["stages/distill.py", "--out", "x"]  # no torchrun


def test_the_wait_fails_on_a_cancelled_job_and_follows_a_requeue(tmp_path) -> None:
    """scontrol's answers replayed: a requeue is waited out; a failure needs two looks."""
    answers = iter([{"JobState": "RUNNING", "Restarts": "0", "NodeList": "(null)"},
                    {"JobState": "PENDING", "Restarts": "1"},
                    {"JobState": "PREEMPTED", "Restarts": "1"},  # passing through
                    {"JobState": "RUNNING", "Restarts": "1"},
                    {"JobState": "CANCELLED", "Restarts": "1", "ExitCode": "0:15"},
                    {"JobState": "CANCELLED", "Restarts": "1", "ExitCode": "0:15"}])
    log = tmp_path / "job.log"
    log.write_text("hello\n")
    out = tmp_path / "out.txt"
    with open(out, "w") as f, pytest.raises(Exception, match=r"slurm job 7 \(log: .*job\.log\) "
                                                             r"ended CANCELLED"):
        wait_for_job("7", log, out=f, err=f, poll_s=0, info=lambda _: next(answers))
    assert "[job 7] hello" in out.read_text() and "requeued (restart 1)" in out.read_text()
    assert parse_fields("JobId=7 JobName=a b JobState=RUNNING Reason=None")["JobState"] == \
        "RUNNING"


# --- a real cluster ---------------------------------------------------------------------------

def _exe(name: str) -> str | None:
    """The program's path (the daemons live in /usr/sbin, often off a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def _missing() -> str | None:
    absent = [d for d in DAEMONS if _exe(d) is None]
    if absent:
        return (f"SLURM is not installed ({', '.join(absent)} missing): `make test` installs it "
                f"as root, or run `apt-get install slurmctld slurmd slurm-client munge`")
    if os.geteuid() != 0:
        return "the test SLURM cluster needs root (slurmd launches the jobs' tasks)"
    return None


def _node_names() -> tuple[list[str], str | None]:
    """Two names of this machine (the rendezvous resolves the first node's name); an
    /etc/hosts line when the machine has fewer."""
    names = [socket.gethostname(), "localhost"]
    try:
        if names[0] != names[1] and all(
                socket.gethostbyname(n).startswith("127.") for n in names):
            return names, None
    except OSError:
        pass
    line = "127.0.0.1 seed-slurm-a seed-slurm-b  # tests/test_slurm.py\n"
    with open("/etc/hosts", "a") as f:
        f.write(line)
    return ["seed-slurm-a", "seed-slurm-b"], line


def _config(root: Path, names: list[str], ports: list[int], socket_path: Path) -> str:
    nodes = "".join(f"NodeName={n} NodeHostname={n} NodeAddr=127.0.0.1 Port={p} CPUs=2 "
                    f"RealMemory=1000 State=UNKNOWN\n" for n, p in zip(names, ports[1:]))
    return textwrap.dedent(f"""\
        ClusterName=seedtest
        SlurmctldHost={socket.gethostname()}
        SlurmctldPort={ports[0]}
        SlurmUser=root
        SlurmdUser=root
        AuthType=auth/munge
        # cred_expire: how long a requeued job waits before it may start again (default 120 s)
        AuthInfo=socket={socket_path},cred_expire=5
        CredType=cred/munge
        MpiDefault=none
        StateSaveLocation={root}/state
        SlurmdSpoolDir={root}/spool/%n
        SlurmctldPidFile={root}/slurmctld.pid
        SlurmdPidFile={root}/slurmd.%n.pid
        SlurmctldLogFile={root}/log/slurmctld.log
        SlurmdLogFile={root}/log/slurmd.%n.log
        ProctrackType=proctrack/linuxproc
        TaskPlugin=task/none
        SelectType=select/cons_tres
        SelectTypeParameters=CR_CPU
        SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
        SlurmdParameters=config_overrides
        MailProg=/bin/true
        JobAcctGatherType=jobacct_gather/none
        AccountingStorageType=accounting_storage/none
        ReturnToService=2
        SlurmdTimeout=5
        KillWait=10
        OverTimeLimit=0
        MinJobAge=600
        {nodes}PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
        """)


class Cluster:
    def __init__(self) -> None:
        # munged's socket directory must be 755 and its parents traversable: not under pytest's
        # 700 tmp directories
        self.root = Path(tempfile.mkdtemp(prefix="seed-slurm-"))
        self.root.chmod(0o755)
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(mode=0o755)
        self.names, self.hosts_line = _node_names()
        self.conf = self.root / "slurm.conf"
        self.env = {**ENV, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        munge = self.root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = munge / "munge.socket"
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}",
                               f"--socket={sock}", f"--pid-file={munge}/munged.pid",
                               f"--log-file={munge}/munged.log", f"--seed-file={munge}/seed"])
        ports = [free_port() for _ in range(3)]
        self.conf.write_text(_config(self.root, self.names, ports, sock))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for name in self.names:
            self.start_node(name)
        self.wait_idle()

    def _spawn(self, name: str, cmd: list[str]) -> None:
        self.daemons[name] = subprocess.Popen([_exe(cmd[0]), *cmd[1:]], env=self.env,
                                              stdin=subprocess.DEVNULL,
                                              stdout=open(self.root / "log" / f"{name}.out", "w"),
                                              stderr=subprocess.STDOUT)

    def start_node(self, name: str) -> None:
        self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])

    def slurm(self, *args: str) -> str:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=60).stdout

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.slurm("sinfo", "-h", "-N", "-o", "%T").split()
            if len(states) == len(self.names) and all(s == "idle" for s in states):
                return
            time.sleep(0.2)
        logs = "".join((self.root / "log" / f).read_text()[-1500:]
                       for f in ("slurmctld.out", f"slurmd-{self.names[0]}.out"))
        raise AssertionError(f"the test SLURM cluster did not come up: {states}\n{logs}")

    def job_state(self, job_id: str) -> dict[str, str]:
        return parse_fields(self.slurm("scontrol", "show", "job", "-o", job_id))

    def stop(self) -> None:
        self.slurm("scancel", "--user", "root")
        for proc in reversed(list(self.daemons.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.daemons.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.hosts_line:
            hosts = Path("/etc/hosts").read_text()
            Path("/etc/hosts").write_text(hosts.replace(self.hosts_line, ""))
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    missing = _missing()
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"{missing} (CI runs the SLURM tests: run `make test` as root)")
        pytest.skip(missing)
    started = time.time()
    c = Cluster()
    try:
        c.start()
        print(f"test SLURM cluster up in {time.time() - started:.1f} s under {c.root}")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def setup(cluster, tmp_path_factory) -> dict:
    """tests/test_train_stages.py's tiny distill data, and its uninterrupted 1-process run."""
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o755)
    shards = write_tiny_shards(root / "shards", [30, 25, 15])
    s = {**stage_inputs(root, "resnet10t", TINY), "shards": str(shards)}
    write_params(s, nodes=2)
    done = subprocess.run(command(s, "distill", "reference"), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    s["reference"] = outputs(s, "reference")
    return s


def write_params(setup: dict, **launch) -> None:
    launch = {"backend": "slurm", "log_dir": str(setup["root"] / "logs"), **launch}
    setup["params"].write_text(yaml.safe_dump({**TINY, "launch": launch}))


class Launch:
    """`python -m seed_core.cluster run` in the background, its output collected."""

    def __init__(self, cluster: Cluster, setup: dict, name: str, script: list[str] | None = None):
        script = script or command(setup, "distill", name, launcher=[])
        self.started = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "seed_core.cluster", "run", "--nproc", "1", "--name", name,
             "--", *script], cwd=setup["root"], env=cluster.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, lines), daemon=True)
                         for s, lines in ((self.proc.stdout, self.out),
                                          (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def job_id(self, timeout: float = 60.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in self.err:
                m = re.search(r"as slurm job (\d+)", line)
                if m:
                    return m.group(1)
            assert self.proc.poll() is None, "".join(self.err)
            time.sleep(0.1)
        raise AssertionError("no job submitted: " + "".join(self.err))

    def wait(self, timeout: float = 600.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return rc

    @property
    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)


def wait_until(predicate, launch: Launch, what: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert launch.proc.poll() is None, f"ended before {what}: {launch.text[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}: {launch.text[-3000:]}"
        time.sleep(0.1)


def has_checkpoint(setup: dict, name: str) -> bool:
    directory = setup["root"] / name / "ckpt"
    return directory.is_dir() and any(directory.glob("step-*.pt.sha256"))


def launch_to_first_checkpoint(cluster, setup: dict, name: str) -> tuple["Launch", str]:
    """Submit the distill stage as `name` and wait until its first checkpoint is written;
    returns the launch and its job id."""
    launch = Launch(cluster, setup, name)
    job = launch.job_id()
    wait_until(lambda: has_checkpoint(setup, name), launch, "a checkpoint")
    return launch, job


def sleeper(setup: dict, status: int | None = None) -> list[str]:
    """A stand-in stage that says it runs, then sleeps (or exits with `status`)."""
    path = setup["root"] / "sleeper.py"
    path.write_text("import sys, time\nprint('running', flush=True)\n"
                    "sys.exit(int(sys.argv[1])) if len(sys.argv) > 1 else time.sleep(600)\n")
    return [str(path), *([str(status)] if status is not None else [])]


@pytest.mark.slurm
def test_two_nodes_equal_one_process(cluster, setup) -> None:
    write_params(setup, nodes=2)
    launch = Launch(cluster, setup, "two-nodes")
    assert launch.wait() == 0, launch.text[-4000:]
    job = launch.job_id()
    assert f"[job {job}] seed_core.cluster: job {job} (run 1) on" in launch.text
    assert re.search(rf"\[job {job}\] .*2 rank\(s\)", launch.text)  # the stage's log, streamed
    assert_same_training(outputs(setup, "two-nodes"), setup["reference"], exact=False)


@pytest.mark.slurm
def test_scontrol_requeue_mid_run_resumes_to_the_same_weights(cluster, setup) -> None:
    write_params(setup, nodes=2)
    launch, job = launch_to_first_checkpoint(cluster, setup, "requeued")
    cluster.slurm("scontrol", "requeue", job)
    assert launch.wait() == 0, launch.text[-4000:]
    assert "requeued (restart 1)" in launch.text and "resumed from" in launch.text
    # SLURM's SIGTERM: both ranks wrote a checkpoint at one step before they ended (KillWait)
    stops = re.findall(r"stopped on SIGTERM with a checkpoint at (epoch \d+ step \d+)",
                       launch.text)
    assert len(stops) == 2 and len(set(stops)) == 1, launch.text[-4000:]
    assert re.search(rf"resumed from \S+ at {stops[0]}", launch.text), launch.text[-4000:]
    assert cluster.job_state(job)["Restarts"] == "1"
    assert_same_training(outputs(setup, "requeued"), setup["reference"], exact=False)


@pytest.mark.slurm
def test_a_time_limit_signals_the_job_which_requeues_itself_and_resumes(cluster, setup) -> None:
    """`--time=3` and SIGUSR1 90 s before it: SLURM's 30 s timer sends it 90 to 120 s into the
    run, after the rank has installed its handler even on a loaded machine. (With `--time=2`,
    30 to 60 s in, a rank still importing beside the other xdist worker's `dvc repro` was killed
    by the signal's default action before its first checkpoint; with 10 s, beside a concurrent
    `dvc repro`. The requeued run then passed nothing this test checks.) The ranks are held
    (SIGSTOP) after their first checkpoint until the batch script has the signal, so that it
    surely finds them unfinished, as a long run would be; the script passes it on, the rank
    writes a checkpoint where it stands and stops, and the job requeues itself and resumes
    there."""
    import psutil

    write_params(setup, nodes=1, time="3", signal_delay_s=90)
    launch, job = launch_to_first_checkpoint(cluster, setup, "time-limit")
    assert "SIGUSR1" not in launch.text and "(run 2)" not in launch.text, (
        "the time limit's signal came before the rank's first checkpoint (the machine is too "
        f"loaded for the 90 s this test allows): {launch.text[-3000:]}")
    script = str(ROOT / "stages" / "distill.py")
    held = [proc for proc in psutil.process_iter(["cmdline"])
            if (proc.info["cmdline"] or [])[1:2] == [script]
            and any("time-limit" in a for a in proc.info["cmdline"])]
    assert held, "found no rank of the time-limit job to hold"
    for proc in held:
        proc.suspend()  # the rank and its loader worker (not srun, not the waiting side)
    wait_until(lambda: "SIGUSR1, the time limit is near" in launch.text, launch, "SIGUSR1",
               timeout=180)
    for proc in held:
        proc.resume()
    assert launch.wait() == 0, launch.text[-4000:]
    stopped = re.search(r"stopped on SIGUSR1 with a checkpoint at (epoch \d+ step \d+)",
                        launch.text)
    assert stopped, launch.text[-4000:]
    assert "requeueing job" in launch.text
    assert re.search(rf"resumed from \S+ at {stopped.group(1)}", launch.text), launch.text[-4000:]
    assert int(cluster.job_state(job)["Restarts"]) >= 1
    # 1 process resumed vs 1 process uninterrupted: bit for bit
    assert_same_training(outputs(setup, "time-limit"), setup["reference"], exact=True)


@pytest.mark.slurm
def test_scancel_fails_the_waiting_command_within_seconds(cluster, setup) -> None:
    write_params(setup, nodes=2)
    launch = Launch(cluster, setup, "cancelled", sleeper(setup))
    job = launch.job_id()
    wait_until(lambda: "running" in "".join(launch.out), launch, "the job to run")
    cancelled = time.time()
    cluster.slurm("scancel", job)
    assert launch.wait(timeout=60) == 1
    assert time.time() - cancelled < 60
    log = setup["root"] / "logs" / f"cancelled-{job}.log"
    assert f"slurm job {job} (log: {log}) ended CANCELLED" in launch.text


@pytest.mark.slurm
def test_a_failed_task_fails_the_command_with_the_job_and_its_log(cluster, setup) -> None:
    write_params(setup, nodes=2)
    launch = Launch(cluster, setup, "failing", sleeper(setup, status=3))
    assert launch.wait(timeout=60) == 1
    job = launch.job_id()
    # srun's status: the first rank's 3, or the SIGTERM it sent the others (143)
    assert re.search(rf"slurm job {job} \(log: \S+failing-{job}\.log\) ended FAILED \(exit code "
                     r"[1-9]", launch.text), launch.text[-3000:]
    assert re.search(r"task \d: Exited with exit code 3", launch.text)  # the job's log, streamed


@pytest.mark.slurm
def test_sigterm_to_the_waiting_command_cancels_the_job(cluster, setup) -> None:
    write_params(setup, nodes=1)
    launch = Launch(cluster, setup, "interrupted", sleeper(setup))
    job = launch.job_id()
    wait_until(lambda: "running" in "".join(launch.out), launch, "the job to run")
    launch.proc.send_signal(signal.SIGTERM)
    assert launch.wait(timeout=30) == 128 + signal.SIGTERM
    assert f"SIGTERM: cancelled slurm job {job}" in launch.text
    deadline = time.time() + 30
    while cluster.job_state(job).get("JobState") != "CANCELLED":
        assert time.time() < deadline, cluster.job_state(job)
        time.sleep(0.2)


@pytest.mark.slurm
def test_a_lost_node_fails_the_command_within_a_minute(cluster, setup) -> None:
    """The second node dies whole: its slurmd, its step daemon and the rank it runs."""
    import psutil

    write_params(setup, nodes=2)
    launch, job = launch_to_first_checkpoint(cluster, setup, "lost-node")
    victim = next(n for n in cluster.names if n != cluster.job_state(job)["BatchHost"])
    ranks = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == victim:
            ranks.append(proc)
    assert ranks, "no rank found on the victim node"
    stepds = {p.parent() for p in ranks} - set(ranks)
    lost = time.time()
    cluster.daemons[f"slurmd-{victim}"].kill()
    for proc in [*stepds, *ranks]:
        try:
            proc.kill()
        except psutil.Error:
            pass
    try:
        assert launch.wait(timeout=90) == 1, launch.text[-3000:]
        assert time.time() - lost < 60, time.time() - lost
        # SLURM requeues a job whose node died (after SlurmdTimeout): the wait cancels it
        assert f"slurm job {job} (log: " in launch.text, launch.text[-3000:]
        assert f"lost node(s) {victim}" in launch.text, launch.text[-3000:]
    finally:  # the node comes back for whatever runs next
        cluster.start_node(victim)
        time.sleep(1)
        cluster.slurm("scontrol", "update", f"nodename={victim}", "state=resume")
        cluster.wait_idle()
    # the wait cancelled it (the job stays COMPLETING until the lost node is back to confirm)
    assert cluster.job_state(job)["JobState"] == "CANCELLED"
