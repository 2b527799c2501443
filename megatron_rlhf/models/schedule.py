"""Micro-batches through Megatron-Core's schedule (1F1B with PP>1), with or without backward.

A caller hands over a list of micro-batches and a ``forward_fn(model, batch)`` returning
``(output, loss_fn)``. ``loss_fn(output) -> (loss_sum, count, {name: (sum, count)})`` is the
contract of the builders in ``algorithms/losses.py``: a SUM over this micro-batch and the
number of units (tokens, prompts) it covers. With ``config.calculate_per_token_loss``
Megatron sums the counts over micro-batches and data-parallel ranks and divides the
gradients by that global count, so the step is the same at any DP/PP size and any split
into micro-batches. The metrics are reduced the same way (global sum / global count).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rlhf.models.builder import unwrap
from megatron_rlhf.parallel import all_reduce, device


def _forward_step(forward_fn, data_iterator, model):
    batch = next(data_iterator)
    output, loss_fn = forward_fn(model, batch)
    return output, partial(_report, loss_fn)


def _report(loss_fn, output):
    loss_sum, count, metrics = loss_fn(output)
    packed = {
        name: torch.stack([torch.as_tensor(s).detach().float().reshape(()).cpu(), torch.as_tensor(c, dtype=torch.float32).reshape(()).cpu()])
        for name, (s, c) in metrics.items()
    }
    return loss_sum, torch.as_tensor(count, dtype=torch.int).reshape(()), packed


def _schedule(step_func, model, microbatches: list, seq_length: int, micro_batch_size: int, forward_only: bool, collect_non_loss_data: bool = False):
    return get_forward_backward_func()(
        forward_step_func=step_func,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )


def batch_shape(microbatches: list) -> tuple[int, int]:
    """``(seq_length, micro_batch_size)`` to announce to the schedule: the widest and tallest
    micro-batch (under PP with ``variable_seq_lengths`` the stages exchange exact shapes)."""
    return max(b.tokens.shape[1] for b in microbatches), max(b.tokens.shape[0] for b in microbatches)


def run_schedule(model, microbatches: list, forward_fn: Callable, forward_only: bool) -> dict[str, tuple[float, float]]:
    """Run ``microbatches`` through the schedule; return ``{name: (global sum, global count)}``.

    The metrics live on the last pipeline stage; they are summed over micro-batches and
    data-parallel ranks there and shared with every stage, so any rank may log them.
    """
    seq_length, micro_batch_size = batch_shape(microbatches)
    results = _schedule(partial(_forward_step, forward_fn), model, microbatches, seq_length, micro_batch_size, forward_only)
    names = sorted({name for item in results for name in item}) if parallel_state.is_pipeline_last_stage() else []
    names = _names_from_last_stage(names)
    totals = torch.zeros(len(names), 2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        for item in results:
            for i, name in enumerate(names):
                if name in item:
                    totals[i] += item[name].double()
    if dist.is_initialized():
        totals = all_reduce(totals, parallel_state.get_data_parallel_group())
        totals = all_reduce(totals, parallel_state.get_pipeline_model_parallel_group())
    return {name: (float(totals[i, 0]), float(totals[i, 1])) for i, name in enumerate(names)}


def _names_from_last_stage(names: list[str]) -> list[str]:
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return names
    box = [names]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def means(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """``{name: sum / count}`` for the metrics that counted anything."""
    return {name: s / c for name, (s, c) in totals.items() if c > 0}


def _collect_step(forward_fn, data_iterator, model):
    batch = next(data_iterator)
    output, read = forward_fn(model, batch)
    return output, lambda out, non_loss_data=False: read(out)


def forward_collect(model, microbatches: list, forward_fn: Callable) -> Optional[list]:
    """Forward-only pass of Megatron's schedule that returns what ``read`` gives per micro-batch.

    ``forward_fn(model, batch)`` returns ``(output, read)``; ``read(output)`` runs on the last
    pipeline stage. Returns the list of ``read`` results, in micro-batch order, on the last
    stage and None on the others (share them with :func:`broadcast_from_last_stage`).
    Micro-batches may differ in rows and width (under PP the stages exchange shapes first).
    The model is put in eval mode and restored afterwards; call under ``torch.no_grad()``.
    """
    inner = unwrap(model)
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    previous_variable = inner.config.variable_seq_lengths
    inner.config.variable_seq_lengths = previous_variable or pipelined
    was_training = model.training
    model.eval()
    seq_length, micro_batch_size = batch_shape(microbatches)
    try:
        outputs = _schedule(
            partial(_collect_step, forward_fn), model, microbatches, seq_length, micro_batch_size, forward_only=True, collect_non_loss_data=True
        )
    finally:
        inner.config.variable_seq_lengths = previous_variable
        model.train(was_training)
    return list(outputs) if parallel_state.is_pipeline_last_stage() else None


def broadcast_from_last_stage(tensor: Optional[torch.Tensor], shape, dtype=torch.float32) -> torch.Tensor:
    """``tensor`` (given on the last pipeline stage) on every stage of this rank's pipeline group.

    Elsewhere pass None: a buffer of ``shape``/``dtype`` is received. A no-op without PP.
    """
    if parallel_state.is_pipeline_last_stage():
        tensor = tensor.to(device=device(), dtype=dtype).contiguous()
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"broadcast_from_last_stage: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")
    else:
        tensor = torch.empty(tuple(shape), dtype=dtype, device=device())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            tensor,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return tensor
