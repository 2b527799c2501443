"""The tiny InstructGPT pipeline end to end on one GPU, through the CLI, as users run it:
``examples/tiny/run.sh OUT`` (SFT -> reward model -> PPO-ptx -> report) with every stage cut to
12 steps and the critic warm-up to 2 iterations (BF16 and, where installed, Transformer
Engine layers: the GPU defaults). Checked: every stage exits 0 and leaves a complete
checkpoint, every logged loss is finite, SFT's validation loss falls, PPO logged its
rollout reward and its actor trained, and the report was written.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpu_utils import ROOT, all_finite, env, metrics, ok, series

pytestmark = pytest.mark.gpu

SHORT = ["train.max_steps=12", "train.progress_bar=false", "train.tensorboard=false", "ppo.critic_warmup_steps=2"]


def test_tiny_pipeline_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    proc = subprocess.run(["bash", "examples/tiny/run.sh", str(out), *SHORT], cwd=ROOT, env=env(PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, ok(proc)
    for stage in ("sft", "rm", "ppo"):
        latest = out / stage / "checkpoints" / "latest"
        assert latest.is_file(), f"{stage}: no checkpoint"
        assert (out / stage / "checkpoints" / latest.read_text().strip() / "meta.json").is_file()
        rows = metrics(out / stage)
        losses = [v for r in rows for k, v in r.items() if k.endswith("loss") and isinstance(v, float)]
        assert losses and all_finite(losses), f"{stage}: losses {losses}"
    evals = series(out / "sft", "eval/loss")
    assert evals[max(evals)] < evals[min(evals)], f"SFT validation loss did not fall: {evals}"
    rewards = series(out / "ppo", "rollout/reward")
    assert sorted(rewards) == list(range(1, 13)) and all_finite(rewards.values()), rewards
    policy = series(out / "ppo", "policy/policy_loss")  # logged once the critic warm-up is over
    assert sorted(policy) == list(range(3, 13)) and all_finite(policy.values()), \
        f"actor updates: {policy}; PPO logged {sorted({k for r in metrics(out / 'ppo') for k in r})}"
    assert (out / "report" / "summary.md").is_file()
