"""The step of the supervised recipes (SFT, RM, DPO): a global batch of examples, one optimizer step.

A recipe describes its data and loss in a :class:`SupervisedTask`; :class:`SupervisedRecipe`
turns it into the loop's step. Each step takes the next ``train.global_batch_size``
examples of a layout-independent order, gives each data-parallel rank its contiguous share,
cuts that into micro-batches at example boundaries (an RM prompt's K responses stay in one
forward), or with ``data.packing`` bin-packs those examples into as many packed
micro-batches as they need (``data/packing.py``), and runs one optimizer step. A task may mix
extra micro-batches of another source into every training step (:class:`StepMix`: DPO's
pretraining term). Evaluation adds the metrics' sums and counts over the whole held-out set,
so it is the same at any data-parallel size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from megatron_rlhf.config import Config, ConfigError
from megatron_rlhf.data import split_holdout
from megatron_rlhf.data.packing import pack_microbatches
from megatron_rlhf.models.schedule import means
from megatron_rlhf.parallel import data_parallel_sum, to_device
from megatron_rlhf.training.loop import DataPosition, RunContext, rank_slice, total_steps
from megatron_rlhf.training.step import eval_step, lr_now, microbatch_count, train_step, wrap_for_training


class StepMix(Protocol):
    """Extra micro-batches a task mixes into every training step (DPO's ptx term), with their
    stream's position for the checkpoint."""

    def step(self) -> tuple[list, Callable]:
        """This rank's extra micro-batches of the next step, and the step's forward_fn: it runs
        the task's micro-batches as ``task.forward_fn`` does, and these."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class SupervisedTask:
    """What distinguishes SFT, RM and DPO inside :class:`SupervisedRecipe`."""

    kind: str  # checkpoint kind: "policy" | "reward"
    train_examples: list
    valid_examples: list
    collate: Callable  # list of examples -> batch (all rows padded to one width)
    forward_fn: Callable  # (model, batch) -> (output, loss_fn); loss_fn returns an algorithms LossReport
    select_metric: str = "eval/loss"  # the validation metric that picks the best checkpoint
    select_mode: str = "min"
    count_tokens: Callable = lambda batch: 0  # tokens processed, for tokens_per_s
    pad_example: Optional[Callable] = None  # example -> the same example contributing nothing (eval padding)
    extra_meta: Optional[Callable] = None  # () -> dict merged into the checkpoint meta
    rows_of: Callable = lambda example: 1  # batch rows of one example (RM: its K responses; K varies)
    # data.packing: (examples, width=) -> one packed micro-batch, and the tokens one example takes in it
    pack: Optional[Callable] = None
    unit_length: Optional[Callable] = None
    mix: Optional[StepMix] = None  # extra training micro-batches of every step (not evaluated)


def load_train_valid(cfg: Config, tokenizer, load: Callable) -> tuple[list, list, object]:
    """``(train, valid, stats)``; ``load(path, tokenizer, seq_length, truncation)`` returns
    ``(examples, LoadStats)`` (``stats`` are the training file's).

    Validation is ``data.valid_path`` when set, else a ``data.valid_fraction`` holdout of the
    training examples (drawn with ``train.seed``), else none.
    """
    train, stats = load(cfg.data.train_path, tokenizer, cfg.model.seq_length, cfg.data.truncation)
    if cfg.data.valid_path:
        valid, _ = load(cfg.data.valid_path, tokenizer, cfg.model.seq_length, cfg.data.truncation)
    elif cfg.data.valid_fraction:
        train_idx, valid_idx = split_holdout(len(train), cfg.data.valid_fraction, cfg.train.seed)
        train, valid = [train[i] for i in train_idx], [train[i] for i in valid_idx]
    else:
        valid = []
    return train, valid, stats


def microbatches(task: SupervisedTask, examples: list, micro_batch_size: int, pack_capacity: Optional[int] = None) -> list:
    """``examples`` collated once (one width) and cut every ``micro_batch_size`` examples.

    With ``pack_capacity`` (``data.packing``: ``micro_batch_size x model.seq_length`` tokens)
    the examples are bin-packed instead (``data.packing.pack_microbatches``): whole examples
    per micro-batch, as many micro-batches as the bins need.
    """
    if pack_capacity is not None:
        if task.pack is None or task.unit_length is None:
            raise ConfigError(f"data.packing=true: the {task.kind} recipe does not pack its examples; set data.packing=false")
        return [to_device(b) for b in pack_microbatches(examples, task.unit_length, task.pack, pack_capacity)]
    batch = task.collate(examples)
    rows = batch[0].shape[0]
    sizes = [task.rows_of(e) for e in examples]
    assert sum(sizes) == rows, f"collate gave {rows} rows, rows_of says {sum(sizes)}"
    bounds = [0]
    for i in range(0, len(examples), micro_batch_size):
        bounds.append(bounds[-1] + sum(sizes[i : i + micro_batch_size]))
    return [
        to_device(type(batch)(*(t[a:b] if hasattr(t, "shape") and t.dim() > 0 and t.shape[0] == rows else t for t in batch)))
        for a, b in zip(bounds, bounds[1:])
    ]


class SupervisedRecipe:
    """The loop's recipe for a supervised task on one trained network (``model``)."""

    def __init__(self, ctx: RunContext, model, task: SupervisedTask):
        cfg = ctx.cfg
        self.ctx, self.task = ctx, task
        self.kind = task.kind
        if len(task.train_examples) < cfg.train.global_batch_size:
            raise ConfigError(
                f"{cfg.data.train_path}: {len(task.train_examples)} training examples, fewer than one global batch "
                f"(train.global_batch_size={cfg.train.global_batch_size}); lower train.global_batch_size or add data"
            )
        self.total_steps = total_steps(cfg, len(task.train_examples) // cfg.train.global_batch_size)
        microbatch_count(cfg.train.global_batch_size, cfg.train.micro_batch_size, ctx.dp)
        ddp, optimizer, scheduler = wrap_for_training(model, cfg.parallel, cfg.train, total_steps=self.total_steps)
        self.model = ddp
        self.networks, self.optimizers, self.schedulers = {"model": ddp}, {"model": optimizer}, {"model": scheduler}
        self.select_metric = task.select_metric if task.valid_examples else None
        self.select_mode = task.select_mode
        self.position = DataPosition()
        # data.packing: a micro-batch holds up to the tokens of an unpacked one at full width
        # (micro_batch_size examples of the most rows, seq_length each), with no padding between examples
        rows = max(task.rows_of(e) for e in task.train_examples)
        self.pack_capacity = cfg.train.micro_batch_size * rows * cfg.model.seq_length if cfg.data.packing else None

    # 1. the next global batch, this rank's share, micro-batches; 2. one optimizer step
    def train_step(self, step: int) -> dict:
        cfg, ctx, task = self.ctx.cfg, self.ctx, self.task
        t0 = time.perf_counter()
        indices = self.position.next_batch(len(task.train_examples), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
        mine = rank_slice([task.train_examples[i] for i in indices], ctx.dp, ctx.dp_rank)
        micro = microbatches(task, mine, cfg.train.micro_batch_size, self.pack_capacity)
        forward_fn = task.forward_fn
        if task.mix is not None:
            extra, forward_fn = task.mix.step()
            micro = micro + extra
        metrics = train_step(self.model, self.optimizers["model"], self.schedulers["model"], micro, forward_fn)
        (tokens,) = data_parallel_sum([sum(task.count_tokens(b) for b in micro)])
        record = {f"train/{k}": v for k, v in metrics.items() if k not in ("grad_norm", "skipped")}
        elapsed = time.perf_counter() - t0
        record.update(
            lr=lr_now(self.optimizers["model"]), grad_norm=metrics["grad_norm"], tokens_per_s=tokens / max(elapsed, 1e-9), step_time_s=elapsed,
            skipped=metrics["skipped"], loss=metrics.get("loss", math.nan),
        )
        return record

    def evaluate(self) -> dict:
        """Sums and counts over every held-out example; ``eval/<metric>`` = global sum / count."""
        cfg, ctx, task = self.ctx.cfg, self.ctx, self.task
        examples = list(task.valid_examples)
        if cfg.train.eval_max_batches:  # counted in micro-batches of one rank, so the same examples at any DP
            examples = examples[: cfg.train.eval_max_batches * cfg.train.micro_batch_size]
        group = cfg.train.micro_batch_size * ctx.dp
        padded = math.ceil(len(examples) / group) * group
        examples += [task.pad_example(examples[0])] * (padded - len(examples))
        totals: dict[str, list[float]] = {}
        for start in range(0, len(examples), group):
            mine = rank_slice(examples[start : start + group], ctx.dp, ctx.dp_rank)
            for name, (s, c) in eval_step(self.model, microbatches(task, mine, cfg.train.micro_batch_size, self.pack_capacity), task.forward_fn).items():
                total = totals.setdefault(name, [0.0, 0.0])
                total[0] += s
                total[1] += c
        return {f"eval/{k}": v for k, v in means({k: tuple(v) for k, v in totals.items()}).items()}

    def state_dict(self) -> dict:
        state = {"data": vars(self.position).copy()}
        if self.task.mix is not None:
            state["mix"] = self.task.mix.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition(**state["data"])
        if self.task.mix is not None and "mix" in state:  # a mix added on resume starts at its beginning
            self.task.mix.load_state_dict(state["mix"])

    def extra_meta(self) -> dict:
        return self.task.extra_meta() if self.task.extra_meta else {}
