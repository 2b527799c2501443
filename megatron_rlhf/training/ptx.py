"""The pretraining mix (ptx, InstructGPT eq. 2's ``gamma * E_x~D_pretrain[log pi(x)]``) as a
stream of training micro-batches, shared by the recipes that mix it into their step (PPO, DPO).

The recipe asks for the next ``count`` pretraining sequences of a global batch; each
data-parallel rank gets its contiguous share (``rank_slice``), in micro-batches of
``train.micro_batch_size`` sequences, or with ``data.packing`` bins of as many tokens. The
order is layout-independent (``DataPosition`` with ``train.seed + 1``), so the same sequences
train at any DP size, and the position is part of the recipe's checkpoint state. How the
pretraining NLL is weighted against the recipe's own loss is ``algorithms.ppo.ptx_report``'s.
"""

from __future__ import annotations

from functools import partial

from megatron_rlhf.data import SftExample, collate_sft, load_pretrain
from megatron_rlhf.data.packing import pack_microbatches, pack_sft, sft_unit_length
from megatron_rlhf.parallel import data_parallel_sum, to_device
from megatron_rlhf.training.loop import DataPosition, RunContext, rank_slice


class PretrainMix:
    """Pretraining chunks (``data.prompts.load_pretrain``) and where the run is in them."""

    def __init__(self, ctx: RunContext, examples: list[SftExample]):
        self.ctx, self.examples = ctx, examples
        self.position = DataPosition()

    @classmethod
    def from_file(cls, ctx: RunContext, path: str) -> "PretrainMix":
        """JSONL ``{"text": ...}`` cut into ``model.seq_length`` chunks."""
        return cls(ctx, load_pretrain(path, ctx.tokenizer, ctx.cfg.model.seq_length))

    def microbatches(self, count: int) -> list:
        """This rank's share of the next ``count`` pretraining sequences, as ``SftBatch`` micro-batches
        on the device (empty when the share is)."""
        cfg, ctx = self.ctx.cfg, self.ctx
        indices = self.position.next_batch(len(self.examples), count, cfg.train.seed + 1, cfg.data.shuffle)
        mine = [self.examples[i] for i in rank_slice(indices, ctx.dp, ctx.dp_rank)]
        if not mine:
            return []
        mbs, pad_id = cfg.train.micro_batch_size, ctx.tokenizer.pad_id
        if cfg.data.packing:  # bins of an unpacked micro-batch's tokens, no padding between the chunks
            return [to_device(b) for b in pack_microbatches(mine, sft_unit_length, partial(pack_sft, pad_id=pad_id), mbs * cfg.model.seq_length)]
        batch = collate_sft(mine, pad_id=pad_id, max_len=cfg.model.seq_length)
        return [to_device(type(batch)(*(t[i : i + mbs] for t in batch))) for i in range(0, len(mine), mbs)]

    def state_dict(self) -> dict:
        return vars(self.position).copy()

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition(**state)


def global_tokens(batches: list) -> float:
    """The pretraining tokens counted (``loss_mask``) in every rank's ``batches`` together: the
    N_D of ``ptx_report``. A collective: every data-parallel rank calls it."""
    (tokens,) = data_parallel_sum([sum(float(b.loss_mask.sum()) for b in batches)])
    return tokens
