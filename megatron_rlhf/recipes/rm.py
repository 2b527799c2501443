"""Recipe 2, the reward model (InstructGPT §3.5 and eq. 1): learn the labellers' rankings.

The network is the SFT GPTModel with its unembedding replaced by a scalar head
(``build_model(..., scalar_head=True)``), initialised from an SFT checkpoint
(``model.init_from``; the head starts fresh). The reward of a response is the head's value
at the response's eos (``models/reward.py``).

Loss, InstructGPT eq. 1: for each prompt, ALL its K responses go through one forward pass
(a micro-batch holds whole prompts: ``train.global_batch_size`` and
``train.micro_batch_size`` count PROMPTS; with ``data.packing`` a prompt's responses are
separate sequences of one packed micro-batch), and every strictly ordered pair contributes
``-log sigmoid(r_w - r_l)``, averaged over the prompt's pairs (1/C(K,2) without ties),
then over the prompts of the global batch (``algorithms.ranking.ranking_report``: the sum
over a micro-batch's prompts, counted in prompts, so the schedule's division by the global
count is the mean over prompts). K may differ between prompts.

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

from megatron_rlhf.algorithms.ranking import RankingPairs, build_ranking_pairs, ranking_report
from megatron_rlhf.checkpoint import check_compatible, check_kind, load_checkpoint, network_kind, read_meta, resolve_checkpoint, save_checkpoint
from megatron_rlhf.checkpoint.io import load_weights
from megatron_rlhf.config import Config, ConfigError
from megatron_rlhf.data import ComparisonBatch, ComparisonExample, collate_comparisons, load_comparisons
from megatron_rlhf.data.packing import comparison_unit_length, is_packed, pack_comparisons
from megatron_rlhf.data.responses import load_responses
from megatron_rlhf.models.attention import packed_seq_params
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.models.reward import fold_bias, read_rewards, score_sequences, value_forward
from megatron_rlhf.parallel import data_parallel_sum, is_rank0
from megatron_rlhf.training import loop
from megatron_rlhf.training.metrics import MetricsLogger
from megatron_rlhf.training.supervised import SupervisedRecipe, SupervisedTask, load_train_valid

FILLER_RANK = 0  # real ranks start at 1; rows of this rank are evaluation padding and count nowhere


def micro_pairs(batch: ComparisonBatch) -> Tuple[Optional[torch.Tensor], Optional[RankingPairs]]:
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


def forward_step(model, batch: ComparisonBatch, center_coef: float = 0.0):
    """One forward over every response of the micro-batch's prompts; the loss is
    ``ranking_report`` (InstructGPT eq. 1, plus reward centering when ``center_coef`` > 0)."""
    real_rows, pairs = micro_pairs(batch)
    packed = is_packed(batch)
    if packed:  # data.packing: one row of responses end to end, attention kept inside each
        output = model(batch.tokens, batch.position_ids, None, packed_seq_params=packed_seq_params(batch))
    else:
        output = value_forward(model, batch)

    def loss_fn(values):
        if packed:  # the row's values seen once per response, each read at its own eos
            values = values.reshape(1, -1).expand(batch.last_index.shape[0], -1)
        rewards = read_rewards(values, batch.last_index)
        if pairs is None:  # evaluation padding only: contributes nothing, keeps the graph
            zero = rewards.sum() * 0.0
            return zero, 0, {}
        return ranking_report(rewards[real_rows], pairs, center_coef)

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
        forward_fn=partial(forward_step, center_coef=cfg.rm.center_coef),
        select_metric="eval/accuracy",
        select_mode="max",
        count_tokens=lambda b: int(b.cu_seqlens[b.num_sequences]) if is_packed(b) else int((b.last_index + 1).sum()),
        pad_example=_filler,
        extra_meta=lambda: {"reward_readout": "eos"},
        rows_of=lambda example: len(example.response_ids),
        pack=partial(pack_comparisons, pad_id=pad_id),  # a prompt and all its responses stay in one micro-batch
        unit_length=comparison_unit_length,
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


def load_demonstrations(cfg: Config, tokenizer) -> List[List[int]]:
    _, demos, demo_stats = load_responses(cfg.rm.demonstrations_path, tokenizer, cfg.model.seq_length, skip_too_long=True)
    if demo_stats.dropped and is_rank0():
        print(f"[rm] {cfg.rm.demonstrations_path}: {demo_stats.dropped} demonstration(s) too long to score are left out of the normalisation (e.g. {', '.join(demo_stats.examples)})")
    if not demos:
        raise ConfigError(f"rm.demonstrations_path={cfg.rm.demonstrations_path}: no demonstration fits model.seq_length={cfg.model.seq_length}")
    return demos


def run(cfg: Config) -> dict:
    check_rm_config(cfg)
    # 1. set up: processes, seeds, the tokenizer
    ctx = loop.setup(cfg)
    # 2. the rankings and the demonstrations (validated before a model is built)
    train_examples, valid_examples, stats = load_rm_data(cfg, ctx.tokenizer)
    if (stats.truncated or stats.dropped) and is_rank0():
        print(f"[rm] {cfg.data.train_path}: {stats}")
    demos = load_demonstrations(cfg, ctx.tokenizer) if cfg.rm.normalize else []
    # 3. the SFT network with a fresh scalar head in place of its unembedding
    model = build_model(cfg.model, cfg.parallel, ctx.tokenizer.vocab_size, scalar_head=True, seed=cfg.train.seed)
    if cfg.parallel.pipeline_model_parallel_size > 1:
        # K varies between prompts, so micro-batches differ in rows: stages exchange shapes.
        model.config.variable_seq_lengths = True
    if cfg.model.init_from:
        init = resolve_checkpoint(cfg.model.init_from)
        meta = check_compatible(init, cfg, ctx.tokenizer)
        network = check_kind(init, meta, ("policy", "reward"), "model.init_from")
        # from a reward model: keep its head; from a policy (SFT, PPO actor): its unembedding
        # gives way to the fresh scalar head
        load_weights(model, init, name=network, skip_output_layer=network_kind(meta, network) != "reward")
    elif is_rank0():
        print("[rm] model.init_from is not set: the reward model starts from random weights (InstructGPT starts it from the SFT model)")
    # 4. train on eq. 1, select by held-out pairwise accuracy
    recipe = SupervisedRecipe(ctx, model, make_task(cfg, train_examples, valid_examples, ctx.tokenizer.pad_id))
    result = loop.run(ctx, recipe)
    # 5. normalise: the demonstrations' mean reward becomes 0
    if result["status"] == "done" and cfg.rm.normalize:
        rows = cfg.train.micro_batch_size * max(len(e.response_ids) for e in train_examples)
        result["rm_bias"] = normalize_checkpoints(ctx, recipe.model, recipe.optimizers["model"], demos, rows)
    return result


def mean_reward(ctx: loop.RunContext, model, sequences: List[List[int]], micro_batch_size: int) -> Tuple[float, int]:
    """Mean reward over ``sequences``, each data-parallel rank scoring its share."""
    mine = sequences[ctx.dp_rank :: ctx.dp]
    rewards = score_sequences(model, mine, micro_batch_size, ctx.tokenizer.pad_id)
    total, count = data_parallel_sum([rewards.double().sum().item(), len(mine)])
    return total / count, int(count)


def normalize_checkpoints(ctx: loop.RunContext, model, optimizer, demos: List[List[int]], micro_batch_size: int) -> float:
    """Fold ``-mean demonstration reward`` into the head's bias of the final and best checkpoints.

    Each is rewritten in place at its own iteration, with its own optimizer and loop state,
    so ``latest``/``best`` point where they did and resume stays exact. The best one is
    done first: rewriting a checkpoint moves ``latest`` to it, and the final one must end
    up ``latest``. Idempotent: a checkpoint whose meta has ``rm_bias`` is left alone.
    """
    final = resolve_checkpoint(ctx.checkpoints_dir)
    best_file = ctx.checkpoints_dir / "best"
    best = resolve_checkpoint(best_file) if best_file.is_file() else None
    todo = [c for c in ([best] if best is not None and best != final else []) + [final] if "rm_bias" not in read_meta(c)]
    final_bias = read_meta(final).get("rm_bias", 0.0)
    holds_final = True  # the loop leaves the final weights and optimizer in memory
    for ckpt in todo:
        if ckpt != final or not holds_final:
            load_checkpoint(ckpt, {"model": model}, {"model": optimizer})
            holds_final = ckpt == final
        mean, count = mean_reward(ctx, model, demos, micro_batch_size)
        fold_bias(model, -mean)
        meta = read_meta(ckpt)
        new_meta = {k: v for k, v in meta.items() if k not in ("iteration", "layout", "networks")}  # save_checkpoint rewrites these
        new_meta.update(
            rm_bias=-mean, rm_bias_folded=True,
            rm_normalization={"demonstrations": ctx.cfg.rm.demonstrations_path, "count": count, "mean_reward_before": mean},
        )
        state = torch.load(ckpt / "state.pt", weights_only=False)
        iteration = meta["iteration"]
        save_checkpoint(ctx.checkpoints_dir, iteration, {"model": model}, new_meta, {"model": optimizer}, state, ctx.tokenizer.serialized_model())
        if is_rank0():
            print(f"[rm] {ckpt.name}: mean reward over {count} demonstrations was {mean:+.6f}; folded bias {-mean:+.6f} into the scalar head")
        if ckpt == final:
            final_bias = -mean
            logger = MetricsLogger(ctx.output_dir, iteration, tensorboard=False, progress_bar=False)
            logger.log(iteration, {"rm/bias": -mean, "rm/demo_reward_mean_raw": mean})
            logger.close()
    return final_bias
