"""Recipe: DPO (Rafailov et al., 2023): learn the labellers' rankings directly in the policy, no reward model.

    megatron-rlhf dpo --config examples/tiny/dpo.yaml model.init_from=runs/tiny/sft/checkpoints/best

1. The policy starts from an SFT checkpoint (``model.init_from``); a frozen REFERENCE is built
   from the same weights, on the same devices and layout (no gradients, no optimizer state).
2. Data: the reward model's comparison files (``data.load_comparisons``: K-way rankings with
   ties, ``order``, or ``chosen``/``rejected``). ``train.global_batch_size`` and
   ``train.micro_batch_size`` count PROMPTS, as in the RM stage; all K responses of a prompt go
   through one forward of the policy and one of the reference.
3. ``log pi(y|x)`` of a response is the sum of its token log-probs (eos included) from the
   vocab-parallel logits (``models.logprobs.token_logprobs``). The reference's are computed once
   per batch, before the policy's schedule, by Megatron's forward-only schedule (so any TP/PP
   layout works); the policy's inside the training schedule.
4. Loss (``algorithms.dpo``): the implicit reward ``dpo.beta * (log pi - log pi_ref)`` in either
   ``dpo.loss: pairwise`` (every untied pair, each prompt's pairs averaged: InstructGPT's
   weighting) or ``plackett_luce`` (the ranking's likelihood, DPO appendix A.3). The loss_fn
   reports the sum over its prompts with the prompt count, so the loop's division by the global
   count is the mean over the global batch's prompts.
5. Metrics ``loss``, ``accuracy`` (implicit reward of the preferred response higher),
   ``margin``, ``chosen_reward``, ``rejected_reward`` (train/ and eval/); the checkpoint with
   the best held-out ``eval/accuracy`` becomes ``checkpoints/best``. Checkpoints are of kind
   "policy": the RM, PPO and ``generate`` read them as they read an SFT checkpoint.

Left out on purpose: the ptx (pretraining) term; it belongs to the one loop that mixes data
sources for PPO too.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import torch

from megatron_rlhf.algorithms.dpo import dpo_report, response_logprob_sums
from megatron_rlhf.checkpoint import check_compatible, check_kind, load_weights, policy_network, resolve_checkpoint
from megatron_rlhf.config import Config, ConfigError
from megatron_rlhf.data import ComparisonExample, collate_comparisons, load_comparisons
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.models.logprobs import token_logprobs
from megatron_rlhf.models.scoring import sequence_logprobs
from megatron_rlhf.parallel import is_rank0, to_device
from megatron_rlhf.recipes.rm import _filler, micro_pairs
from megatron_rlhf.training import loop
from megatron_rlhf.training.supervised import SupervisedRecipe, SupervisedTask, load_train_valid


class DpoBatch(NamedTuple):
    """A ``ComparisonBatch`` (all K responses of each prompt as rows, prompt by prompt) plus what
    DPO needs: which next-token positions are the response, and the reference's log-probs."""

    tokens: torch.Tensor  # [N, s] long, right-padded
    position_ids: torch.Tensor  # [N, s] long
    last_index: torch.Tensor  # [N] long: position of each row's eos
    prompt_of: torch.Tensor  # [N] long: prompt of each row, 0..P-1 within the batch
    ranks: torch.Tensor  # [N] long: rank among its prompt's responses (1 = best; 0 = eval filler)
    response_mask: torch.Tensor  # [N, s-1] bool: position t predicts a response token t+1 (eos included)
    ref_logps: torch.Tensor  # [N] float32: log pi_ref(response | prompt)


def response_mask_of(examples: Sequence[ComparisonExample], width: int) -> torch.Tensor:
    """``[N, width-1]`` True at position t when token t+1 is a response token of its row."""
    rows = [(len(e.prompt_ids), len(r)) for e in examples for r in e.response_ids]
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for row, (prompt_len, response_len) in enumerate(rows):
        # tokens prompt_len .. prompt_len + response_len - 1 are the response; t = token - 1
        mask[row, prompt_len - 1 : min(prompt_len - 1 + response_len, width - 1)] = True
    return mask


def collate_dpo(examples: Sequence[ComparisonExample], *, reference, pad_id: int, max_len: int, vocab_size: int, rows_per_forward: int) -> DpoBatch:
    """``collate_comparisons`` plus the response mask and the frozen reference's sequence log-probs.

    The reference runs Megatron's forward-only schedule over the batch in chunks of
    ``rows_per_forward`` rows (every rank of a pipeline receives the result).
    """
    batch = collate_comparisons(examples, pad_id=pad_id, max_len=max_len)
    mask = response_mask_of(examples, batch.tokens.shape[1])
    tokens = to_device(batch).tokens
    ref_token_logprobs = sequence_logprobs(reference, tokens, vocab_size, rows_per_forward)
    ref_logps = response_logprob_sums(ref_token_logprobs, mask.to(ref_token_logprobs.device)).float().cpu()
    return DpoBatch(*batch, mask, ref_logps)


def dpo_forward(model, batch: DpoBatch, *, beta: float, loss_type: str, vocab_size: int):
    """One forward of the policy over every response of the micro-batch's prompts; the loss is
    ``algorithms.dpo.dpo_report`` (the sum over the prompts, with the prompt count)."""
    real_rows, pairs = micro_pairs(batch)
    logits = model(batch.tokens, batch.position_ids, None)

    def loss_fn(logits):
        logprobs = token_logprobs(logits[:, :-1], batch.tokens[:, 1:], vocab_size)
        policy_logps = response_logprob_sums(logprobs, batch.response_mask)
        if pairs is None:  # evaluation padding only: contributes nothing, keeps the graph
            return policy_logps.sum() * 0.0, 0, {}
        return dpo_report(policy_logps[real_rows], batch.ref_logps[real_rows].to(policy_logps.device), batch.ranks[real_rows], pairs, beta, loss_type)

    return logits, loss_fn


def check_dpo_config(cfg: Config) -> None:
    """DPO's checks on the config alone, made before any data or model is touched."""
    if not cfg.model.init_from:
        raise ConfigError(
            "DPO starts the policy and its frozen reference from an SFT checkpoint: set model.init_from=<sft run or checkpoint>"
        )
    if not cfg.data.train_path:
        raise ConfigError("set data.train_path to comparisons (the reward model's format: K-way rankings or chosen/rejected)")


def _load_policy(model, init, cfg: Config, tokenizer) -> None:
    meta = check_compatible(init, cfg, tokenizer)
    check_kind(init, meta, "policy", "model.init_from")
    load_weights(model, init, name=policy_network(meta))


def make_task(cfg: Config, train_examples, valid_examples, reference, tokenizer) -> SupervisedTask:
    max_k = max(len(e.response_ids) for e in list(train_examples) + list(valid_examples))
    return SupervisedTask(
        kind="policy",
        train_examples=train_examples,
        valid_examples=valid_examples,
        collate=partial(
            collate_dpo, reference=reference, pad_id=tokenizer.pad_id, max_len=cfg.model.seq_length,
            vocab_size=tokenizer.vocab_size, rows_per_forward=cfg.train.micro_batch_size * max_k,
        ),
        forward_fn=partial(dpo_forward, beta=cfg.dpo.beta, loss_type=cfg.dpo.loss, vocab_size=tokenizer.vocab_size),
        select_metric="eval/accuracy",
        select_mode="max",
        count_tokens=lambda b: int((b.last_index + 1).sum()),
        pad_example=_filler,
        extra_meta=lambda: {"dpo": {"beta": cfg.dpo.beta, "loss": cfg.dpo.loss, "reference": str(resolve_checkpoint(cfg.model.init_from))}},
        rows_of=lambda example: len(example.response_ids),
    )


def run(cfg: Config) -> dict:
    check_dpo_config(cfg)
    # 1. set up: processes, seeds, the tokenizer
    ctx = loop.setup(cfg)
    # 2. the comparisons (every line validated before a model is built)
    train_examples, valid_examples, stats = load_train_valid(cfg, ctx.tokenizer, load_comparisons)
    if (stats.truncated or stats.dropped) and is_rank0():
        print(f"[dpo] {cfg.data.train_path}: {stats}")
    # 3. the policy and its frozen reference, both from the SFT checkpoint
    init = resolve_checkpoint(cfg.model.init_from)
    vocab = ctx.tokenizer.vocab_size
    model = build_model(cfg.model, cfg.parallel, vocab, seed=cfg.train.seed)
    _load_policy(model, init, cfg, ctx.tokenizer)
    reference = build_model(cfg.model, cfg.parallel, vocab, seed=cfg.train.seed)
    _load_policy(reference, init, cfg, ctx.tokenizer)
    reference.requires_grad_(False)
    reference.eval()
    if cfg.parallel.pipeline_model_parallel_size > 1:
        # K varies between prompts, so micro-batches differ in rows: stages exchange shapes.
        model.config.variable_seq_lengths = True
        reference.config.variable_seq_lengths = True
    # 4. train on the DPO loss, select by held-out implicit-reward accuracy
    task = make_task(cfg, train_examples, valid_examples, reference, ctx.tokenizer)
    return loop.run(ctx, SupervisedRecipe(ctx, model, task))
