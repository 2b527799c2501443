"""The optimizer step on Megatron-Core: DDP, optimizer, LR schedule, one step over micro-batches.

Loss normalisation. Every loss reaches Megatron's schedule as ``(sum, count)`` per
micro-batch (``algorithms``' ``*_report`` builders); with ``calculate_per_token_loss`` the
schedule sums the counts over micro-batches and data-parallel ranks and divides the
gradients by that global count. Megatron's DDP reads the flag when it is BUILT (it then
skips its own 1/DP averaging), so :func:`wrap_for_training` sets it first: set afterwards,
every gradient and grad norm would be 1/DP too small.
"""

from __future__ import annotations

import signal
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rlhf.config import ConfigError, ParallelConfig, TrainConfig
from megatron_rlhf.models.schedule import means, run_schedule
from megatron_rlhf.parallel import all_reduce


def wrap_for_training(model, parallel: ParallelConfig, train: TrainConfig, lr: Optional[float] = None, total_steps: int = 1):
    """Wrap a GPTModel in Megatron DDP and build its optimizer and LR schedule."""
    config = model.config
    config.calculate_per_token_loss = True  # before DDP is built: see the module docstring
    config.finalize_model_grads_func = finalize_model_grads
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
        # on resume the config's schedule applies (a changed train.lr or max_steps takes effect)
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return ddp, optimizer, scheduler


def reapply_schedule(optimizer, scheduler) -> None:
    """After a resume, make the config's LR schedule the one that runs: the optimizer's param
    groups carry ``max_lr``/``min_lr`` from the checkpoint, and Megatron's scheduler reads
    them before its own (which ``override_opt_param_scheduler`` already took from the config)."""
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
    scheduler.step(increment=0)


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
    return bool(all_reduce(finite, op=dist.ReduceOp.MIN).item() > 0)


def optimizer_step(model, optimizer, scheduler) -> tuple[bool, float]:
    """Step unless a gradient is non-finite; return (stepped, grad_norm before clipping)."""
    if not grads_are_finite(model):
        optimizer.zero_grad()
        return False, float("nan")
    stepped, grad_norm, _ = optimizer.step()
    if stepped:
        scheduler.step(increment=1)
    return bool(stepped), float(grad_norm) if grad_norm is not None else 0.0


def train_step(model, optimizer, scheduler, microbatches: list, forward_fn: Callable) -> dict[str, float]:
    """One optimizer step over ``microbatches`` (gradient accumulation).

    Returns the global metric means plus ``grad_norm`` and ``skipped`` (1.0 when a
    non-finite gradient made the step a no-op).
    """
    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = means(run_schedule(model, microbatches, forward_fn, forward_only=False))
    stepped, grad_norm = optimizer_step(model, optimizer, scheduler)
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = 0.0 if stepped else 1.0
    return metrics


@torch.no_grad()
def eval_step(model, microbatches: list, forward_fn: Callable) -> dict[str, tuple[float, float]]:
    """Forward only (eval mode): ``{name: (global sum, global count)}``, to add up over batches."""
    model.eval()
    try:
        return run_schedule(model, microbatches, forward_fn, forward_only=True)
    finally:
        model.train()


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm's warning signal) / Ctrl-C; checked by all ranks at step
    ends, where the loop saves and exits 75. A second Ctrl-C aborts at once."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.raised = False
        for sig in signals:
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.raised:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            print("\ninterrupted: finishing this step, saving a checkpoint, then exiting (Ctrl-C again aborts at once)", file=sys.stderr, flush=True)
        self.raised = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0])
        return bool(all_reduce(flag, op=dist.ReduceOp.MAX).item() > 0)


def microbatch_count(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    if global_batch_size % (micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} must be a multiple of train.micro_batch_size="
            f"{micro_batch_size} x data-parallel size {dp}"
        )
    return global_batch_size // (micro_batch_size * dp)


def lr_now(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
