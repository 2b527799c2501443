"""DPO recipe (recipes/dpo.py): ln 2 at the start, held-out accuracy rising from the shipped tiny SFT,
TP/PP equivalence, bitwise resume after a preemption, and clear errors; the optional pretraining
(ptx) mix: the step's loss by hand, in the TP/PP and resume runs, its config errors. The loss itself
is tested against hand numbers in test_algorithms_dpo.py."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from test_rm import _examples  # the RM tests' random comparisons

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples/tiny/data"
TOKENIZER = ROOT / "examples/tiny/tokenizer.model"
ARCH = ["model.hidden_size=64", "model.seq_length=32", "model.hidden_dropout=0.0"]
QUIET = ["train.progress_bar=false", "train.tensorboard=false"]
RUN_DPO = "import sys; from megatron_rlhf.cli import main; sys.exit(main(['dpo', '--config', *sys.argv[1:]]))"
# The same, preempted by a SIGTERM to itself after its second optimizer step.
RUN_DPO_PREEMPTED = (
    "import os, signal; import megatron_rlhf.training.supervised as supervised; step = supervised.train_step; done = []\n"
    "def train_step(*args, **kwargs):\n"
    "    metrics = step(*args, **kwargs); done.append(1)\n"
    "    if len(done) == 2: os.kill(os.getpid(), signal.SIGTERM)\n"
    "    return metrics\n"
    "supervised.train_step = train_step\n" + RUN_DPO
)


def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def dpo(*overrides, script=RUN_DPO, timeout=300):
    args = [sys.executable, "-c", script, "examples/tiny/dpo.yaml", *ARCH, *QUIET, *overrides]
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _head(path, n, out):
    out.write_text("".join(Path(path).read_text().splitlines(keepends=True)[:n]))
    return out


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A quick tiny SFT policy (~80 steps, eval loss 6.3 -> ~2.3): it knows a little about the items."""
    root = tmp_path_factory.mktemp("dpo")
    args = [sys.executable, "-m", "megatron_rlhf", "sft", "--config", "examples/tiny/sft.yaml", *ARCH, *QUIET,
            f"output_dir={root / 'sft'}", "train.max_steps=80", "train.eval_interval=0", "data.valid_path=",
            "train.lr_warmup_steps=5"]
    result = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


# ------------------------------------------------------------------ from SFT: ln 2, then learning


def test_starts_at_ln2_and_heldout_accuracy_rises(tiny_sft_policy, tmp_path):
    """examples/tiny/dpo.yaml from the shipped tiny SFT (128 wide, context 64), 30 steps."""
    out = tmp_path / "run"
    valid = _head(DATA / "rm_valid.jsonl", 64, tmp_path / "valid.jsonl")
    r = dpo(f"output_dir={out}", f"model.init_from={tiny_sft_policy}", "model.hidden_size=128", "model.seq_length=64",
            f"data.valid_path={valid}", "train.max_steps=30", "train.eval_interval=15")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    train = {row["step"]: row for row in rows if "train/loss" in row}
    evals = {row["step"]: row for row in rows if "eval/accuracy" in row}
    # policy == reference and no dropout: every implicit reward is 0, every pair's term ln 2
    assert train[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(evals[0]["eval/margin"]) < 1e-6
    for key in ("eval/loss", "eval/margin", "eval/chosen_reward", "eval/rejected_reward"):
        assert key in evals[30]
    assert {"train/accuracy", "train/margin", "train/chosen_reward", "train/rejected_reward", "grad_norm"} <= train[30].keys()
    # the held-out rankings are learnt (the whole example, 125 steps on all 200 held-out prompts:
    # accuracy 0.846 at step 25, 0.955 at step 125; a 64-wide policy from an 80-step SFT reached only
    # 0.61 in 60 steps: it knows too little of which item belongs to which category)
    assert evals[30]["eval/accuracy"] > 0.75, evals
    assert evals[30]["eval/loss"] < math.log(2) - 0.15, evals
    assert evals[30]["eval/chosen_reward"] > evals[30]["eval/rejected_reward"]
    # a policy checkpoint, selected by held-out accuracy
    from megatron_rlhf import checkpoint as ckpt_lib

    best = ckpt_lib.resolve_checkpoint(out / "checkpoints" / "best")
    meta = ckpt_lib.read_meta(best)
    assert meta["kind"] == "policy" and meta["stage"] == "dpo" and meta["dpo"]["beta"] == 0.5
    assert meta["iteration"] == max((s for s in evals if s > 0), key=lambda s: evals[s]["eval/accuracy"])


def test_killed_run_resumes_bitwise_with_the_ptx_mix(sft, tmp_path):
    train = _head(DATA / "rm_train.jsonl", 40, tmp_path / "train.jsonl")
    # 1.5 pretraining sequences per prompt: 6 a step, 3 micro-batches of 2 after the comparisons'
    common = [f"model.init_from={sft / 'sft'}", f"data.train_path={train}", "data.valid_path=", "train.max_steps=4",
              "train.global_batch_size=4", "train.micro_batch_size=2", "model.hidden_dropout=0.1", "train.lr=1e-3",
              "dpo.loss=plackett_luce", "dpo.ptx_coef=0.5", f"dpo.pretrain_path={DATA / 'pretrain.jsonl'}", "dpo.ptx_ratio=1.5"]
    r = dpo(*common, f"output_dir={tmp_path / 'full'}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = dpo(*common, f"output_dir={tmp_path / 'cut'}", script=RUN_DPO_PREEMPTED)
    assert r.returncode == 75 and "preempted at step 2" in r.stderr, r.stdout + r.stderr[-3000:]
    r = dpo(*common, f"output_dir={tmp_path / 'cut'}")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    full = {row["step"]: (row["train/loss"], row["train/ptx_loss"], row["grad_norm"]) for row in _rows(tmp_path / "full") if "train/loss" in row}
    cut = {row["step"]: (row["train/loss"], row["train/ptx_loss"], row["grad_norm"]) for row in _rows(tmp_path / "cut") if "train/loss" in row}
    assert sorted(cut) == [1, 2, 3, 4]
    assert cut == full  # bitwise: exact float equality of every step's losses (the ptx stream continues) and grad norm
    assert len({loss for loss, _, _ in full.values()}) == 4  # dropout and learning: not one number four times
    # the pretraining NLL of each step's 6 sequences, logged and finite: the SFT policy starts worse
    # than uniform on text it never saw (ln 512 = 6.24), and gamma x NLL pulls it down within the
    # 4 steps (measured 7.62, 7.69, 7.45, 6.42)
    ptx = [p for _, p, _ in full.values()]
    assert all(math.isfinite(p) and 3.0 < p < 10.0 for p in ptx) and len(set(ptx)) == 4, ptx
    assert ptx[-1] < ptx[0] - 0.5, ptx


def test_bad_inputs_have_clear_errors(sft, tmp_path):
    r = dpo(f"output_dir={tmp_path / 'o1'}", "model.init_from=")
    assert r.returncode != 0 and "set model.init_from=<sft run or checkpoint>" in r.stderr
    r = dpo(f"output_dir={tmp_path / 'o2'}", f"model.init_from={sft / 'sft'}", "dpo.loss=listwise")
    assert r.returncode != 0 and "dpo.loss='listwise' is not one of" in r.stderr
    bad = tmp_path / "bad.jsonl"
    good = json.loads((DATA / "rm_train.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, ranking=[1] * len(good["responses"]))) + "\n")
    r = dpo(f"output_dir={tmp_path / 'o3'}", f"model.init_from={sft / 'sft'}", f"data.train_path={bad}")
    assert r.returncode != 0 and f"{bad}:2" in r.stderr and "tied" in r.stderr
    # the ptx mix without pretraining text: the error reaches the command line (the other checks below)
    r = dpo(f"output_dir={tmp_path / 'o5'}", f"model.init_from={sft / 'sft'}", "dpo.ptx_coef=0.5")
    assert r.returncode != 0 and "dpo.ptx_coef=0.5 needs pretraining text, but dpo.pretrain_path is empty" in r.stderr, r.stderr[-2000:]
    # a reward model is not a policy
    meta = json.loads((sft / "sft" / "checkpoints" / "latest").parent.joinpath((sft / "sft/checkpoints/latest").read_text().strip(), "meta.json").read_text())
    fake = tmp_path / "rm" / "checkpoints" / "iter_0000001"
    fake.mkdir(parents=True)
    (fake / "meta.json").write_text(json.dumps(dict(meta, kind="reward", network_kinds={"model": "reward"})))
    (fake.parent / "latest").write_text("iter_0000001\n")
    r = dpo(f"output_dir={tmp_path / 'o4'}", f"model.init_from={tmp_path / 'rm'}")
    assert r.returncode == 2 and "is a reward model (an RM run)" in r.stderr and "not a policy" in r.stderr, r.stderr[-2000:]


# ------------------------------------------------------------------ TP / PP equivalence


class _Tokenizer:
    pad_id, vocab_size = 0, 500


def _phase(parallel, ckpt_dir, save):
    from megatron.core import parallel_state

    from megatron_rlhf.config import Config, DPOConfig, ModelConfig, TrainConfig
    from megatron_rlhf.data import SftExample
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf import checkpoint as ckpt_lib
    from megatron_rlhf.models.schedule import means, run_schedule
    from megatron_rlhf.recipes import dpo
    from megatron_rlhf.training.step import train_step, wrap_for_training
    from megatron_rlhf.training.loop import RunContext
    from megatron_rlhf.training.ptx import PretrainMix
    from megatron_rlhf.training.supervised import microbatches

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, tokenizer=str(TOKENIZER))
    # DP=2 replicas are fed the same comparisons, so the global batch counts them twice; the
    # pretraining sequences are split between the ranks as in a run: 4 a step at every layout
    dp = 2 // (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size)
    cfg = Config(stage="dpo", model=model_cfg, parallel=parallel, train=TrainConfig(lr=1e-3, global_batch_size=4 * dp, micro_batch_size=2))
    env = init_distributed(parallel, model_cfg)
    # a policy already away from its reference, so the loss is not just ln 2
    policy = build_model(model_cfg, parallel, 500, seed=5)
    reference = build_model(model_cfg, parallel, 500, seed=6)
    for name, model in (("policy", policy), ("reference", reference)):
        if save:
            ckpt_lib.save_checkpoint(Path(ckpt_dir) / name, 0, {"model": model}, {"kind": "policy"})
        else:
            ckpt_lib.load_weights(model, Path(ckpt_dir) / name / ckpt_lib.iter_name(0))
    reference.requires_grad_(False)
    if parallel.pipeline_model_parallel_size > 1:
        policy.config.variable_seq_lengths = True
    ddp, optimizer, scheduler = wrap_for_training(policy, cfg.parallel, cfg.train, total_steps=2)
    examples = _examples([2, 3, 4, 5], seed=9)
    results = {}
    # micro-batches of 5 and 9 rows (K = 2, 3 | 4, 5): a forward-only pass and one step per loss
    # pretraining chunks of 33, 20, 12 and 7 tokens: ptx micro-batches of other widths in the same schedule
    g = torch.Generator().manual_seed(4)
    chunks = [torch.randint(1, 500, (n,), generator=g).tolist() for n in (33, 20, 12, 7)]
    pretrain = PretrainMix(RunContext(cfg, env, _Tokenizer(), Path(ckpt_dir)), [SftExample(c[:1], c[1:]) for c in chunks])
    for loss_type in ("plackett_luce", "pairwise"):
        dpo_cfg = DPOConfig(beta=0.5, loss=loss_type, pretrain_path="(chunks)", ptx_coef=0.7, ptx_ratio=1.0 / dp)
        task = dpo.make_task(dataclasses.replace(cfg, dpo=dpo_cfg), examples, examples, reference, _Tokenizer(), pretrain)
        micro = microbatches(task, examples, 2)
        evaluated = means(run_schedule(ddp, micro, task.forward_fn, forward_only=True))
        ptx, forward_fn = task.mix.step()
        trained = train_step(ddp, optimizer, scheduler, micro + ptx, forward_fn)
        results[loss_type] = (micro[0].ref_logps, evaluated, trained)
    return results


def _layouts(ckpt_dir):
    from megatron_rlhf.config import ParallelConfig

    # TP=PP=1 as two data-parallel replicas fed the same micro-batches: the same numbers as one
    reference = _phase(ParallelConfig(), ckpt_dir, True)
    tp2 = _phase(ParallelConfig(tensor_model_parallel_size=2), ckpt_dir, False)
    pp2 = _phase(ParallelConfig(pipeline_model_parallel_size=2), ckpt_dir, False)
    return reference, tp2, pp2


def test_tp2_and_pp2_give_the_steps_of_tp1(tmp_path):
    for reference, tp2, pp2 in run_distributed(_layouts, 2, str(tmp_path / "ckpt")):
        for loss_type, (ref_logps, evaluated, trained) in reference.items():
            assert abs(evaluated["loss"] - math.log(2)) > 0.05  # policy and reference differ
            for name, layout in (("tp2", tp2), ("pp2", pp2)):
                other_ref_logps, other_eval, other_trained = layout[loss_type]
                assert (other_ref_logps - ref_logps).abs().max() < 1e-4, (name, loss_type)
                for key in ("loss", "accuracy", "margin", "chosen_reward"):
                    assert abs(other_eval[key] - evaluated[key]) < 1e-5, (name, loss_type, key)
                    assert abs(other_trained[key] - trained[key]) < 1e-5, (name, loss_type, key)
                # the ptx micro-batches: the same pretraining NLL and (through grad_norm) the same step
                assert abs(other_trained["ptx_loss"] - trained["ptx_loss"]) < 1e-5, (name, loss_type)
                assert "ptx_loss" not in other_eval and "ptx_loss" not in evaluated
                assert abs(other_trained["grad_norm"] - trained["grad_norm"]) < 1e-4, (name, loss_type)


# ------------------------------------------------------------------ the pretraining (ptx) mix


def _ptx_step(table, ref_logps, gamma, ptx_splits):
    """One DPO+ptx step through ``dpo_forward`` as the schedule runs it: every micro-batch's
    (sum, count), the sums added, divided by the summed count. The "model" is a bigram table
    (logits of the next token = ``table[token]``). ``token_logprobs`` works in fp32, hence the
    1e-6 tolerances below (a wrong count is off by 10% or more)."""
    from megatron_rlhf.data import ComparisonExample, SftExample, collate_comparisons, collate_sft
    from megatron_rlhf.recipes.dpo import DpoBatch, dpo_forward, response_mask_of

    prompts = [
        ComparisonExample([1, 2], [[3, 4, 6], [5, 6]], [1, 2]),
        ComparisonExample([1, 3, 2], [[4, 6], [3, 3, 6], [5, 6]], [2, 1, 3]),
        ComparisonExample([1], [[2, 6], [4, 4, 6]], [1, 2]),
    ]
    pretrain = [SftExample([1], [2, 3, 4, 6]), SftExample([1], [5, 6]), SftExample([2], [2, 2, 3]), SftExample([4], [6])]
    rows = 0
    micro = []
    for group in (prompts[:2], prompts[2:]):  # two DPO micro-batches, of 5 and 2 rows
        batch = collate_comparisons(group, pad_id=0)
        k = batch.tokens.shape[0]
        micro.append(DpoBatch(*batch, response_mask_of(group, batch.tokens.shape[1]), ref_logps[rows : rows + k]))
        rows += k
    ptx = [collate_sft(part, pad_id=0) for part in ptx_splits(pretrain)]
    ptx_tokens = float(sum(b.loss_mask.sum() for b in ptx))  # 10 counted tokens
    reports = []
    for batch in micro + ptx:
        logits, loss_fn = dpo_forward(lambda tokens, positions, mask: table[tokens], batch, beta=0.5, loss_type="pairwise", vocab_size=7,
                                      ptx_coef=gamma, global_prompts=3.0, ptx_tokens=ptx_tokens)
        reports.append(loss_fn(logits))
    loss = sum(r[0] for r in reports) / sum(float(r[1]) for r in reports)
    metrics = {}
    for _, _, m in reports:
        for name, (s, c) in m.items():
            metrics[name] = (metrics.get(name, (0.0, 0.0))[0] + float(s), metrics.get(name, (0.0, 0.0))[1] + float(c))
    return loss, {name: s / c for name, (s, c) in metrics.items()}


def test_dpo_ptx_step_is_dpo_mean_plus_gamma_ptx_mean_by_hand():
    # a uniform policy over 7 tokens equal to its reference: every pair's term is ln 2, every
    # pretraining token's NLL ln 7, so the step's loss is ln 2 + gamma ln 7 (3 prompts, 10 ptx tokens)
    table = torch.zeros(7, 7, dtype=torch.float64, requires_grad=True)
    ref_logps = torch.tensor([-3, -2, -2, -3, -2, -2, -3], dtype=torch.float64) * math.log(7)
    for splits in (lambda p: [p], lambda p: [p[:1], p[1:]]):
        loss, metrics = _ptx_step(table, ref_logps, 2.5, splits)
        assert loss.item() == pytest.approx(math.log(2) + 2.5 * math.log(7), abs=1e-6)
        assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert metrics["ptx_loss"] == pytest.approx(math.log(7), abs=1e-6)


def test_dpo_ptx_step_loss_and_gradient_equal_the_two_means():
    """A random bigram policy: the step is mean_prompts DPO + gamma x mean_tokens NLL, computed
    here directly, however the pretraining sequences are cut into micro-batches (a data-parallel
    rank's share is such a cut: the counts are global)."""
    from megatron_rlhf.algorithms import build_ranking_pairs
    from megatron_rlhf.algorithms.dpo import dpo_loss

    torch.manual_seed(3)
    table = torch.randn(7, 7, dtype=torch.float64, requires_grad=True)
    ref_logps = -torch.rand(7, dtype=torch.float64) * 6
    gamma = 0.7
    logp = torch.log_softmax(table, dim=-1)  # logp[a, b] = log p(next = b | a)
    # the 7 responses' log pi(y|x), token by token (previous token -> response token)
    sequences = [([1, 2], [3, 4, 6]), ([1, 2], [5, 6]), ([1, 3, 2], [4, 6]), ([1, 3, 2], [3, 3, 6]), ([1, 3, 2], [5, 6]), ([1], [2, 6]), ([1], [4, 4, 6])]
    policy_logps = torch.stack([sum(logp[a, b] for a, b in zip((p + r)[len(p) - 1 : -1], r)) for p, r in sequences])
    pairs = build_ranking_pairs([[1, 2], [2, 1, 3], [1, 2]])
    dpo_mean, _ = dpo_loss(policy_logps, ref_logps, torch.tensor([1, 2, 2, 1, 3, 1, 2]), pairs, 0.5, "pairwise")
    chunks = [[1, 2, 3, 4, 6], [1, 5, 6], [2, 2, 2, 3], [4, 6]]
    nll = [-logp[a, b] for c in chunks for a, b in zip(c[:-1], c[1:])]
    expected = dpo_mean + gamma * torch.stack(nll).mean()
    (expected_grad, dpo_grad) = (torch.autograd.grad(x, table, retain_graph=True)[0] for x in (expected, dpo_mean))
    for splits in (lambda p: [p], lambda p: [p[:3], p[3:]], lambda p: [[e] for e in p]):
        loss, metrics = _ptx_step(table, ref_logps, gamma, splits)
        (grad,) = torch.autograd.grad(loss, table)
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-6)
        assert metrics["loss"] == pytest.approx(dpo_mean.item(), abs=1e-6)
        assert metrics["ptx_loss"] == pytest.approx(torch.stack(nll).mean().item(), abs=1e-6)
    # gamma = 0: the ptx micro-batches add nothing to the loss or its gradient
    loss, _ = _ptx_step(table, ref_logps, 0.0, lambda p: [p])
    torch.testing.assert_close(torch.autograd.grad(loss, table)[0], dpo_grad, atol=1e-6, rtol=1e-6)


def test_ptx_config_errors():
    from types import SimpleNamespace

    from megatron_rlhf.config import ConfigError, load_config
    from megatron_rlhf.recipes.dpo import PtxMix
    from megatron_rlhf.training.ptx import PretrainMix

    cfg = load_config("examples/tiny/dpo.yaml", [])
    assert (cfg.dpo.pretrain_path, cfg.dpo.ptx_coef, cfg.dpo.ptx_ratio) == ("", 0.0, 1.0)  # off by default
    pretrain = ["dpo.pretrain_path=examples/tiny/data/pretrain.jsonl"]
    for overrides, message in (
        (["dpo.ptx_coef=0.5"], "dpo.ptx_coef=0.5 needs pretraining text, but dpo.pretrain_path is empty: set dpo.pretrain_path="),
        ([*pretrain, "dpo.ptx_coef=-0.1"], "dpo.ptx_coef=-0.1 must be >= 0"),
        ([*pretrain, "dpo.ptx_ratio=-1"], "dpo.ptx_ratio=-1.0 must be >= 0"),
        ([*pretrain, "dpo.ptx_coef=0.5", "dpo.ptx_ratio=0"], "dpo.ptx_ratio=0 mixes none of it into a step: set dpo.ptx_ratio > 0"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
            load_config("examples/tiny/dpo.yaml", overrides)
    # each data-parallel rank trains an equal share of the step's pretraining sequences
    cfg = load_config("examples/tiny/dpo.yaml", [*pretrain, "dpo.ptx_ratio=0.75", "train.global_batch_size=6"])
    mix = PretrainMix(SimpleNamespace(cfg=cfg, dp=2), [])
    with pytest.raises(ConfigError, match=r"dpo\.ptx_ratio=0\.75 x train\.global_batch_size=6 gives 5 pretraining sequences a step, "
                                          r"not a multiple of the data-parallel size 2; change dpo\.ptx_ratio"):
        PtxMix(mix, 5, forward_fn=None)
    PtxMix(mix, 4, forward_fn=None)
