"""The launcher of the training stages: torchrun on this machine, or one SLURM job that DVC waits on.

`python -m seed_core.cluster run --nproc N -- stages/distill.py ARGS` is the command of every
stage that runs under torchrun (pretrain@*, distill). It reads the `launch` section of the stage's
params file at run time, so launch settings are no DVC params: switching the backend re-runs
nothing. With `launch.backend: local` it becomes `torchrun --standalone --nproc_per_node N ...`,
or, for one process, the stage itself (torchrun's start-up, ~2 s, buys nothing there: one process
joins no process group), through `seed_core/warm.py` when a warm start is asked for.
With `slurm` it writes a batch script (`batch_script`, a pure function of the params), submits it
with `sbatch` and blocks until the job has ended, streaming its log:

- one job of `launch.nodes` nodes x N tasks per node; each task is one rank, whose
  RANK/WORLD_SIZE/LOCAL_RANK come from SLURM (`task_env`), and MASTER_ADDR is the first node;
- the job asks for SIGUSR1 `launch.signal_delay_s` before its time limit; its batch script
  passes it to the ranks, which write a checkpoint at their next step boundary and stop
  (`seed_core.train.stop`), and then requeues the job, which resumes from that checkpoint.
  SLURM's own requeues (preemption, `scontrol requeue`) send the ranks SIGTERM, which they
  answer the same way within the cluster's KillWait; the wait goes on;
- any other end (cancelled, failed, timed out, a lost node) fails the command within seconds,
  naming the job and its log; Ctrl-C or SIGTERM cancels the job.

Only `squeue`/`scontrol` are polled: without slurmdbd there is no `sacct`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

from seed_core import warm
from seed_core.config import LaunchConfig, load_params
from seed_core.io import UserError

PREFIX = "seed_core.cluster"
# states after which the job never runs again (as `scontrol show job` spells them)
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REQUEUE_HOLD", "REVOKED"}
# what SLURM writes to a job's log when one of its nodes was lost
NODE_FAILURE_MARKS = ("DUE TO NODE FAILURE", "srun: error: Node failure")
# node states that mean the node is gone, not merely busy or drained by an admin
LOST_NODE_STATES = ("DOWN", "NOT_RESPONDING", "FAIL", "POWERED_DOWN", "POWER_DOWN")


class ClusterError(UserError):
    """The job could not be submitted, or it ended without finishing the stage."""


# ----------------------------------------------------------------------------- the batch script


def sbatch_directives(launch: LaunchConfig, nproc: int, job_name: str, log_path: str,
                      workdir: str) -> list[str]:
    """The `#SBATCH` options of the stage's job (`log_path` may hold SLURM's `%j`)."""
    options = [f"--job-name={job_name}", f"--nodes={launch.nodes}",
               f"--ntasks-per-node={nproc}", f"--output={log_path}",
               # a requeued run appends to the log of the first, so the wait streams one file
               "--open-mode=append", f"--chdir={workdir}", "--requeue",
               # B: only the batch shell gets it; it passes it to the ranks, which write a
               # checkpoint and stop, then requeues the job
               f"--signal=B:USR1@{launch.signal_delay_s}"]
    optional = {"partition": launch.partition, "account": launch.account, "qos": launch.qos,
                "time": launch.time, "mem": launch.mem, "constraint": launch.constraint,
                "gpus-per-task": launch.gpus_per_task, "cpus-per-task": launch.cpus_per_task}
    options += [f"--{name}={value}" for name, value in optional.items() if value]
    options += list(launch.sbatch_args)
    return options


def batch_script(launch: LaunchConfig, nproc: int, command: Sequence[str], job_name: str,
                 log_path: str, workdir: str, python: str = sys.executable) -> str:
    """The job's bash script: `command` (a stage script and its argv) once per task, as rank
    SLURM_PROCID of SLURM_NTASKS, rendezvousing on the first node."""
    directives = "".join(f"#SBATCH {shlex.quote(o)}\n"
                         for o in sbatch_directives(launch, nproc, job_name, log_path, workdir))
    task = shlex.join([python, "-m", "seed_core.cluster", "task", "--", *command])
    py = shlex.quote(python)
    return f"""#!/bin/bash
{directives}# written by `python -m {PREFIX} run`; the job's first node runs this script
set -u
echo "{PREFIX}: job $SLURM_JOB_ID (run $((${{SLURM_RESTART_COUNT:-0}} + 1))) on $SLURM_JOB_NODELIST"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# a free port on this node, which is the first one (the rendezvous host)
MASTER_PORT=$({py} -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
export MASTER_ADDR MASTER_PORT PYTHONUNBUFFERED=1
requeued=0
saved=
requeue() {{
  kill -0 "$task" 2>/dev/null || return 0  # the stage has ended: nothing to resume
  echo "{PREFIX}: SIGUSR1, the time limit is near: the ranks write a checkpoint and stop"
  kill -USR1 "$task"  # srun passes it to every task (seed_core.train.stop)
  while :; do
    wait "$task"; saved=$?
    kill -0 "$task" 2>/dev/null || break
  done
  if [ "$saved" = 0 ]; then return 0; fi  # the stage finished before it saw the signal
  echo "{PREFIX}: requeueing job $SLURM_JOB_ID; the stage resumes from that checkpoint"
  scontrol requeue "$SLURM_JOB_ID" && requeued=1
}}
trap requeue USR1
# in the background, so that the trap runs as soon as the signal arrives
srun --kill-on-bad-exit=1 {task} &
task=$!
while :; do
  wait "$task"; status=$?
  kill -0 "$task" 2>/dev/null || break  # a trapped signal ended `wait`, not srun: wait again
done
# srun ended inside the trap: its status is the one the trap saw
if [ -n "$saved" ]; then status=$saved; fi
# requeued: SLURM ends this run of the script itself; exiting first could record a failure
if [ "$requeued" = 1 ]; then sleep 300; fi
exit "$status"
"""


def task_env(environ: dict[str, str]) -> dict[str, str]:
    """torch.distributed's variables for one SLURM task (as torchrun would set them)."""
    world = int(environ["SLURM_NTASKS"])
    nodes = int(environ.get("SLURM_JOB_NUM_NODES", environ.get("SLURM_NNODES", "1")))
    local_world = environ.get("SLURM_NTASKS_PER_NODE", str(max(1, world // nodes)))
    return {**environ, "RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(world),
            "LOCAL_RANK": environ["SLURM_LOCALID"], "LOCAL_WORLD_SIZE": local_world,
            "GROUP_RANK": environ.get("SLURM_NODEID", "0")}


def local_command(nproc: int, command: Sequence[str], python: str = sys.executable) -> list[str]:
    """`torchrun --standalone` on this machine; one process runs the stage script directly (it
    then joins no process group either way, and signals reach it without torchrun between)."""
    if nproc == 1:
        if warm.enabled(os.environ):  # handed to a process with torch imported
            return [python, str(Path(warm.__file__).resolve()), *command]
        return [python, *command]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), *command]


# ----------------------------------------------------------------------------- waiting on a job


def parse_fields(text: str) -> dict[str, str]:
    """`Key=value` pairs of one `scontrol show ... -o` line (values without spaces suffice)."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)", text))


def _slurm(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def job_info(job_id: str) -> dict[str, str] | None:
    """The job's fields from `scontrol show job`; None once SLURM no longer knows it."""
    done = _slurm(["scontrol", "show", "job", "-o", job_id])
    if done.returncode == 0 and "JobState=" in done.stdout:
        return parse_fields(done.stdout)
    if "Invalid job id" in done.stderr:
        return None
    raise ClusterError(f"scontrol show job {job_id}: {done.stderr.strip() or done.stdout}")


def lost_nodes(node_list: str) -> list[str]:
    """The nodes of `node_list` (SLURM's compact form) that SLURM considers gone."""
    if not node_list or node_list == "(null)":
        return []
    done = _slurm(["scontrol", "show", "node", "-o", node_list])
    lost = []
    for line in done.stdout.splitlines():
        node = parse_fields(line)
        if any(s in node.get("State", "") for s in LOST_NODE_STATES):
            lost.append(node.get("NodeName", "?"))
    return lost


class LogTail:
    """The new lines of a job's log, each prefixed with the job id."""

    def __init__(self, path: Path, job_id: str, out: TextIO) -> None:
        self.path, self.job_id, self.out = path, job_id, out
        self.offset, self.partial, self.text_seen = 0, "", ""

    def pump(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        text = self.partial + data.decode(errors="replace")
        lines = text.split("\n")
        self.partial = "" if final else lines.pop()
        for line in lines if not final else [ln for ln in lines if ln]:
            self.out.write(f"[job {self.job_id}] {line}\n")
            # the marks SLURM writes about the job itself are short: remember the recent text
            self.text_seen = (self.text_seen + line + "\n")[-20000:]
        self.out.flush()


@dataclass
class Watch:
    """What the wait has seen of a job: its requeues, the nodes of its last run."""

    restarts: int = 0
    nodes: str = ""


def wait_for_job(job_id: str, log_path: Path, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr, poll_s: float = 1.0,
                 info: Callable[[str], dict[str, str] | None] = job_info) -> None:
    """Block until the job has ended: return if it COMPLETED, raise ClusterError otherwise;
    requeued runs (time limit, preemption, `scontrol requeue`) are waited for, a lost node
    is not (the job is cancelled). Streams the log to `out` meanwhile."""
    tail, watch = LogTail(log_path, job_id, out), Watch()
    where = f"slurm job {job_id} (log: {log_path})"
    failed_once: str | None = None
    unreachable_since: float | None = None
    while True:
        tail.pump()
        try:
            fields = info(job_id)
            unreachable_since = None
        except (ClusterError, subprocess.TimeoutExpired) as error:
            # slurmctld restarting or busy: retry for a while before giving up
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > 120:
                raise ClusterError(f"{where}: cannot ask SLURM about it: {error}") from None
            time.sleep(poll_s)
            continue
        if fields is None:
            tail.pump(final=True)
            raise ClusterError(f"{where}: SLURM no longer knows the job (purged after "
                               f"MinJobAge?); see its log")
        state = fields.get("JobState", "")
        restarts = int(fields.get("Restarts", "0") or 0)
        if state == "RUNNING" and fields.get("NodeList", "(null)") != "(null)":
            watch.nodes = fields["NodeList"]
        if restarts > watch.restarts:
            watch.restarts = restarts
            lost = lost_nodes(watch.nodes)
            if lost or any(m in tail.text_seen for m in NODE_FAILURE_MARKS):
                cancel(job_id)
                tail.pump(final=True)
                raise ClusterError(f"{where}: lost node(s) {', '.join(lost) or watch.nodes}; "
                                   f"the job was requeued by SLURM and is now cancelled")
            print(f"{PREFIX}: {where} was requeued (restart {restarts}); waiting for it to "
                  f"run again", file=err, flush=True)
        if state == "COMPLETED":
            tail.pump(final=True)
            return
        if state in FAILED_STATES:
            # confirmed on a second look: a requeue can pass through PREEMPTED
            if failed_once == state:
                tail.pump(final=True)
                raise ClusterError(f"{where} ended {state} (exit code "
                                   f"{fields.get('ExitCode', '?')}, reason "
                                   f"{fields.get('Reason', '?')})")
            failed_once = state
        else:
            failed_once = None
        time.sleep(poll_s)


def cancel(job_id: str) -> None:
    _slurm(["scancel", job_id])


def submit(script: Path) -> str:
    """`sbatch` the script; returns the job id."""
    try:
        done = _slurm(["sbatch", "--parsable", str(script)])
    except FileNotFoundError:
        raise ClusterError("launch.backend is slurm but `sbatch` is not on PATH: run on a SLURM "
                           "login node, or set launch.backend: local") from None
    if done.returncode != 0:
        raise ClusterError(f"sbatch {script} failed: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run_on_slurm(launch: LaunchConfig, nproc: int, command: Sequence[str], name: str,
                 workdir: Path) -> int:
    """Submit the stage as one job, wait for its end; Ctrl-C / SIGTERM cancel it."""
    log_dir = (workdir / launch.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    script = log_dir / f"{name}.sbatch"
    script.write_text(batch_script(launch, nproc, command, f"seed-{name}",
                                   str(log_dir / f"{name}-%j.log"), str(workdir.resolve())))

    def interrupted(signum: int, _frame) -> None:
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    job_id = None
    try:
        job_id = submit(script)
        log_path = log_dir / f"{name}-{job_id}.log"
        print(f"{PREFIX}: submitted {name} as slurm job {job_id} ({launch.nodes} node(s) x "
              f"{nproc} task(s)); log: {log_path}; watch it with `squeue -j {job_id}`",
              file=sys.stderr, flush=True)
        wait_for_job(job_id, log_path)
        print(f"{PREFIX}: slurm job {job_id} completed", file=sys.stderr, flush=True)
        return 0
    except _Interrupted as stop:
        what = signal.Signals(stop.signum).name
        if job_id is None:
            print(f"{PREFIX}: {what} while submitting: check `squeue --me` for a job "
                  f"seed-{name}", file=sys.stderr, flush=True)
        else:
            cancel(job_id)
            print(f"{PREFIX}: {what}: cancelled slurm job {job_id} (log: "
                  f"{log_dir / f'{name}-{job_id}.log'})", file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- command line


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        raise SystemExit(f"usage: python -m {PREFIX} run --nproc N -- SCRIPT [ARGS...]")
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def stage_params(command: list[str]) -> tuple[str, list[str]]:
    """The stage's own `--params` and `--set` (its launch section is read from the same file)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = parser.parse_known_args(command[1:])
    return known.params, known.overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["task"]:  # inside the job: one rank
        _, command = _split(argv[1:])
        os.execve(sys.executable, [sys.executable, *command], task_env(dict(os.environ)))
    ours, command = _split(argv)
    parser = argparse.ArgumentParser(prog=f"python -m {PREFIX}", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["run"])
    parser.add_argument("--nproc", type=int, required=True, help="ranks per node (<stage>.nproc)")
    parser.add_argument("--name", help="job and log name (default: the script's name)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the torchrun command or the batch script, run nothing")
    args = parser.parse_args(ours)
    if not command:
        parser.error("no stage script after --")
    try:
        params_path, overrides = stage_params(command)
        launch = load_params(params_path, overrides).launch
    except UserError as error:
        print(f"{PREFIX}: {error}", file=sys.stderr)
        return 1
    name = args.name or Path(command[0]).stem
    if launch.backend == "local":
        cmd = local_command(args.nproc, command)
        if args.dry_run:
            print(shlex.join(cmd))
            return 0
        os.execv(cmd[0], cmd)
    if args.dry_run:
        print(batch_script(launch, args.nproc, command, f"seed-{name}",
                           str(Path(launch.log_dir).resolve() / f"{name}-%j.log"),
                           str(Path.cwd())))
        return 0
    try:
        return run_on_slurm(launch, args.nproc, command, name, Path.cwd())
    except ClusterError as error:
        print(f"{PREFIX}: {error}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
