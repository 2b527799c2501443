"""What every stage does the same way: set-up, tokenizer and checkpoint checks, the loop.

A stage is: read config -> init distributed -> build models -> build data -> loop(step) ->
checkpoint. ``run_supervised`` is that loop for the two supervised stages (SFT, RM); they
differ only in their data, their ``forward_fn`` and the metric that selects the best model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_rlhf.config import Config, ConfigError, dump_config
from megatron_rlhf.data import Tokenizer, epoch_order, split_holdout
from megatron_rlhf.parallel import LaunchEnv, init_distributed, is_rank0, seed_everything
from megatron_rlhf.training import checkpoint as ckpt_lib
from megatron_rlhf.training.metrics import MetricsLogger
from megatron_rlhf.training.trainer import (
    PreemptionFlag,
    TrainState,
    eval_batches,
    lr_now,
    microbatch_count,
    train_step,
)

# Fields that define the network; a checkpoint loads only into the same architecture.
ARCH_FIELDS = (
    "flavour", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "untie_embeddings_and_output_weights", "rotary_base", "make_vocab_size_divisible_by",
)


@dataclass
class StageContext:
    cfg: Config
    env: LaunchEnv
    tokenizer: Tokenizer
    output_dir: Path
    checkpoints_dir: Path

    @property
    def dp(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()


def setup_stage(cfg: Config) -> StageContext:
    env = init_distributed(cfg.parallel, cfg.model)
    seed_everything(cfg.train.seed)
    out = Path(cfg.output_dir)
    if is_rank0():
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    tokenizer = load_tokenizer(cfg)
    return StageContext(cfg, env, tokenizer, out, out / "checkpoints")


def load_tokenizer(cfg: Config) -> Tokenizer:
    path = cfg.model.tokenizer
    if not path and cfg.model.init_from:
        path = str(ckpt_lib.resolve_checkpoint(cfg.model.init_from) / "tokenizer.model")
    if not path:
        raise ConfigError("model.tokenizer is not set: give a SentencePiece model (tools/train_tokenizer.py builds one)")
    tokenizer = Tokenizer.load(path)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but the tokenizer {path} has {tokenizer.vocab_size} "
            f"tokens; remove model.vocab_size (it is read from the tokenizer) or use the matching tokenizer"
        )
    return tokenizer


def load_train_valid(cfg: Config, tokenizer: Tokenizer, load: Callable) -> tuple[list, list, object]:
    """``(train, valid, stats)`` of a supervised stage; ``load(path, tokenizer, seq_length, truncation)``
    returns ``(examples, LoadStats)`` (``stats`` are the training file's).

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


def check_compatible(ckpt: Path, cfg: Config, tokenizer: Tokenizer, what: str = "model.init_from") -> dict:
    """Refuse a checkpoint of another tokenizer or architecture, naming the fix."""
    meta = ckpt_lib.read_meta(ckpt)
    if meta.get("tokenizer_fingerprint") and meta["tokenizer_fingerprint"] != tokenizer.fingerprint():
        raise ckpt_lib.CheckpointError(
            f"tokenizer mismatch: {what}={ckpt} was trained with tokenizer {meta['tokenizer_fingerprint']} "
            f"(vocab {meta.get('vocab_size')}), this run uses {tokenizer.fingerprint()} (vocab {tokenizer.vocab_size}); "
            f"use the checkpoint's own tokenizer: model.tokenizer={ckpt / 'tokenizer.model'}"
        )
    saved = meta.get("model", {})
    ours = dataclasses.asdict(cfg.model)
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {ours.get(k)!r}" for k in ARCH_FIELDS if k in saved and saved.get(k) != ours.get(k)]
    if diffs:
        raise ckpt_lib.CheckpointError(f"{what}={ckpt} has another architecture: " + "; ".join(diffs) + ". Make the config's model section match the checkpoint")
    return meta


def checkpoint_meta(cfg: Config, tokenizer: Tokenizer, kind: str, **extra) -> dict:
    return dict(
        kind=kind,
        stage=cfg.stage,
        model=dataclasses.asdict(cfg.model),
        vocab_size=tokenizer.vocab_size,
        tokenizer_fingerprint=tokenizer.fingerprint(),
        **extra,
    )


def to_device(batch):
    if not torch.cuda.is_available():
        return batch
    return type(batch)(*(t.cuda(non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch))


def next_global_batch(num_examples: int, state: TrainState, global_batch_size: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of the next global batch; advances ``state.epoch``/``state.offset`` (drop-last)."""
    if state.offset + global_batch_size > num_examples:
        state.epoch += 1
        state.offset = 0
    order = epoch_order(num_examples, seed, state.epoch, shuffle)
    indices = order[state.offset : state.offset + global_batch_size]
    state.offset += global_batch_size
    return indices


def rank_slice(items: Sequence, dp: int, dp_rank: int) -> list:
    per_rank = len(items) // dp
    return list(items[dp_rank * per_rank : (dp_rank + 1) * per_rank])


@dataclass
class SupervisedTask:
    """What distinguishes SFT from RM training inside ``run_supervised``."""

    kind: str  # checkpoint kind: "policy" | "reward"
    train_examples: list
    valid_examples: list
    collate: Callable  # list of examples -> batch (all rows padded to one width)
    forward_fn: Callable  # (model, batch) -> (output, loss_fn)
    metric_names: list[str]  # names the loss_fn reports; the first is the loss
    select_metric: str = "eval/loss"  # the validation metric that picks the best checkpoint
    select_mode: str = "min"
    count_tokens: Callable = lambda batch: 0  # tokens processed, for tokens_per_s
    pad_example: Optional[Callable] = None  # example -> the same example contributing nothing (eval padding)
    extra_meta: Optional[Callable] = None  # () -> dict merged into the checkpoint meta
    rows_of: Callable = lambda example: 1  # batch rows of one example (RM: its K responses; K varies)


def _microbatches(task: SupervisedTask, examples: list, micro_batch_size: int):
    batch = task.collate(examples)
    rows = batch[0].shape[0]
    # Cut at example boundaries (an RM prompt's K rows never split); the rows per
    # micro-batch vary when K does, so the largest is returned as the micro-batch size.
    sizes = [task.rows_of(e) for e in examples]
    assert sum(sizes) == rows, f"collate gave {rows} rows, rows_of says {sum(sizes)}"
    bounds = [0]
    for i in range(0, len(examples), micro_batch_size):
        bounds.append(bounds[-1] + sum(sizes[i : i + micro_batch_size]))
    micro = [to_device(type(batch)(*(t[a:b] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows else t for t in batch))) for a, b in zip(bounds, bounds[1:])]
    return micro, batch[0].shape[1], max(b - a for a, b in zip(bounds, bounds[1:]))


def evaluate(ctx: StageContext, model, task: SupervisedTask) -> dict:
    cfg = ctx.cfg
    mbs = cfg.train.micro_batch_size
    examples = list(task.valid_examples)
    group = mbs * ctx.dp
    if cfg.train.eval_max_batches:
        examples = examples[: cfg.train.eval_max_batches * group]
    padded = math.ceil(len(examples) / group) * group
    examples += [task.pad_example(examples[0])] * (padded - len(examples))
    totals: dict[str, list] = {}
    for start in range(0, len(examples), group):
        mine = rank_slice(examples[start : start + group], ctx.dp, ctx.dp_rank)
        micro, width, per_micro = _microbatches(task, mine, mbs)
        metrics = eval_batches(model, micro, task.forward_fn, task.metric_names, width, per_micro)
        for k, v in metrics.items():
            totals.setdefault(k, []).append(v)
    return {f"eval/{k}": sum(v) / len(v) for k, v in totals.items()}


def run_supervised(ctx: StageContext, model, optimizer, scheduler, task: SupervisedTask, total_steps: int) -> dict:
    """Train with periodic evaluation, checkpoints, model selection and exact resume."""
    cfg = ctx.cfg
    train = cfg.train
    n_micro = microbatch_count(train.global_batch_size, train.micro_batch_size, ctx.dp)
    state = TrainState()
    best = {"value": None, "step": None}
    latest = ckpt_lib.latest_checkpoint(ctx.checkpoints_dir)
    if latest is not None:
        saved = ckpt_lib.load_checkpoint(latest, {"model": model}, {"model": optimizer})
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**saved["train_state"])
        best = saved.get("best", best)
    if state.step >= total_steps:
        print(f"[{cfg.stage}] {latest} already reached train.max_steps/epochs ({total_steps} steps); nothing to do")
        return {"status": "done", "step": state.step, "best": best}
    logger = MetricsLogger(ctx.output_dir, state.step, total_steps, train.tensorboard, train.progress_bar, desc=cfg.stage)
    if latest is not None:
        logger.message(f"resumed from {latest} at step {state.step}")
    preempt = PreemptionFlag()
    has_eval = bool(task.valid_examples)

    saved_at = {"step": state.step if latest is not None else -1}

    def save(step: int) -> Path:
        if saved_at["step"] == step:
            return ctx.checkpoints_dir / ckpt_lib.iter_name(step)
        saved_at["step"] = step
        meta = checkpoint_meta(cfg, ctx.tokenizer, task.kind, **(task.extra_meta() if task.extra_meta else {}))
        extra = {"scheduler": scheduler.state_dict(), "train_state": dataclasses.asdict(state), "best": best}
        return ckpt_lib.save_checkpoint(
            ctx.checkpoints_dir, step, {"model": model}, meta, {"model": optimizer}, extra, ctx.tokenizer.serialized_model(), train.keep_last
        )

    def run_eval(step: int) -> None:
        metrics = evaluate(ctx, model, task)
        logger.log(step, metrics)
        value = metrics.get(task.select_metric)
        # Candidates are the trained checkpoints (step > 0): the step-0 evaluation is the
        # starting point's figure, logged for comparison; were it a candidate, a run that
        # never beat its init would have no checkpoints/best for the next stage to load.
        improved = step > 0 and value is not None and (best["value"] is None or (value < best["value"] if task.select_mode == "min" else value > best["value"]))
        if improved:
            best.update(value=value, step=step)
            if train.select_best:
                ckpt_lib.mark_best(ctx.checkpoints_dir, save(step))

    if has_eval and state.step == 0:
        run_eval(0)
    while state.step < total_steps:
        t0 = time.perf_counter()
        indices = next_global_batch(len(task.train_examples), state, train.global_batch_size, train.seed, cfg.data.shuffle)
        mine = rank_slice([task.train_examples[i] for i in indices], ctx.dp, ctx.dp_rank)
        micro, width, per_micro = _microbatches(task, mine, train.micro_batch_size)
        assert len(micro) == n_micro
        metrics = train_step(model, optimizer, scheduler, micro, task.forward_fn, task.metric_names, width, per_micro)
        state.step += 1
        if metrics.pop("skipped"):
            state.skipped_steps += 1
            logger.message(f"step {state.step}: non-finite gradients, optimizer step skipped ({state.skipped_steps} so far)")
        elapsed = time.perf_counter() - t0
        tokens = sum(task.count_tokens(b) for b in micro) * ctx.dp
        record = {f"train/{k}": v for k, v in metrics.items() if k != "grad_norm"}
        record.update({"lr": lr_now(optimizer), "grad_norm": metrics["grad_norm"], "tokens_per_s": tokens / max(elapsed, 1e-9), "step_time_s": elapsed})
        if state.step % train.log_interval == 0 or state.step == total_steps:
            logger.log(state.step, record)
        logger.advance()
        if has_eval and train.eval_interval and state.step % train.eval_interval == 0 and state.step < total_steps:
            run_eval(state.step)
        if train.save_interval and state.step % train.save_interval == 0:
            save(state.step)
        if preempt.any_rank():
            save(state.step)
            logger.message(f"preempted: checkpoint saved at step {state.step}; run the same command to resume")
            logger.close()
            return {"status": "preempted", "step": state.step}
    if has_eval:
        run_eval(state.step)
    save(state.step)
    logger.close()
    return {"status": "done", "step": state.step, "best": best}
