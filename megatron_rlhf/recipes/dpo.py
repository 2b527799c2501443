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
5. Optional pretraining mix (InstructGPT's ptx term, shared with PPO: ``training/ptx.py``):
   with ``dpo.pretrain_path``, each step also trains on ``dpo.ptx_ratio`` pretraining
   sequences per prompt of the global batch, as extra micro-batches of the same optimizer
   step, and the step's loss is

       mean over the global batch's prompts of the DPO loss + dpo.ptx_coef x mean per-token NLL
       of the step's pretraining sequences

   at any data-parallel size (``algorithms.ppo.ptx_report`` with the prompt count as the
   global count). ``train/ptx_loss`` is that NLL (logged with ``dpo.ptx_coef=0`` too); the
   stream's position is in the checkpoint, so a resumed run continues it exactly.
6. Metrics ``loss``, ``accuracy`` (implicit reward of the preferred response higher),
   ``margin``, ``chosen_reward``, ``rejected_reward`` (train/ and eval/); the checkpoint with
   the best held-out ``eval/accuracy`` becomes ``checkpoints/best``. Checkpoints are of kind
   "policy": the RM, PPO and ``generate`` read them as they read an SFT checkpoint.

Left out on purpose: evaluating the pretraining NLL (``eval/`` metrics are the DPO ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from megatron_rlhf.algorithms.dpo import dpo_report, response_logprob_sums
from megatron_rlhf.algorithms.ppo import ptx_batch_size, ptx_report
from megatron_rlhf.checkpoint import check_compatible, check_kind, load_weights, policy_network, resolve_checkpoint
from megatron_rlhf.config import Config, ConfigError
from megatron_rlhf.data import ComparisonExample, SftBatch, collate_comparisons, load_comparisons
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.models.logprobs import token_logprobs
from megatron_rlhf.models.scoring import sequence_logprobs
from megatron_rlhf.parallel import is_rank0, to_device
from megatron_rlhf.recipes.rm import _filler, micro_pairs
from megatron_rlhf.training import loop
from megatron_rlhf.training.ptx import PretrainMix, global_tokens
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


def dpo_forward(model, batch, *, beta: float, loss_type: str, vocab_size: int, ptx_coef: float = 0.0, global_prompts: float = 1.0,
                ptx_tokens: float = 1.0):
    """One micro-batch of the DPO step. A ``DpoBatch``: one forward of the policy over every
    response of its prompts; the loss is ``algorithms.dpo.dpo_report`` (the sum over the
    prompts, with the prompt count). A pretraining ``SftBatch`` of the ptx mix: ``ptx_report``
    with count 0, scaled so that after the division by ``global_prompts`` (the global batch's)
    the step adds ``ptx_coef`` x the mean NLL over the step's ``ptx_tokens`` (global)."""
    if isinstance(batch, SftBatch):
        logits = model(batch.tokens, batch.position_ids, None)
        return logits, lambda logits: ptx_report(token_logprobs(logits, batch.labels, vocab_size), batch.loss_mask, ptx_coef, global_prompts, ptx_tokens)
    real_rows, pairs = micro_pairs(batch)
    logits = model(batch.tokens, batch.position_ids, None)

    def loss_fn(logits):
        logprobs = token_logprobs(logits[:, :-1], batch.tokens[:, 1:], vocab_size)
        policy_logps = response_logprob_sums(logprobs, batch.response_mask)
        if pairs is None:  # evaluation padding only: contributes nothing, keeps the graph
            return policy_logps.sum() * 0.0, 0, {}
        return dpo_report(policy_logps[real_rows], batch.ref_logps[real_rows].to(policy_logps.device), batch.ranks[real_rows], pairs, beta, loss_type)

    return logits, loss_fn


@dataclass
class PtxMix:
    """DPO's pretraining mix as the ``SupervisedTask.mix`` of every step: ``sequences``
    pretraining sequences (global) from ``pretrain``, and ``forward_fn`` (``dpo_forward``
    with the ptx coefficient and the prompt count) told their global token count."""

    pretrain: PretrainMix
    sequences: int
    forward_fn: Callable

    def __post_init__(self):
        dp = self.pretrain.ctx.dp
        if self.sequences % dp:  # each rank trains an equal share: the same step at any DP size
            cfg = self.pretrain.ctx.cfg
            raise ConfigError(
                f"dpo.ptx_ratio={cfg.dpo.ptx_ratio} x train.global_batch_size={cfg.train.global_batch_size} gives {self.sequences} "
                f"pretraining sequences a step, not a multiple of the data-parallel size {dp}; change dpo.ptx_ratio"
            )

    def step(self) -> tuple[list, Callable]:
        batches = self.pretrain.microbatches(self.sequences)
        return batches, partial(self.forward_fn, ptx_tokens=global_tokens(batches))

    def state_dict(self) -> dict:
        return self.pretrain.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pretrain.load_state_dict(state)


def _tokens(batch) -> int:
    """Tokens a micro-batch processes (tokens_per_s): comparison rows up to their eos, or pretraining tokens."""
    return int(batch.loss_mask.sum()) if isinstance(batch, SftBatch) else int((batch.last_index + 1).sum())


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


def make_task(cfg: Config, train_examples, valid_examples, reference, tokenizer, pretrain: Optional[PretrainMix] = None) -> SupervisedTask:
    """The DPO task; with ``pretrain`` (``dpo.pretrain_path``'s text) every step mixes it in."""
    max_k = max(len(e.response_ids) for e in list(train_examples) + list(valid_examples))
    forward_fn = partial(dpo_forward, beta=cfg.dpo.beta, loss_type=cfg.dpo.loss, vocab_size=tokenizer.vocab_size, ptx_coef=cfg.dpo.ptx_coef,
                         global_prompts=float(cfg.train.global_batch_size))
    mix = PtxMix(pretrain, ptx_batch_size(cfg.train.global_batch_size, cfg.dpo.ptx_ratio), forward_fn) if pretrain is not None else None
    meta = {"beta": cfg.dpo.beta, "loss": cfg.dpo.loss}
    if mix is not None:
        meta.update(pretrain_path=cfg.dpo.pretrain_path, ptx_coef=cfg.dpo.ptx_coef, ptx_ratio=cfg.dpo.ptx_ratio)
    return SupervisedTask(
        kind="policy",
        train_examples=train_examples,
        valid_examples=valid_examples,
        collate=partial(
            collate_dpo, reference=reference, pad_id=tokenizer.pad_id, max_len=cfg.model.seq_length,
            vocab_size=tokenizer.vocab_size, rows_per_forward=cfg.train.micro_batch_size * max_k,
        ),
        forward_fn=forward_fn,
        select_metric="eval/accuracy",
        select_mode="max",
        count_tokens=_tokens,
        pad_example=_filler,
        extra_meta=lambda: {"dpo": {**meta, "reference": str(resolve_checkpoint(cfg.model.init_from))}},
        rows_of=lambda example: len(example.response_ids),
        mix=mix,
    )


def run(cfg: Config) -> dict:
    check_dpo_config(cfg)
    # 1. set up: processes, seeds, the tokenizer
    ctx = loop.setup(cfg)
    # 2. the comparisons and the pretraining text (every line validated before a model is built)
    train_examples, valid_examples, stats = load_train_valid(cfg, ctx.tokenizer, load_comparisons)
    pretrain = PretrainMix.from_file(ctx, cfg.dpo.pretrain_path) if cfg.dpo.pretrain_path else None
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
    # 4. train on the DPO loss (+ the pretraining mix), select by held-out implicit-reward accuracy
    task = make_task(cfg, train_examples, valid_examples, reference, ctx.tokenizer, pretrain)
    return loop.run(ctx, SupervisedRecipe(ctx, model, task))
