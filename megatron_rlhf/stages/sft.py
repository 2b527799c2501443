"""Stage 1, supervised fine-tuning (InstructGPT §3.5): learn the labellers' demonstrations.

Next-token cross-entropy on the RESPONSE tokens only (the prompt and padding are masked:
``loss_mask`` is True where a target counts), averaged over all response tokens of the
global batch. Cosine LR decay, residual dropout (the paper: 0.2), several epochs, and the
checkpoint with the lowest validation loss marked ``checkpoints/best``. Left out on
purpose: the paper selected SFT models by RM score on a validation set; we select by
validation loss, which needs no reward model yet.
"""

from __future__ import annotations

from functools import partial

from megatron_rlhf.config import Config
from megatron_rlhf.data import SftExample, collate_sft, load_sft
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.stages.common import SupervisedTask, check_compatible, load_train_valid, run_supervised, setup_stage
from megatron_rlhf.training import checkpoint as ckpt_lib
from megatron_rlhf.training.trainer import steps_for, wrap_for_training


def sft_forward(model, batch):
    """Per-token NLL from Megatron's (vocab-parallel) cross-entropy, summed over the mask."""
    output = model(batch.tokens, batch.position_ids, None, labels=batch.labels)

    def loss_fn(token_nll):
        mask = batch.loss_mask.float()
        loss_sum = (token_nll.float() * mask).sum()
        count = mask.sum()
        return loss_sum, count, {"loss": (loss_sum, count)}

    return output, loss_fn


def load_sft_data(cfg: Config, tokenizer):
    return load_train_valid(cfg, tokenizer, load_sft)


def run(cfg: Config) -> dict:
    ctx = setup_stage(cfg)
    train_examples, valid_examples, stats = load_sft_data(cfg, ctx.tokenizer)
    if stats.truncated or stats.dropped:
        print(f"[sft] {cfg.data.train_path}: {stats.truncated} truncated, {stats.dropped} dropped (data.truncation={cfg.data.truncation}); e.g. {', '.join(stats.examples[:3])}")
    model = build_model(cfg.model, cfg.parallel, ctx.tokenizer.vocab_size, seed=cfg.train.seed)
    if cfg.model.init_from:
        init = ckpt_lib.resolve_checkpoint(cfg.model.init_from)
        check_compatible(init, cfg, ctx.tokenizer)
        ckpt_lib.load_weights(model, init, name=_policy_network(init))
    total = steps_for(len(train_examples), cfg.train.global_batch_size, cfg.train.epochs, cfg.train.max_steps)
    ddp, optimizer, scheduler = wrap_for_training(model, cfg.parallel, cfg.train, total_steps=total)
    pad = ctx.tokenizer.pad_id
    task = SupervisedTask(
        kind="policy",
        train_examples=train_examples,
        valid_examples=valid_examples,
        collate=partial(collate_sft, pad_id=pad, max_len=cfg.model.seq_length),
        forward_fn=sft_forward,
        metric_names=["loss"],
        count_tokens=lambda b: int(b.loss_mask.sum()),
        pad_example=_no_loss,
    )
    return run_supervised(ctx, ddp, optimizer, scheduler, task, total)


def _no_loss(example: SftExample) -> SftExample:
    """An evaluation filler with no response tokens: its loss mask is empty."""
    return SftExample(list(example.prompt_ids) + list(example.response_ids), [])


def _policy_network(ckpt) -> str:
    networks = ckpt_lib.read_meta(ckpt).get("networks", ["model"])
    return "actor" if "actor" in networks else "model"
