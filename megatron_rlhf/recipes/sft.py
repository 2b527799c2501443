"""Recipe 1, supervised fine-tuning (InstructGPT §3.5): learn the labellers' demonstrations.

Next-token cross-entropy on the RESPONSE tokens only (the prompt and padding are masked:
``loss_mask`` is True where a target counts), averaged over all response tokens of the
global batch (``algorithms.sft.sft_report``; padded vocabulary ids get no probability).
Cosine LR decay, residual dropout (the paper: 0.2), several epochs, and the checkpoint with
the lowest validation loss marked ``checkpoints/best``. Left out on purpose: the paper
selected SFT models by RM score on a validation set; we select by validation loss, which
needs no reward model yet.
"""

from __future__ import annotations

from functools import partial

from megatron_rlhf.algorithms.sft import sft_report
from megatron_rlhf.checkpoint import check_compatible, check_kind, load_weights, policy_network, resolve_checkpoint
from megatron_rlhf.config import Config
from megatron_rlhf.data import SftExample, collate_sft, load_sft
from megatron_rlhf.data.packing import pack_sft, sft_unit_length
from megatron_rlhf.models.attention import packed_seq_params
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.models.logprobs import token_logprobs
from megatron_rlhf.parallel import is_rank0
from megatron_rlhf.training import loop
from megatron_rlhf.training.supervised import SupervisedRecipe, SupervisedTask, load_train_valid


def forward_step(model, batch, *, vocab_size: int):
    """Logits of every position; the loss is ``sft_report`` of the targets' log-probs.
    A packed batch (``data.packing``) carries its sequence boundaries to the attention."""
    logits = model(batch.tokens, batch.position_ids, None, packed_seq_params=packed_seq_params(batch))
    return logits, lambda logits: sft_report(token_logprobs(logits, batch.labels, vocab_size), batch.loss_mask)


def _no_loss(example: SftExample) -> SftExample:
    """An evaluation filler with no response tokens: its loss mask is empty."""
    return SftExample(list(example.prompt_ids) + list(example.response_ids), [])


def run(cfg: Config) -> dict:
    # 1. set up: processes, seeds, the tokenizer
    ctx = loop.setup(cfg)
    # 2. the demonstrations (every line validated before a model is built)
    train_examples, valid_examples, stats = load_train_valid(cfg, ctx.tokenizer, load_sft)
    if (stats.truncated or stats.dropped) and is_rank0():
        print(f"[sft] {cfg.data.train_path}: {stats.truncated} truncated, {stats.dropped} dropped (data.truncation={cfg.data.truncation}); e.g. {', '.join(stats.examples[:3])}")
    # 3. the policy, from a pretrained/converted checkpoint when model.init_from is set
    model = build_model(cfg.model, cfg.parallel, ctx.tokenizer.vocab_size, seed=cfg.train.seed)
    if cfg.model.init_from:
        init = resolve_checkpoint(cfg.model.init_from)
        meta = check_compatible(init, cfg, ctx.tokenizer)
        check_kind(init, meta, "policy", "model.init_from")
        load_weights(model, init, name=policy_network(meta))
    # 4. train: next-token loss on the response tokens
    task = SupervisedTask(
        kind="policy",
        train_examples=train_examples,
        valid_examples=valid_examples,
        collate=partial(collate_sft, pad_id=ctx.tokenizer.pad_id, max_len=cfg.model.seq_length),
        forward_fn=partial(forward_step, vocab_size=ctx.tokenizer.vocab_size),
        count_tokens=lambda b: int(b.loss_mask.sum()),
        pad_example=_no_loss,
        pack=partial(pack_sft, pad_id=ctx.tokenizer.pad_id),
        unit_length=sft_unit_length,
    )
    return loop.run(ctx, SupervisedRecipe(ctx, model, task))
