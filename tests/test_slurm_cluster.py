"""The real slurm/ job scripts on a real single-node Slurm cluster (slurmctld, slurmd and munge on
loopback, started by tests/slurm/local_slurm.sh): `sbatch --wait` of the tiny SFT, RM and PPO
scripts (2 CPU tasks, gloo, TP=2), and a PPO job that is preempted with Slurm's warning signal,
checkpoints, is requeued and resumes from its checkpoint to the end.

Needs root (the daemons run as root) and Debian's slurmctld/slurmd/slurm-client/munge, which the
fixture apt-installs when they are missing (.ci/run installs them up front). It skips, saying why,
only when it cannot have them: not root, or the packages are missing and cannot be installed.
Each stage runs a handful of small steps; the file takes about 3-4 minutes on 2 cores."""
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "slurm" / "local_slurm.sh"
DAEMONS = ("slurmctld", "slurmd", "sbatch", "munged")
# Small PPO iterations: 16 episodes of at most 8 new tokens, one 16-episode mini-batch.
PPO_SMALL = ["train.global_batch_size=16", "ppo.mini_batch_size=16", "train.micro_batch_size=8", "ppo.max_new_tokens=8",
             "ppo.critic_warmup_steps=0"]  # two steps: let the actor train from the first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _have_slurm() -> bool:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return all(shutil.which(d, path=path) for d in DAEMONS)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running local cluster; yields the environment to submit with (SLURM_CONF set)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: tests/slurm/local_slurm.sh runs munged, slurmctld and slurmd as root")
    if not _have_slurm():
        r = subprocess.run(["bash", str(FIXTURE), "install"], capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not _have_slurm():
            tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
            pytest.skip(f"Slurm packages (slurmctld slurmd slurm-client munge) are missing and apt-get could not install them: {tail}")
    state = tmp_path_factory.mktemp("slurm") / "cluster"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(LOCAL_SLURM_CTLD_PORT=str(_free_port()), LOCAL_SLURM_SLURMD_PORT=str(_free_port()))
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    try:
        r = subprocess.run(["bash", str(FIXTURE), "start", str(state)], env=env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.fail(f"the local Slurm cluster did not start (rc {r.returncode}):\n{r.stderr[-3000:]}")
        for line in r.stdout.splitlines():
            m = re.match(r"export (\w+)=(.*)$", line)
            if m:
                env[m.group(1)] = m.group(2)
        assert "SLURM_CONF" in env, r.stdout
        yield env
    finally:
        subprocess.run(["bash", str(FIXTURE), "purge", str(state)], env=env, capture_output=True, text=True, timeout=120)


def _sbatch_wait(env, logs: Path, script: str, *overrides, timeout=300):
    """`sbatch --wait slurm/<script> overrides...` from the repository root; returns (rc, log text)."""
    logs.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["sbatch", "--wait", f"--output={logs}/%x-%j.out", f"slurm/{script}", *overrides],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    m = re.search(r"Submitted batch job (\d+)", r.stdout)
    assert m, f"sbatch did not submit: {r.stdout}{r.stderr}"
    log = logs / f"{script[:-3]}-{m.group(1)}.out"
    return r.returncode, (log.read_text() if log.exists() else f"(no log {log}) {r.stderr}")


def _metrics(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.fixture(scope="module")
def tiny_policy_and_rm(slurm, tmp_path_factory):
    """The tiny SFT model and reward model, each trained a few steps by its own Slurm job."""
    out = tmp_path_factory.mktemp("stages")
    rc, log = _sbatch_wait(slurm, out / "logs", "sft_tiny.sh", f"output_dir={out}/sft", "train.max_steps=4", "train.eval_interval=0")
    assert rc == 0, log
    assert (out / "sft/checkpoints/best").exists() and len(_metrics(out / "sft")) >= 4, log
    rc, log = _sbatch_wait(slurm, out / "logs", "rm_tiny.sh", f"output_dir={out}/rm", f"model.init_from={out}/sft/checkpoints/best",
                           "train.max_steps=3", "train.eval_interval=0", "rm.normalize=false")
    assert rc == 0, log
    assert (out / "rm/checkpoints/latest").exists(), log
    return out / "sft/checkpoints/best", out / "rm"


def test_sbatch_wait_tiny_ppo_two_tasks_tp2(slurm, tiny_policy_and_rm, tmp_path):
    sft, rm = tiny_policy_and_rm
    run = tmp_path / "ppo"
    rc, log = _sbatch_wait(slurm, tmp_path / "logs", "ppo_tiny.sh", f"output_dir={run}", f"model.init_from={sft}",
                           f"ppo.reward_model={rm}", "train.max_steps=2", *PPO_SMALL)
    assert rc == 0, log
    assert log.count("layout: nodes=1 gpus_per_node=2 tp=2 pp=1 dp=1") == 1, log
    assert "--ntasks-per-node=2" in log and "parallel.backend=gloo" in log and "finished" in log, log
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2], rows
    for key in ("rollout/reward", "rollout/kl", "policy/clipfrac", "value/loss", "ptx/loss"):
        assert all(key in r for r in rows), (key, rows[-1])
    assert (run / "checkpoints/latest").exists()


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tiny_policy_and_rm, tmp_path):
    """Slurm's warning signal (as `--signal=B:USR1@N` sends it) reaches the running PPO job: it
    saves a checkpoint at the end of the step, exits 75, slurm/launch.sh requeues the job, and
    the requeued job (same id) resumes from that checkpoint and runs to the last step."""
    sft, rm = tiny_policy_and_rm
    run, logs, steps = tmp_path / "ppo", tmp_path / "logs", 5
    logs.mkdir()
    proc = subprocess.Popen(
        ["sbatch", "--wait", f"--output={logs}/%x-%j.out", "slurm/ppo_tiny.sh", f"output_dir={run}", f"model.init_from={sft}",
         f"ppo.reward_model={rm}", f"train.max_steps={steps}", *PPO_SMALL],
        cwd=ROOT, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = None
    try:
        m = re.search(r"Submitted batch job (\d+)", proc.stdout.readline())
        assert m, "sbatch did not submit"
        job = m.group(1)
        deadline = time.monotonic() + 240
        while not _metrics(run):  # the first step is done: the trainer is in its step loop
            assert proc.poll() is None and time.monotonic() < deadline, "the job ended or stalled before its first step"
            time.sleep(0.5)
        r = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        seen_checkpoint = None  # the first complete checkpoint: checkpoints/latest names it once it is whole
        latest = run / "checkpoints" / "latest"
        while seen_checkpoint is None and proc.poll() is None and time.monotonic() < deadline:
            seen_checkpoint = latest.read_text().strip() if latest.exists() else None
            time.sleep(0.2)
        rc = proc.wait(timeout=max(10, deadline - time.monotonic() + 60))
    finally:
        if proc.poll() is None:
            if job:
                subprocess.run(["scancel", job], env=slurm, timeout=30)
            proc.kill()
    log = (logs / f"ppo_tiny-{job}.out").read_text()
    assert rc == 0, log
    m = re.search(r"megatron-rlhf ppo: preempted at step (\d+); checkpoint saved", log)
    assert m, log
    k = int(m.group(1))
    assert 1 <= k < steps, log
    assert seen_checkpoint == f"iter_{k:07d}", (seen_checkpoint, log)  # the first checkpoint is the preemption's
    assert "got SIGUSR1: forwarding USR1" in log and f"requeueing job {job}" in log, log
    assert f"job {job} (ppo_tiny) restart 1 on" in log, log
    assert f"resumed from {run}/checkpoints/iter_{k:07d} at step {k}" in log, log
    assert log.rstrip().endswith("finished"), log
    # every step exactly once: the requeued job went on from step k instead of starting over
    assert [r["step"] for r in _metrics(run)] == list(range(1, steps + 1))
    assert (run / f"checkpoints/iter_{steps:07d}").exists()
