"""PPO-ptx under pipeline parallelism: PP=2 (2 gloo processes, one layer a stage) gives the
metrics of PP=1 step by step, for sampled and greedy rollouts, through a checkpoint saved
and resumed at PP=2. (Pipelined generation itself is tested token for token in test_generation.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_utils import run_distributed, run_single
from test_ppo import ROOT, _args, _make_checkpoints

TOL = 1e-5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp_ppo")
    run_single(_make_checkpoints, str(root))
    return root


def _run_ppo(root, out, pp):
    """In-process PPO (no CLI, no torchrun): 1 step and a checkpoint, then a resume that runs
    step 2; then one greedy step in another run. Returns each run's metrics rows."""
    from megatron.core import parallel_state

    from megatron_rlhf.config import load_config
    from megatron_rlhf.recipes import ppo

    def config(run_dir, *extra):
        args = _args(Path(root), run_dir, f"parallel.pipeline_model_parallel_size={pp}", "train.lr=1e-3", *extra)
        return load_config(ROOT / args[args.index("--config") + 1], [a for a in args[3:] if "=" in a])

    sampled = f"{out}/sampled"
    first = ppo.run(config(sampled, "train.max_steps=1", "train.save_interval=1"))
    resumed = ppo.run(config(sampled, "train.max_steps=2", "train.save_interval=0"))
    greedy = ppo.run(config(f"{out}/greedy", "train.max_steps=1", "ppo.temperature=0"))

    def rows(run_dir):
        path = Path(run_dir) / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else None

    return {
        "status": [first, resumed, greedy],
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "sampled": rows(sampled),
        "greedy": rows(f"{out}/greedy"),
        "latest": (Path(sampled) / "checkpoints" / "latest").read_text().strip(),
    }


def _max_diffs(got, expected):
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    diffs = {}
    for g, e in zip(got, expected):
        for key, value in e.items():
            if key.startswith("time/") or key in ("tokens_per_s", "step"):
                continue
            assert key in g, key
            # relative above 1 (gradient norms of a few units), absolute below
            diffs[key] = max(diffs.get(key, 0.0), abs(g[key] - value) / max(1.0, abs(value)))
    return diffs


def test_pp2_ppo_matches_pp1(ckpts, tmp_path):
    ref = run_single(_run_ppo, str(ckpts), str(tmp_path / "pp1"), 1)
    results = run_distributed(_run_ppo, 2, str(ckpts), str(tmp_path / "pp2"), 2)
    assert [r["pp"] for r in results] == [2, 2] and ref["pp"] == 1
    pp2 = results[0]  # rank 0 (the first stage) writes metrics.jsonl
    for res in (ref, pp2):
        assert [(r["status"], r["step"]) for r in res["status"]] == [("done", 1), ("done", 2), ("done", 1)]
        assert res["latest"] == "iter_0000002"
    assert [r["step"] for r in ref["sampled"]] == [1, 2]  # step 2 ran after the resume
    for key in ("rollout/reward", "rollout/kl", "policy/policy_loss", "value/loss", "ptx/loss", "policy/entropy"):
        assert all(key in r for r in ref["sampled"] + ref["greedy"]), key
    diffs = {"sampled": _max_diffs(pp2["sampled"], ref["sampled"]), "greedy": _max_diffs(pp2["greedy"], ref["greedy"])}
    print("max |PP2 - PP1| per metric:", json.dumps(diffs, indent=1))
    for kind, d in diffs.items():
        bad = {k: v for k, v in d.items() if v > TOL}
        assert not bad, (kind, bad)
    # the rollouts are not degenerate: responses have length and the metrics move between steps
    assert ref["sampled"][0]["rollout/response_length"] > 1
    assert ref["sampled"][0]["rollout/reward"] != ref["sampled"][1]["rollout/reward"]
