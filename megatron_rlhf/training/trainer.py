"""The optimizer step on Megatron-Core: DDP, optimizer, LR schedule, the pipeline schedule.

A stage hands over a list of micro-batches and a ``forward_fn(model, batch)`` returning
``(output, loss_fn)``, with ``loss_fn(output) -> (loss_sum, count, {name: (sum, count)})``.
Megatron's schedule runs them (1F1B with PP>1), sums the counts over micro-batches and
data-parallel ranks and divides the gradients by that global count
(``calculate_per_token_loss``): a loss is a global mean however the batch is split.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rlhf.config import ParallelConfig, TrainConfig


@dataclass
class TrainState:
    """What the loop needs to resume exactly (saved in ``state.pt``)."""

    step: int = 0
    epoch: int = 0
    offset: int = 0  # samples of the current epoch's order already consumed
    skipped_steps: int = 0


def wrap_for_training(model, parallel: ParallelConfig, train: TrainConfig, lr: Optional[float] = None, total_steps: int = 1):
    """Wrap a GPTModel in Megatron DDP and build its optimizer and LR schedule."""
    config = model.config
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=parallel.overlap_grad_reduce,
            use_distributed_optimizer=parallel.use_distributed_optimizer,
        ),
        model,
    )
    lr = train.lr if lr is None else lr
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=lr,
            min_lr=min(train.min_lr, lr),
            weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1,
            adam_beta2=train.adam_beta2,
            adam_eps=train.adam_eps,
            clip_grad=train.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=parallel.use_distributed_optimizer,
        ),
        [ddp],
    )
    warmup = min(train.lr_warmup_steps, max(total_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else lr,
        max_lr=lr,
        min_lr=min(train.min_lr, lr),
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, 1),
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.calculate_per_token_loss = True
    return ddp, optimizer, scheduler


def _forward_step(forward_fn, data_iterator, model):
    batch = next(data_iterator)
    output, loss_fn = forward_fn(model, batch)
    return output, partial(_report, loss_fn)


def _report(loss_fn, output):
    loss_sum, count, metrics = loss_fn(output)
    packed = {name: torch.stack([s.detach().float().reshape(()), torch.as_tensor(c, dtype=torch.float32).reshape(())]) for name, (s, c) in metrics.items()}
    return loss_sum, torch.as_tensor(count, dtype=torch.int).reshape(()), packed


def _schedule(step_func, model, microbatches: list, seq_length: int, micro_batch_size: int, forward_only: bool, collect_non_loss_data: bool = False):
    """One call of Megatron's schedule (1F1B with PP>1) over ``microbatches``."""
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


def run_schedule(
    model,
    microbatches: list,
    forward_fn: Callable,
    metric_names: list[str],
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> dict[str, float]:
    """Run the micro-batches through Megatron's schedule; return globally averaged metrics.

    Metrics are (sum, count) pairs summed over micro-batches and data-parallel ranks on the
    last pipeline stage, then shared with every rank so any rank may log them.
    """
    results = _schedule(partial(_forward_step, forward_fn), model, microbatches, seq_length, micro_batch_size, forward_only)
    totals = torch.zeros(len(metric_names), 2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        for item in results:
            for i, name in enumerate(metric_names):
                if name in item:
                    totals[i] += item[name].double().cpu()
    if dist.is_initialized():
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        totals = totals.to(device)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
        totals = totals.cpu()
    return {name: (totals[i, 0] / totals[i, 1]).item() for i, name in enumerate(metric_names) if totals[i, 1] > 0}


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _collect_step(forward_fn, data_iterator, model):
    batch = next(data_iterator)
    output, read = forward_fn(model, batch)
    return output, lambda out, non_loss_data=False: read(out)


def forward_collect(model, microbatches: list, forward_fn: Callable, seq_length: int, micro_batch_size: int):
    """Forward-only pass of Megatron's schedule that returns what ``read`` gives per micro-batch.

    ``forward_fn(model, batch)`` returns ``(output, read)``; ``read(output)`` runs on the last
    pipeline stage. Returns the list of ``read`` results, in micro-batch order, on the last
    stage and None on the others (share them with :func:`broadcast_from_last_stage`).
    Micro-batches may differ in rows and width (under PP the stages exchange shapes first).
    The model is put in eval mode and restored afterwards; call under ``torch.no_grad()``.
    """
    inner = _unwrap(model)
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    previous_variable = inner.config.variable_seq_lengths
    inner.config.variable_seq_lengths = previous_variable or pipelined
    was_training = model.training
    model.eval()
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
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    if parallel_state.is_pipeline_last_stage():
        tensor = tensor.to(device=device, dtype=dtype).contiguous()
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"broadcast_from_last_stage: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")
    else:
        tensor = torch.empty(tuple(shape), dtype=dtype, device=device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            tensor,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return tensor


def grads_are_finite(model) -> bool:
    """True when every gradient on every rank is finite (the NaN/inf guard)."""
    finite = torch.ones(1, dtype=torch.float32)
    for param in model.parameters():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None and not torch.isfinite(grad).all():
            finite.zero_()
            break
    if dist.is_initialized():
        if torch.cuda.is_available():
            finite = finite.cuda()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item() > 0)


def optimizer_step(model, optimizer, scheduler) -> tuple[bool, float]:
    """Step unless a gradient is non-finite; return (stepped, grad_norm)."""
    if not grads_are_finite(model):
        optimizer.zero_grad()
        return False, float("nan")
    stepped, grad_norm, _ = optimizer.step()
    if stepped:
        scheduler.step(increment=1)
    return bool(stepped), float(grad_norm) if grad_norm is not None else 0.0


def train_step(model, optimizer, scheduler, microbatches, forward_fn, metric_names, seq_length, micro_batch_size):
    """One optimizer step over ``microbatches`` (gradient accumulation); returns metrics."""
    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = run_schedule(model, microbatches, forward_fn, metric_names, seq_length, micro_batch_size, forward_only=False)
    stepped, grad_norm = optimizer_step(model, optimizer, scheduler)
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = 0.0 if stepped else 1.0
    return metrics


@torch.no_grad()
def eval_batches(model, microbatches, forward_fn, metric_names, seq_length, micro_batch_size):
    model.eval()
    metrics = run_schedule(model, microbatches, forward_fn, metric_names, seq_length, micro_batch_size, forward_only=True)
    model.train()
    return metrics


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm's warning signal); checked by all ranks at step ends."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.raised = False
        for sig in signals:
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, frame):
        self.raised = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0])
        if dist.is_initialized():
            if torch.cuda.is_available():
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def steps_for(num_samples: int, global_batch_size: int, epochs: int, max_steps: Optional[int]) -> int:
    per_epoch = max(num_samples // global_batch_size, 1)
    total = per_epoch * epochs
    return min(total, max_steps) if max_steps else total


def microbatch_count(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    if global_batch_size % (micro_batch_size * dp):
        from megatron_rlhf.config import ConfigError

        raise ConfigError(
            f"train.global_batch_size={global_batch_size} must be a multiple of train.micro_batch_size="
            f"{micro_batch_size} x data-parallel size {dp}"
        )
    return global_batch_size // (micro_batch_size * dp)


def lr_now(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def is_finite(x: float) -> bool:
    return math.isfinite(x)
