"""Stage 2, the reward model (InstructGPT §3.5 and eq. 1): learn the labellers' rankings.

The network is the SFT GPTModel with its unembedding replaced by a scalar head
(``build_model(..., scalar_head=True)``), initialised from an SFT checkpoint
(``model.init_from``; the head starts fresh). The reward of a response is the head's value
at the response's eos (``models/reward.py``).

Loss, InstructGPT eq. 1: for each prompt, ALL its K responses go through one forward pass
(a micro-batch holds whole prompts: ``train.global_batch_size`` and
``train.micro_batch_size`` count PROMPTS), and every strictly ordered pair contributes
``-log sigmoid(r_w - r_l)``, averaged over the prompt's pairs (1/C(K,2) without ties),
then over the prompts of the global batch. The loss_fn reports the sum over its prompts
with the number of prompts as its count, so Megatron's division by the global count is
the mean over prompts (``training/trainer.py``). K may differ between prompts.

Model selection: the checkpoint with the best held-out pairwise ``eval/accuracy``.

Normalisation (InstructGPT: "normalized so that the labeler demonstrations achieve a mean
score of 0"): after training, the SFT demonstrations (``rm.demonstrations_path``) are scored
and ``-mean`` is FOLDED INTO the scalar head's bias of the final checkpoint (and of
``checkpoints/best`` when that is another one). The network's output is then the
normalised reward; ``meta.json`` records the folded value as ``rm_bias`` with
``rm_bias_folded: true`` for information only: readers must not add it again. Folding
does not disturb training or resume: eq. 1 depends only on reward differences, so the
bias gets no gradient (and Megatron applies no weight decay to biases).
"""

from __future__ import annotations

from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rlhf.algorithms.ranking import build_ranking_pairs, ranking_loss
from megatron_rlhf.config import Config, ConfigError
from megatron_rlhf.data import ComparisonBatch, ComparisonExample, collate_comparisons, load_comparisons
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.models.reward import fold_bias, read_rewards, score_sequences, value_forward
from megatron_rlhf.parallel import is_rank0
from megatron_rlhf.stages.common import StageContext, SupervisedTask, check_compatible, load_train_valid, run_supervised, setup_stage
from megatron_rlhf.stages.score import load_responses
from megatron_rlhf.training import checkpoint as ckpt_lib
from megatron_rlhf.training.metrics import MetricsLogger
from megatron_rlhf.training.trainer import steps_for, wrap_for_training

METRICS = ["loss", "accuracy", "chosen_reward", "rejected_reward", "margin"]
FILLER_RANK = 0  # real ranks start at 1; rows of this rank are evaluation padding and count nowhere


def micro_pairs(batch: ComparisonBatch) -> Tuple[Optional[torch.Tensor], Optional[object]]:
    """The comparison pairs of one micro-batch: ``(real_rows, RankingPairs)``.

    ``real_rows`` indexes the rows that are not filler; the pairs index into
    ``rewards[real_rows]`` (prompt by prompt, as ``build_ranking_pairs`` expects).
    ``(None, None)`` when the micro-batch holds only filler.
    """
    rankings: List[List[int]] = []
    real_rows: List[int] = []
    current = None
    for row, (prompt, rank) in enumerate(zip(batch.prompt_of.tolist(), batch.ranks.tolist())):
        if rank == FILLER_RANK:
            continue
        if prompt != current:
            rankings.append([])
            current = prompt
        rankings[-1].append(rank)
        real_rows.append(row)
    if not rankings:
        return None, None
    device = batch.ranks.device
    return torch.tensor(real_rows, device=device), build_ranking_pairs(rankings, device=device)


def rm_forward(model, batch: ComparisonBatch, center_coef: float = 0.0):
    """One forward over every response of the micro-batch's prompts; the loss is InstructGPT eq. 1
    (plus ``center_coef`` x each prompt's mean squared reward when reward centering is on)."""
    real_rows, pairs = micro_pairs(batch)
    output = value_forward(model, batch)

    def loss_fn(values):
        rewards = read_rewards(values, batch.last_index)
        if pairs is None:  # evaluation padding only: contributes nothing, keeps the graph
            zero = rewards.sum() * 0.0
            return zero, 0, {name: (zero, 0) for name in METRICS}
        rewards = rewards[real_rows]
        # num_prompts=1: the SUM over prompts of each prompt's pair-mean; the count below
        # (prompts) makes Megatron's global division the mean over the batch's prompts.
        loss_sum, _ = ranking_loss(rewards, pairs.winner, pairs.loser, pairs.prompt, num_prompts=1.0)
        if center_coef:
            # per prompt: mean of r^2 over its responses; summed over prompts like the pair means
            _, row_prompt = torch.unique_consecutive(batch.prompt_of[real_rows], return_inverse=True)
            per_prompt = torch.zeros(pairs.num_prompts, dtype=rewards.dtype, device=rewards.device)
            counts = torch.zeros_like(per_prompt)
            per_prompt.index_add_(0, row_prompt, rewards.square())
            counts.index_add_(0, row_prompt, torch.ones_like(rewards))
            loss_sum = loss_sum + center_coef * (per_prompt / counts).sum()
        chosen, rejected = rewards[pairs.winner].detach(), rewards[pairs.loser].detach()
        n_pairs, n_prompts = pairs.winner.numel(), pairs.num_prompts
        return loss_sum, n_prompts, {
            "loss": (loss_sum.detach(), n_prompts),
            "accuracy": (((chosen - rejected) > 0).float().sum(), n_pairs),  # ties in reward count as wrong
            "chosen_reward": (chosen.sum(), n_pairs),
            "rejected_reward": (rejected.sum(), n_pairs),
            "margin": ((chosen - rejected).sum(), n_pairs),
        }

    return output, loss_fn


def _filler(example: ComparisonExample) -> ComparisonExample:
    """An evaluation filler: two minimal rows of the filler rank, no pair, no count."""
    eos = example.response_ids[0][-1:]
    return ComparisonExample(example.prompt_ids[:1], [list(eos), list(eos)], [FILLER_RANK, FILLER_RANK])


def make_task(cfg: Config, train_examples, valid_examples, pad_id: int) -> SupervisedTask:
    return SupervisedTask(
        kind="reward",
        train_examples=train_examples,
        valid_examples=valid_examples,
        collate=partial(collate_comparisons, pad_id=pad_id, max_len=cfg.model.seq_length),
        forward_fn=partial(rm_forward, center_coef=cfg.rm.center_coef),
        metric_names=METRICS,
        select_metric="eval/accuracy",
        select_mode="max",
        count_tokens=lambda b: int((b.last_index + 1).sum()),
        pad_example=_filler,
        extra_meta=lambda: {"reward_readout": "eos"},
        rows_of=lambda example: len(example.response_ids),
    )


def load_rm_data(cfg: Config, tokenizer):
    # An example is a prompt with all its responses, so a data.valid_fraction holdout is by
    # prompt: every comparison of a prompt is on one side.
    return load_train_valid(cfg, tokenizer, load_comparisons)


def check_rm_config(cfg: Config) -> None:
    """The RM's checks on the config alone, made before any data or model is touched
    (tests/test_slurm.py runs them on every example config)."""
    if cfg.rm.normalize and not cfg.rm.demonstrations_path:
        raise ConfigError(
            "rm.normalize=true needs rm.demonstrations_path (the SFT demonstrations, JSONL {\"prompt\", \"response\"}) "
            "to set their mean reward to 0; set it, or rm.normalize=false"
        )


def wrap_rm_for_training(model, cfg: Config, total_steps: int):
    """``wrap_for_training`` with the per-prompt normalisation known to DDP from the start.

    Megatron's DDP reads ``calculate_per_token_loss`` when it is BUILT: set afterwards,
    DDP still averages gradients over data-parallel ranks on top of the division by the
    global count, and at DP > 1 every gradient (and the clipped norm) would be 1/DP too small.
    """
    model.config.calculate_per_token_loss = True
    return wrap_for_training(model, cfg.parallel, cfg.train, total_steps=total_steps)


def run(cfg: Config) -> dict:
    check_rm_config(cfg)
    ctx = setup_stage(cfg)
    # Every data file is validated before a model is built: a bad line fails in seconds.
    train_examples, valid_examples, stats = load_rm_data(cfg, ctx.tokenizer)
    if stats.truncated or stats.dropped:
        print(f"[rm] {cfg.data.train_path}: {stats}")
    demos: List[List[int]] = []
    if cfg.rm.normalize:
        _, demos, demo_stats = load_responses(cfg.rm.demonstrations_path, ctx.tokenizer, cfg.model.seq_length, skip_too_long=True)
        if demo_stats.dropped:
            print(f"[rm] {cfg.rm.demonstrations_path}: {demo_stats.dropped} demonstration(s) too long to score are left out of the normalisation (e.g. {', '.join(demo_stats.examples)})")
        if not demos:
            raise ConfigError(f"rm.demonstrations_path={cfg.rm.demonstrations_path}: no demonstration fits model.seq_length={cfg.model.seq_length}")

    model = build_model(cfg.model, cfg.parallel, ctx.tokenizer.vocab_size, scalar_head=True, seed=cfg.train.seed)
    if cfg.parallel.pipeline_model_parallel_size > 1:
        # K varies between prompts, so micro-batches differ in rows: stages exchange shapes.
        model.config.variable_seq_lengths = True
    if cfg.model.init_from:
        init = ckpt_lib.resolve_checkpoint(cfg.model.init_from)
        meta = check_compatible(init, cfg, ctx.tokenizer)
        if meta.get("kind") == "reward":  # continue from a reward model: keep its head
            ckpt_lib.load_weights(model, init, name="model")
        else:  # an SFT policy (or PPO actor): its unembedding gives way to the fresh scalar head
            network = "actor" if "actor" in meta.get("networks", []) else "model"
            ckpt_lib.load_weights(model, init, name=network, skip_output_layer=True)
    elif is_rank0():
        print("[rm] model.init_from is not set: the reward model starts from random weights (InstructGPT starts it from the SFT model)")
    total = steps_for(len(train_examples), cfg.train.global_batch_size, cfg.train.epochs, cfg.train.max_steps)
    ddp, optimizer, scheduler = wrap_rm_for_training(model, cfg, total)
    task = make_task(cfg, train_examples, valid_examples, ctx.tokenizer.pad_id)
    result = run_supervised(ctx, ddp, optimizer, scheduler, task, total)
    if result["status"] == "done" and cfg.rm.normalize:
        rows = cfg.train.micro_batch_size * max(len(e.response_ids) for e in train_examples)
        result["rm_bias"] = normalize_checkpoints(ctx, ddp, optimizer, demos, rows)
    return result


def mean_reward(model, sequences: List[List[int]], micro_batch_size: int, pad_id: int) -> Tuple[float, int]:
    """Mean reward over ``sequences``, each data-parallel rank scoring its share."""
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = sequences[dp_rank::dp]
    rewards = score_sequences(model, mine, micro_batch_size, pad_id)
    total = torch.tensor([rewards.double().sum().item(), float(len(mine))], dtype=torch.float64)
    if dist.is_initialized() and dp > 1:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        total = total.to(device)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        total = total.cpu()
    return float(total[0] / total[1]), int(total[1])


def normalize_checkpoints(ctx: StageContext, model, optimizer, demos: List[List[int]], micro_batch_size: int) -> float:
    """Fold ``-mean demonstration reward`` into the head's bias of the final and best checkpoints.

    Each is rewritten in place at its own iteration, with its own optimizer and loop state,
    so ``latest``/``best`` point where they did and resume stays exact. The best one is
    done first: rewriting a checkpoint moves ``latest`` to it, and the final one must end
    up ``latest``. Idempotent: a checkpoint whose meta has ``rm_bias`` is left alone.
    """
    final = ckpt_lib.latest_checkpoint(ctx.checkpoints_dir)
    best_file = ctx.checkpoints_dir / "best"
    best = ckpt_lib.resolve_checkpoint(best_file) if best_file.is_file() else None
    todo = [c for c in ([best] if best is not None and best != final else []) + [final] if "rm_bias" not in ckpt_lib.read_meta(c)]
    final_bias = ckpt_lib.read_meta(final).get("rm_bias", 0.0)
    holds_final = True  # run_supervised leaves the final weights and optimizer in memory
    for ckpt in todo:
        if ckpt != final or not holds_final:
            ckpt_lib.load_checkpoint(ckpt, {"model": model}, {"model": optimizer})
            holds_final = ckpt == final
        mean, count = mean_reward(model, demos, micro_batch_size, ctx.tokenizer.pad_id)
        fold_bias(model, -mean)
        meta = ckpt_lib.read_meta(ckpt)
        new_meta = {k: v for k, v in meta.items() if k not in ("iteration", "layout", "networks")}  # save_checkpoint rewrites these
        new_meta.update(
            rm_bias=-mean, rm_bias_folded=True,
            rm_normalization={"demonstrations": ctx.cfg.rm.demonstrations_path, "count": count, "mean_reward_before": mean},
        )
        state = torch.load(ckpt / "state.pt", weights_only=False)
        iteration = meta["iteration"]
        ckpt_lib.save_checkpoint(ctx.checkpoints_dir, iteration, {"model": model}, new_meta, {"model": optimizer}, state, ctx.tokenizer.serialized_model())
        if is_rank0():
            print(f"[rm] {ckpt.name}: mean reward over {count} demonstrations was {mean:+.6f}; folded bias {-mean:+.6f} into the scalar head")
        if ckpt == final:
            final_bias = -mean
            logger = MetricsLogger(ctx.output_dir, iteration, tensorboard=False, progress_bar=False)
            logger.log(iteration, {"rm/bias": -mean, "rm/demo_reward_mean_raw": mean})
            logger.close()
    return final_bias
