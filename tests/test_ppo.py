"""PPO-ptx stage end to end on small random models: the four models start where they must,
the frozen ones never move, beta and gamma act, the reward climbs, a killed run resumes
bitwise, and bad inputs fail clearly. (The maths is tested against hand-computed numbers
in test_algorithms_*.py; KV-cache generation and TP log-probs in test_generation.py and
test_logprobs.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import run_single

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples/tiny/tokenizer.model"
DATA = ROOT / "examples/tiny/data"
ARCH = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=40)
QUIET = ["train.progress_bar=false", "train.tensorboard=false"]


def cli(*args, timeout=400, **popen):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "megatron_rlhf", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _model_cfg(tokenizer=TOKENIZER):
    from megatron_rlhf.config import ModelConfig

    return ModelConfig(flavour="gpt2", tokenizer=str(tokenizer), hidden_dropout=0.0, attention_dropout=0.0, **ARCH)


def _make_checkpoints(root):
    """A random SFT policy, a random reward model (a head large enough to give rewards of
    order 1), and a reward model of another vocabulary."""
    from megatron_rlhf.config import Config, ParallelConfig
    from megatron_rlhf.data import Tokenizer, train_tokenizer
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.models.reward import scalar_head
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.checkpoint import checkpoint_meta
    from megatron_rlhf import checkpoint as ckpt_lib

    root = Path(root)
    text = root / "text.txt"
    text.write_text("\n".join(json.loads(line)["prompt"] + " " + json.loads(line)["response"] for line in (DATA / "sft_train.jsonl").read_text().splitlines()[:300]))
    train_tokenizer([text], 400, root / "other")
    for name, tokenizer_path, scalar, kind in (
        ("sft", TOKENIZER, False, "policy"), ("rm", TOKENIZER, True, "reward"), ("rm_other", root / "other.model", True, "reward"),
    ):
        tokenizer = Tokenizer.load(tokenizer_path)
        cfg = Config(stage="rm" if scalar else "sft", model=_model_cfg(tokenizer_path))
        init_distributed(cfg.parallel, cfg.model)
        model = build_model(cfg.model, ParallelConfig(), tokenizer.vocab_size, scalar_head=scalar, seed=7 if scalar else 1)
        if scalar:
            g = torch.Generator().manual_seed(11)
            with torch.no_grad():
                scalar_head(model).weight.copy_(torch.randn(scalar_head(model).weight.shape, generator=g) * 0.5)
        ckpt_lib.save_checkpoint(root / name / "checkpoints", 1, {"model": model}, checkpoint_meta(cfg, tokenizer, kind), tokenizer_bytes=tokenizer.serialized_model())


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    run_single(_make_checkpoints, str(root))
    return root


def _args(root, out, *extra):
    arch = [f"model.{k}={v}" for k, v in ARCH.items()]
    return [
        "ppo", "--config", "examples/tiny/ppo.yaml", *arch, *QUIET,
        f"model.init_from={root / 'sft'}", f"ppo.reward_model={root / 'rm'}", f"output_dir={out}",
        "train.global_batch_size=16", "train.micro_batch_size=8", "ppo.mini_batch_size=8", "ppo.max_new_tokens=8",
        "ppo.ptx_ratio=1.0", "ppo.critic_warmup_steps=0", *extra,
    ]


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _series(out, key):
    return [r[key] for r in _rows(out) if key in r]


# ------------------------------------------------------------------ the four models


def _four_models(root, out):
    from megatron_rlhf.config import load_config
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.recipes.ppo import PPORecipe
    from megatron_rlhf.training.loop import setup
    from megatron_rlhf import checkpoint as ckpt_lib

    args = _args(Path(root), out, "train.lr=1e-3", "train.max_steps=2")
    cfg = load_config(args[args.index("--config") + 1], [a for a in args[3:] if "=" in a])
    trainer = PPORecipe(setup(cfg))

    def params(model):
        return {k.replace("module.", ""): v.detach().clone() for k, v in model.named_parameters()}

    def frozen_params(model):
        return {k: v.detach().clone() for k, v in model.named_parameters()}

    rm = build_model(cfg.model, cfg.parallel, trainer.vocab, scalar_head=True, seed=123)
    ckpt_lib.load_weights(rm, ckpt_lib.resolve_checkpoint(Path(root) / "rm"), "model")
    rm_weights = frozen_params(rm)
    critic_start, actor_start = params(trainer.critic), params(trainer.actor)
    reference_start, reward_model_start = frozen_params(trainer.reference), frozen_params(trainer.reward_model)
    optimized = {id(p) for opt in trainer.optimizers.values() for g in opt.param_groups for p in g["params"]}
    for step in range(2):
        episodes, _ = trainer.rollout(step)
        trainer.update(episodes, step)
    return {
        "critic_equals_rm": sorted(critic_start) == sorted(rm_weights) and all(torch.equal(critic_start[k], rm_weights[k]) for k in rm_weights),
        "reward_model_equals_rm": all(torch.equal(reward_model_start[k], rm_weights[k]) for k in rm_weights),
        "reference_unchanged": all(torch.equal(v, dict(trainer.reference.named_parameters())[k]) for k, v in reference_start.items()),
        "reward_model_unchanged": all(torch.equal(v, dict(trainer.reward_model.named_parameters())[k]) for k, v in reward_model_start.items()),
        "actor_moved": max((v - params(trainer.actor)[k]).abs().max().item() for k, v in actor_start.items()),
        "critic_moved": max((v - params(trainer.critic)[k]).abs().max().item() for k, v in critic_start.items()),
        "frozen_have_grad": any(p.requires_grad or p.grad is not None for m in (trainer.reference, trainer.reward_model) for p in m.parameters()),
        "frozen_in_optimizer": any(id(p) in optimized for m in (trainer.reference, trainer.reward_model) for p in m.parameters()),
    }


def test_critic_starts_from_the_rm_and_frozen_models_never_change(ckpts, tmp_path):
    r = run_single(_four_models, str(ckpts), str(tmp_path / "run"))
    assert r["critic_equals_rm"] and r["reward_model_equals_rm"], r
    assert r["reference_unchanged"] and r["reward_model_unchanged"], r
    assert r["actor_moved"] > 0 and r["critic_moved"] > 0, r  # the check above is not vacuous
    assert not r["frozen_have_grad"] and not r["frozen_in_optimizer"], r


# ------------------------------------------------------------------ beta, gamma and the reward


@pytest.fixture(scope="module")
def ablation(ckpts):
    """The same 10-step run three times: beta=0.2 gamma=27.8, then beta=0, then gamma=0."""
    common = ["train.lr=3e-3", "train.min_lr=3e-3", "train.max_steps=10", "ppo.critic_lr=1e-3", "ppo.kl_coef=0.2"]
    runs = {"default": [], "beta0": ["ppo.kl_coef=0.0"], "gamma0": ["ppo.ptx_coef=0.0"]}
    for name, extra in runs.items():
        r = cli(*_args(ckpts, ckpts / name, *common, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
    return {name: ckpts / name for name in runs}


def test_metrics_contract(ablation):
    rows = _rows(ablation["default"])
    assert [r["step"] for r in rows] == list(range(1, 11))
    for key in ("rollout/reward", "rollout/kl", "rollout/response_length", "policy/clipfrac", "policy/approx_kl", "policy/entropy",
                "value/loss", "ptx/loss", "time/generate_s", "time/score_s", "time/train_s", "tokens_per_s"):
        assert all(key in r and r[key] == r[key] for r in rows), key


def test_reward_climbs_while_kl_stays_bounded(ablation):
    reward, kl = _series(ablation["default"], "rollout/reward"), _series(ablation["default"], "rollout/kl")
    first, last = sum(reward[:2]) / 2, sum(reward[-2:]) / 2
    assert last > first + 0.1, reward
    assert max(kl) < 5.0, kl


def test_the_kl_penalty_acts(ablation):
    """The penalty is in the reward: with beta > 0 each episode's non-score reward is
    -beta * KL, with beta = 0 exactly 0, and the KL it pushes against is the rollouts' own."""
    default, beta0 = _rows(ablation["default"]), _rows(ablation["beta0"])
    assert all(r["rollout/non_score_reward"] == 0.0 for r in beta0)
    for r in default:
        assert abs(r["rollout/non_score_reward"] + r["rollout/kl_coef"] * r["rollout/kl"]) < 1e-5, r
    assert any(r["rollout/non_score_reward"] != 0.0 for r in default)


def test_the_ptx_term_acts(ablation):
    with_ptx, without = _series(ablation["default"], "ptx/loss"), _series(ablation["gamma0"], "ptx/loss")
    assert len(without) == 10  # with gamma=0 the pretraining loss is still measured
    assert sum(with_ptx[-3:]) < sum(without[-3:]), (with_ptx, without)


# ------------------------------------------------------------------ resume


def _comparable(out):
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in _rows(out)}


def test_killed_run_resumes_bitwise(ckpts, tmp_path):
    common = ["train.lr=1e-3", "train.max_steps=6", "train.save_interval=3"]
    full = tmp_path / "full"
    r = cli(*_args(ckpts, full, *common))
    assert r.returncode == 0, r.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = cli(*_args(ckpts, killed, *common), popen=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() == "iter_0000003"):
        assert proc.poll() is None or latest.exists(), proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = cli(*_args(ckpts, killed, *common))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    expected, got = _comparable(full), _comparable(killed)
    assert sorted(got) == list(range(1, 7))
    assert got == expected  # bitwise: every metric of every step, floats compared exactly


def _terminate_after_first_step(ckpts, out, *extra):
    """Start a PPO run, send SIGTERM once it has logged a step, and check it exits 75."""
    proc = cli(*_args(ckpts, out, *extra), popen=True)
    metrics = Path(out) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75


def test_sigterm_checkpoints_and_exits_75(ckpts, tmp_path):
    out = tmp_path / "term"
    _terminate_after_first_step(ckpts, out, "train.max_steps=50")
    step = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 1 <= step < 50 and _rows(out)[-1]["step"] == step


# ------------------------------------------------------------------ bad inputs


def test_bad_inputs_have_clear_errors(ckpts, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = cli(*_args(ckpts, tmp_path / "o1", f"ppo.prompts_path={empty}"))
    assert r.returncode == 2 and str(empty) in r.stderr and "empty" in r.stderr, r.stderr[-2000:]

    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "List 2 fruits."}\n' + json.dumps({"prompt": "List 2 fruits. " * 40}) + "\n")
    r = cli(*_args(ckpts, tmp_path / "o2", f"ppo.prompts_path={long}"))
    assert r.returncode == 2 and f"{long}:2" in r.stderr and "ppo.max_new_tokens" in r.stderr, r.stderr[-2000:]

    r = cli(*_args(ckpts, tmp_path / "o3", f"ppo.reward_model={ckpts / 'rm_other'}"))
    assert r.returncode == 2 and "actor/RM tokenizer mismatch" in r.stderr, r.stderr[-2000:]

    r = cli(*_args(ckpts, tmp_path / "o4", f"ppo.reward_model={tmp_path / 'no_rm'}"))
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "no_rm" in r.stderr, r.stderr[-2000:]

    r = cli(*_args(ckpts, tmp_path / "o5", "parallel.pipeline_model_parallel_size=2"))
    assert r.returncode == 2 and "pipeline_model_parallel_size" in r.stderr, r.stderr[-2000:]


def _warmup(root, out):
    from megatron_rlhf.config import load_config
    from megatron_rlhf.recipes.ppo import PPORecipe
    from megatron_rlhf.training.loop import setup

    args = _args(Path(root), out, "train.lr=1e-3", "train.max_steps=2", "ppo.critic_warmup_steps=1")
    cfg = load_config(args[args.index("--config") + 1], [a for a in args[3:] if "=" in a])
    trainer = PPORecipe(setup(cfg))
    snapshot = lambda model: [p.detach().clone() for p in model.parameters()]  # noqa: E731
    moved = lambda before, model: max((a - b).abs().max().item() for a, b in zip(before, model.parameters()))  # noqa: E731
    out = []
    for step in range(2):
        actor, critic = snapshot(trainer.actor), snapshot(trainer.critic)
        episodes, _ = trainer.rollout(step)
        metrics = trainer.update(episodes, step)
        out.append({"actor": moved(actor, trainer.actor), "critic": moved(critic, trainer.critic), "keys": sorted(metrics)})
    return out


def test_critic_warmup_trains_the_critic_alone(ckpts, tmp_path):
    first, second = run_single(_warmup, str(ckpts), str(tmp_path / "run"))
    assert first["actor"] == 0.0 and first["critic"] > 0, first
    assert "policy_loss" not in first["keys"] and "value_loss" in first["keys"]
    assert second["actor"] > 0 and second["critic"] > 0 and "policy_loss" in second["keys"], second


def test_resume_during_critic_warmup(ckpts, tmp_path):
    """A checkpoint written before the actor's first step (no Adam moments yet) resumes bitwise."""
    common = ["train.lr=1e-3", "train.max_steps=3", "ppo.critic_warmup_steps=2"]
    full = tmp_path / "full"
    r = cli(*_args(ckpts, full, *common))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "term"
    _terminate_after_first_step(ckpts, out, *common)
    saved = ckpt_meta(out)
    assert saved["iteration"] <= 2 and saved["unstepped_optimizers"] == ["actor"], saved
    r = cli(*_args(ckpts, out, *common))
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    assert _comparable(out) == _comparable(full)


def ckpt_meta(out):
    latest = (Path(out) / "checkpoints" / "latest").read_text().strip()
    return json.loads((Path(out) / "checkpoints" / latest / "meta.json").read_text())
