"""Reward-model stage: one forward per prompt's K responses, TP/PP equivalence, normalisation
through the score CLI, and clear errors for bad inputs (the loss itself is tested against
brute force in test_algorithms_ranking.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed, run_single

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples/tiny/tokenizer.model"
DATA = ROOT / "examples/tiny/data"
# The architecture of every model here; the CLI runs get it as overrides.
ARCH = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32)
ARCH_OVERRIDES = [f"model.{k}={v}" for k, v in ARCH.items()] + ["model.hidden_dropout=0.0"]
QUIET = ["train.progress_bar=false", "train.tensorboard=false"]


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_rlhf", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _model_cfg(tokenizer=TOKENIZER):
    from megatron_rlhf.config import ModelConfig

    return ModelConfig(flavour="gpt2", tokenizer=str(tokenizer), **ARCH)


def _examples(ks, seed):
    """Random comparisons: prompt i has ks[i] responses with random (not all tied) ranks."""
    from megatron_rlhf.data import ComparisonExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in ks:
        prompt = [1] + torch.randint(4, 500, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        responses = [torch.randint(4, 500, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist() + [2] for _ in range(k)]
        ranks = torch.randint(1, k + 1, (k,), generator=g).tolist()
        if len(set(ranks)) == 1:
            ranks[0] = 1 if ranks[0] != 1 else 2
        out.append(ComparisonExample(prompt, responses, ranks))
    return out


def _bump_head(model, seed=11):
    """A random init reads rewards of ~1e-3; a larger head makes equality tests meaningful."""
    from megatron_rlhf.models.reward import scalar_head

    head = scalar_head(model)
    if head is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g))
            head.bias.fill_(0.3)


def _brute_force_loss(rewards_by_prompt, examples):
    """InstructGPT eq. 1 by explicit pairs: mean over prompts of the mean over ordered pairs."""
    losses, correct, pairs = [], 0, 0
    for rewards, ex in zip(rewards_by_prompt, examples):
        terms = []
        for i in range(len(ex.ranks)):
            for j in range(len(ex.ranks)):
                if ex.ranks[i] < ex.ranks[j]:
                    terms.append(-F.logsigmoid(rewards[i] - rewards[j]))
                    correct += int(rewards[i] > rewards[j])
                    pairs += 1
        losses.append(torch.stack(terms).mean())
    return torch.stack(losses).mean().item(), correct / pairs


# ------------------------------------------------------------------ one forward per micro-batch


def _train_step_forwards(ks, micro_batch_size):
    from megatron_rlhf.config import Config, ParallelConfig, TrainConfig
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.models.reward import read_rewards
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.recipes import rm
    from megatron_rlhf.training.supervised import microbatches
    from megatron_rlhf.training.step import train_step, wrap_for_training

    train = TrainConfig(lr=1e-3, global_batch_size=len(ks), micro_batch_size=micro_batch_size)
    cfg = Config(stage="rm", model=_model_cfg(), train=train)
    init_distributed(cfg.parallel, cfg.model)
    model = build_model(cfg.model, ParallelConfig(), 512, scalar_head=True, seed=5)
    _bump_head(model)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append((args[0].clone(), out.detach().clone())))
    ddp, optimizer, scheduler = wrap_for_training(model, cfg.parallel, cfg.train, total_steps=1)
    examples = _examples(ks, seed=len(ks) + micro_batch_size)
    task = rm.make_task(cfg, examples, [], pad_id=0)
    micro = microbatches(task, examples, micro_batch_size)
    metrics = train_step(ddp, optimizer, scheduler, micro, rm.forward_step)
    # Rewards as the model produced them, split back per prompt for the brute-force loss.
    rewards = torch.cat([read_rewards(out, b.last_index) for (_, out), b in zip(calls, micro)])
    sizes = [len(e.response_ids) for e in examples]
    by_prompt = list(torch.split(rewards, sizes))
    loss, accuracy = _brute_force_loss(by_prompt, examples)
    return {
        "rows_per_call": [tokens.shape[0] for tokens, _ in calls],
        "loss": metrics["loss"], "accuracy": metrics["accuracy"],
        "brute_loss": loss, "brute_accuracy": accuracy,
    }


def _forward_counts():
    return _train_step_forwards([4, 4, 4, 4], 4), _train_step_forwards([2, 5, 3, 4], 2)


def test_k_responses_of_a_prompt_are_scored_in_one_forward():
    same_k, mixed_k = run_single(_forward_counts)
    # 4 prompts x K=4 in one micro-batch: one forward call with all 16 responses.
    assert same_k["rows_per_call"] == [16]
    # Two prompts per micro-batch, K = 2, 5 | 3, 4: two calls, no prompt split across them.
    assert mixed_k["rows_per_call"] == [7, 7]
    for r in (same_k, mixed_k):
        assert abs(r["loss"] - r["brute_loss"]) < 1e-5, r
        assert abs(r["accuracy"] - r["brute_accuracy"]) < 1e-6, r


# ------------------------------------------------------------------ TP / PP equivalence


def _sequences():
    g = torch.Generator().manual_seed(3)
    return [[1] + torch.randint(4, 500, (int(n),), generator=g).tolist() + [2] for n in torch.randint(1, 28, (11,), generator=g)]


def _phase(parallel, ckpt_dir, save):
    from megatron.core import parallel_state

    from megatron_rlhf.config import Config, TrainConfig
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.models.reward import score_sequences
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.recipes import rm
    from megatron_rlhf.training.supervised import microbatches
    from megatron_rlhf import checkpoint as ckpt_lib
    from megatron_rlhf.models.schedule import means, run_schedule
    from megatron_rlhf.training.step import train_step, wrap_for_training

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    train = TrainConfig(lr=1e-3, global_batch_size=4, micro_batch_size=2)
    cfg = Config(stage="rm", model=_model_cfg(), parallel=parallel, train=train)
    init_distributed(parallel, cfg.model)
    model = build_model(cfg.model, parallel, 512, scalar_head=True, seed=5)
    if parallel.pipeline_model_parallel_size > 1:
        model.config.variable_seq_lengths = True  # as the RM stage does: K varies
    if save:
        _bump_head(model)
        ckpt_lib.save_checkpoint(ckpt_dir, 0, {"model": model}, {"kind": "reward"})
    else:
        ckpt_lib.load_weights(model, Path(ckpt_dir) / ckpt_lib.iter_name(0))
    rewards = score_sequences(model, _sequences(), micro_batch_size=3)
    # The training path: micro-batches of 5 and 9 rows (K = 2, 3 | 4, 5), forward-only and one step.
    examples = _examples([2, 3, 4, 5], seed=9)
    task = rm.make_task(cfg, examples, [], pad_id=0)
    micro = microbatches(task, examples, 2)
    evaluated = means(run_schedule(model, micro, rm.forward_step, forward_only=True))
    ddp, optimizer, scheduler = wrap_for_training(model, cfg.parallel, cfg.train, total_steps=1)
    trained = train_step(ddp, optimizer, scheduler, micro, rm.forward_step)
    return rewards, evaluated, trained


def _layouts(ckpt_dir):
    from megatron_rlhf.config import ParallelConfig

    # TP=PP=1 as two data-parallel replicas fed the same micro-batches: the same numbers as one
    reference = _phase(ParallelConfig(), ckpt_dir, save=True)
    tp2 = _phase(ParallelConfig(tensor_model_parallel_size=2), ckpt_dir, save=False)
    pp2 = _phase(ParallelConfig(pipeline_model_parallel_size=2), ckpt_dir, save=False)
    return reference, tp2, pp2


def test_tp2_and_pp2_give_the_rewards_of_tp1(tmp_path):
    for reference, tp2, pp2 in run_distributed(_layouts, 2, str(tmp_path / "ckpt")):
        rewards, evaluated, trained = reference
        assert rewards.std() > 0.1  # not a trivially constant model
        for name, (other_rewards, other_eval, other_trained) in (("tp2", tp2), ("pp2", pp2)):
            assert (other_rewards - rewards).abs().max() < 1e-5, name
            for key in ("loss", "accuracy", "margin"):
                assert abs(other_eval[key] - evaluated[key]) < 1e-5, (name, key)
                assert abs(other_trained[key] - trained[key]) < 1e-5, (name, key)
            assert abs(other_trained["grad_norm"] - trained["grad_norm"]) < 1e-4, name


# ------------------------------------------------------------------ the stage end to end


def _make_sft_checkpoints(root):
    """An SFT-like policy checkpoint with the tiny tokenizer, and one with another vocabulary."""
    from megatron_rlhf.config import Config, ParallelConfig
    from megatron_rlhf.data import Tokenizer, train_tokenizer
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.checkpoint import checkpoint_meta
    from megatron_rlhf import checkpoint as ckpt_lib

    root = Path(root)
    text = root / "text.txt"
    text.write_text("\n".join(json.loads(line)["prompt"] + " " + json.loads(line)["response"] for line in (DATA / "sft_train.jsonl").read_text().splitlines()[:300]))
    other = train_tokenizer([text], 400, root / "other")
    for name, tokenizer_path in (("sft", TOKENIZER), ("sft_other", root / "other.model")):
        tokenizer = Tokenizer.load(tokenizer_path)
        cfg = Config(stage="sft", model=_model_cfg(tokenizer_path))
        init_distributed(cfg.parallel, cfg.model)
        model = build_model(cfg.model, ParallelConfig(), tokenizer.vocab_size, seed=1)
        ckpt_lib.save_checkpoint(root / name / "checkpoints", 1, {"model": model}, checkpoint_meta(cfg, tokenizer, "policy"), tokenizer_bytes=tokenizer.serialized_model())
    return other.vocab_size


def _head(path, n):
    lines = Path(path).read_text().splitlines()[:n]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    other_vocab = run_single(_make_sft_checkpoints, str(root))
    (root / "train.jsonl").write_text(_head(DATA / "rm_train.jsonl", 24))
    (root / "valid.jsonl").write_text(_head(DATA / "rm_valid.jsonl", 10))
    (root / "demos.jsonl").write_text(_head(DATA / "sft_train.jsonl", 40))
    common = [
        "--config", "examples/tiny/rm.yaml", *ARCH_OVERRIDES, *QUIET,
        f"data.train_path={root / 'train.jsonl'}", f"data.valid_path={root / 'valid.jsonl'}",
        f"rm.demonstrations_path={root / 'demos.jsonl'}",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=4", "train.eval_interval=2",
        "train.lr=3e-3", "train.lr_warmup_steps=0",
    ]
    result = cli("rm", *common, f"output_dir={root / 'rm'}", f"model.init_from={root / 'sft'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "common": common, "other_vocab": other_vocab, "stderr": result.stderr}


def test_stage_logs_the_metrics_and_marks_the_checkpoints(rm_run):
    from megatron_rlhf import checkpoint as ckpt_lib

    out = rm_run["root"] / "rm"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all("train/accuracy" in r for r in train)
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert {"eval/loss", "eval/chosen_reward", "eval/rejected_reward", "eval/margin"} <= r.keys()
        assert 0.0 <= r["eval/accuracy"] <= 1.0
    final = ckpt_lib.resolve_checkpoint(out)
    meta = ckpt_lib.read_meta(final)
    assert meta["kind"] == "reward" and meta["iteration"] == 4 and meta["rm_bias_folded"] is True
    assert meta["rm_normalization"]["count"] == 40
    best = ckpt_lib.resolve_checkpoint(out / "checkpoints" / "best")
    assert "rm_bias" in ckpt_lib.read_meta(best)  # whichever a later stage picks is normalised
    # model selection by accuracy: best is the evaluation with the highest eval/accuracy (after step 0)
    top = max((r for r in evals if r["step"] > 0), key=lambda r: r["eval/accuracy"])
    assert ckpt_lib.read_meta(best)["iteration"] == top["step"]


def test_demonstrations_score_a_mean_of_zero_through_the_score_cli(rm_run):
    root = rm_run["root"]
    scored = root / "scored.jsonl"
    result = cli("score", "--checkpoint", str(root / "rm"), "--input", str(root / "demos.jsonl"), "--output", str(scored), "--batch-size", "7")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    inputs = [json.loads(line) for line in (root / "demos.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "reward"} for r in rows] == inputs  # keys kept, order kept
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
    assert abs(rewards.mean().item()) < 1e-4
    assert rewards.std().item() > 0  # the rewards themselves are not all zero
    meta = json.loads((Path(str(root / "rm" / "checkpoints")) / (root / "rm/checkpoints/latest").read_text().strip() / "meta.json").read_text())
    assert abs(meta["rm_bias"]) > 1e-6  # the raw mean was not already 0: the bias did the work


def test_bad_comparison_file_exits_2_with_file_and_line(rm_run):
    root = rm_run["root"]
    bad = root / "bad.jsonl"
    good = json.loads(_head(DATA / "rm_train.jsonl", 1))
    wrong = dict(good, ranking=good["ranking"][:-1])  # one rank short
    bad.write_text(json.dumps(good) + "\n" + json.dumps(wrong) + "\n")
    result = cli("rm", *rm_run["common"], f"data.train_path={bad}", f"output_dir={root / 'bad_run'}", "model.init_from=")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{bad}:2" in result.stderr and "ranking" in result.stderr
    # the score CLI validates its input the same way, before building a model
    lines = root / "bad_score.jsonl"
    lines.write_text('{"prompt": "List 2 fruits.", "response": "apple, pear."}\n{"prompt": "List 2 fruits."}\n')
    result = cli("score", "--checkpoint", str(root / "rm"), "--input", str(lines))
    assert result.returncode == 2 and f"{lines}:2" in result.stderr and "response" in result.stderr


def test_sft_checkpoint_of_another_vocabulary_is_refused(rm_run):
    root = rm_run["root"]
    result = cli("rm", *rm_run["common"], f"output_dir={root / 'mismatch'}", f"model.init_from={root / 'sft_other'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "tokenizer mismatch" in result.stderr and str(root / "sft_other") in result.stderr
    assert f"vocab {rm_run['other_vocab']}" in result.stderr and "vocab 512" in result.stderr


# ------------------------------------------------------------------ reward centering (rm.center_coef)


def test_center_coef_adds_each_prompts_mean_squared_reward():
    from megatron_rlhf.data import ComparisonExample, collate_comparisons
    from megatron_rlhf.recipes.rm import forward_step as rm_forward

    examples = [ComparisonExample([1, 5], [[6, 2], [7, 2], [8, 2]], [1, 2, 2]), ComparisonExample([1, 9], [[6, 2], [7, 7, 2]], [2, 1])]
    batch = collate_comparisons(examples, pad_id=0)
    rewards = torch.tensor([1.5, -0.5, 0.25, 2.0, -1.0])

    def model(tokens, position_ids, mask):  # the reward of row i everywhere in the row
        return rewards[:, None, None].expand(tokens.shape[0], tokens.shape[1], 1).clone()

    def loss(coef):
        output, loss_fn = rm_forward(model, batch, center_coef=coef)
        return loss_fn(output)

    plain, n_prompts, _ = loss(0.0)
    centered, _, _ = loss(0.1)
    # eq. 1 by hand: prompt 0 pairs (0>1), (0>2); prompt 1 pair (1>0); summed over prompts
    eq1 = -(F.logsigmoid(torch.tensor(2.0)) + F.logsigmoid(torch.tensor(1.25))) / 2 - F.logsigmoid(torch.tensor(-3.0))
    penalty = (1.5**2 + 0.5**2 + 0.25**2) / 3 + (2.0**2 + 1.0**2) / 2
    assert n_prompts == 2
    assert abs(plain.item() - eq1.item()) < 1e-6
    assert abs(centered.item() - (eq1.item() + 0.1 * penalty)) < 1e-6
