"""The loop's guards, observed through the CLI: divergence stops the run (exit 3) without
saving, numeric config values must be finite, one run per output_dir (a lock), a resumed
run's config changes either apply (logged, config.N.yaml kept) or are refused by key,
Ctrl-C saves and exits 75, and small-data / interval mistakes are one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dist_utils import run_single

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "train.progress_bar=false", "train.tensorboard=false",
        "data.valid_path=", "train.eval_interval=0", "train.global_batch_size=8", "train.micro_batch_size=4"]


def cli(*args, popen=False):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "megatron_rlhf", "sft", "--config", "examples/tiny/sft.yaml", *TINY, *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_divergence_stops_the_run_without_saving(tmp_path):
    out = tmp_path / "diverge"
    r = cli("train.lr=1e6", "train.min_lr=0", "train.lr_warmup_steps=0", "train.max_steps=20", "train.clip_grad=0", "train.save_interval=1",
            "train.max_nonfinite_steps=2", f"output_dir={out}")
    assert r.returncode == 3, r.stderr[-3000:]
    assert "consecutive steps had non-finite loss or gradients" in r.stderr and "Traceback" not in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] < 20
    assert any(row.get("train/loss") == "nan" for row in rows)
    # every checkpoint written holds finite weights (a skipped step leaves the model as it was)
    saved = sorted((out / "checkpoints").glob("iter_*"))
    assert saved and all(run_single(_finite_weights, str(path)) for path in saved)


def _finite_weights(path):
    import torch

    from megatron_rlhf.checkpoint import load_policy

    model, *_ = load_policy(path)
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_numeric_config_values_must_be_finite(tmp_path):
    import pytest

    from megatron_rlhf.config import ConfigError, load_config

    for value in ("nan", ".inf", "-.inf"):  # the config's own check, which the CLI prints as one line (below)
        with pytest.raises(ConfigError, match="train.lr"):
            load_config(str(ROOT / "examples/tiny/sft.yaml"), [f"train.lr={value}"], stage="sft")
    r = cli("train.log_interval=0", f"output_dir={tmp_path / 'y'}")
    assert r.returncode == 2 and "train.log_interval=0" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = cli("train.global_batch_size=4096", "train.micro_batch_size=4", f"output_dir={tmp_path / 'z'}")
    assert r.returncode == 2 and "fewer than one global batch" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_one_run_per_output_dir(tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        import socket

        (out / ".lock").write_text(f"{socket.gethostname()} {holder.pid}\n")
        r = cli("train.max_steps=1", f"output_dir={out}")
        assert r.returncode == 2 and "in use by another run" in r.stderr and str(holder.pid) in r.stderr, r.stderr[-2000:]
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and is taken over, and the run releases it at the end
    r = cli("train.max_steps=1", f"output_dir={out}")
    assert r.returncode == 0 and "taking over the lock" in r.stderr, r.stderr[-2000:]
    assert not (out / ".lock").exists()


def test_config_changes_on_resume_apply_or_are_refused(tmp_path):
    out = tmp_path / "run"
    r = cli("train.max_steps=2", "train.lr=1e-3", "train.min_lr=1e-4", f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("train.max_steps=3", "train.lr=2e-3", "train.min_lr=2e-3", f"output_dir={out}")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    assert "config change on resume: train.lr 0.001 -> 0.002" in r.stderr and "train.max_steps 2 -> 3" in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[-1]["lr"] == 2e-3  # the new LR runs
    assert "lr: 0.002" in (out / "config.yaml").read_text() and "lr: 0.001" in (out / "config.1.yaml").read_text()
    r = cli("train.max_steps=4", "train.lr=2e-3", "train.min_lr=2e-3", "model.hidden_size=64", f"output_dir={out}")
    assert r.returncode == 2 and "model.hidden_size: 32 -> 64" in r.stderr and "new output_dir" in r.stderr, r.stderr[-2000:]
    assert "hidden_size: 32" in (out / "config.yaml").read_text()  # still describes the run on disk


def test_ctrl_c_finishes_the_step_saves_and_exits_75(tmp_path):
    out = tmp_path / "interrupted"
    proc = cli("train.max_steps=400", f"output_dir={out}", popen=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert latest == f"iter_{last_logged:07d}" and "Traceback" not in err
    r = cli(f"train.max_steps={last_logged + 1}", f"output_dir={out}")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]


# Root ignores permissions and the disk here has room, so the OS errors are injected: the CLI
# is run in a process whose file calls fail as a full disk or a read-only folder would.
INJECT = (
    "import errno, os, sys, pathlib, torch\n"
    "kind = sys.argv.pop(1)\n"
    "if kind == 'full':\n"
    "    real = torch.save\n"
    "    def save(obj, f, *a, **k):\n"
    "        if 'state.pt' in str(f): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))\n"
    "        return real(obj, f, *a, **k)\n"
    "    torch.save = save\n"
    "else:\n"
    "    def mkdir(self, *a, **k): raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))\n"
    "    pathlib.Path.mkdir = mkdir\n"
    "from megatron_rlhf.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_full_disk_and_unwritable_output_dir_are_one_line(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    common = ["sft", "--config", "examples/tiny/sft.yaml", *TINY, "train.max_steps=1"]
    r = subprocess.run([sys.executable, "-c", INJECT, "full", *common, f"output_dir={tmp_path / 'full'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 2 and "No space left on device; free disk space" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not list((tmp_path / "full" / "checkpoints").glob("iter_0000001"))  # no half-written checkpoint is committed
    r = subprocess.run([sys.executable, "-c", INJECT, "readonly", *common, f"output_dir={tmp_path / 'ro'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 2 and "Permission denied; make it writable or choose another output_dir" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
