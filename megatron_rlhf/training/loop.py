"""The one training loop. A recipe (SFT, RM, PPO) supplies its step; everything else is here.

    ctx = setup(cfg)                       # distributed, seeds, output_dir, tokenizer
    recipe = SftRecipe(ctx, ...)           # models, optimizers, data, the step
    result = run(ctx, recipe)              # resume -> steps -> eval -> checkpoints

What the loop owns, written once for every recipe: exact resume from the newest checkpoint
(networks, optimizers, LR schedules, RNG, the recipe's own state such as data positions or
the KL controller); the step count (``train.max_steps`` when set, else the recipe's epochs);
logging (``metrics.jsonl``, TensorBoard, progress bar); evaluation every
``train.eval_interval`` steps and model selection (``checkpoints/best``); checkpoints every
``train.save_interval`` steps and at the end; preemption (SIGTERM/SIGUSR1: finish the step,
save, exit 75); and the divergence guard (``train.max_nonfinite_steps`` consecutive steps
with non-finite gradients or loss stop the run, exit 3, without saving).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rlhf.checkpoint import (
    CheckpointError, checkpoint_meta, find_resume_checkpoint, iter_name, latest_checkpoint, load_checkpoint, mark_best, resolve_checkpoint,
    save_checkpoint, start_over,
)
from megatron_rlhf.config import Config, ConfigError
from megatron_rlhf.data import Tokenizer, epoch_order
from megatron_rlhf.parallel import LaunchEnv, all_reduce, init_distributed, is_rank0, seed_everything
from megatron_rlhf.training.metrics import MetricsLogger
from megatron_rlhf.training.output_dir import OutputLock, record_config
from megatron_rlhf.training.step import PreemptionFlag, reapply_schedule


class DivergenceError(RuntimeError):
    """Too many consecutive non-finite steps: the run stopped without saving (exit 3)."""


@dataclass
class RunContext:
    """What every recipe gets: the config, the launch, the tokenizer and where to write."""

    cfg: Config
    env: LaunchEnv
    tokenizer: Tokenizer
    output_dir: Path

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def dp(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()


def setup(cfg: Config) -> RunContext:
    """Start the processes, seed them, take ``output_dir`` (lock, config.yaml) and load the tokenizer."""
    env = init_distributed(cfg.parallel, cfg.model)
    seed_everything(cfg.train.seed)
    out = Path(cfg.output_dir)
    error = None
    if is_rank0():
        try:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            notes = [OutputLock(out).acquire()]
            # quiet: run() finds the same checkpoint again and says what it skipped, once
            resuming = not cfg.train.restart and _quiet_resume_point(out / "checkpoints") is not None
            notes += record_config(cfg, out, resuming=resuming)
            for note in filter(None, notes):
                print(f"[{cfg.stage}] {note}", file=sys.stderr, flush=True)
        except (ConfigError, CheckpointError, OSError) as exc:
            error = exc
    started = all_reduce(torch.tensor([0.0 if error else 1.0]), op=dist.ReduceOp.MIN).item() > 0
    if error is not None:
        raise error
    if not started:
        raise ConfigError(f"rank 0 could not take {out} (see its error)")
    if cfg.train.restart:
        start_over(out / "checkpoints")  # the old checkpoints are moved aside, not deleted
    return RunContext(cfg, env, load_tokenizer(cfg), out)


def _quiet_resume_point(checkpoints_dir: Path) -> Optional[Path]:
    return find_resume_checkpoint(checkpoints_dir, warn=lambda _: None)


def load_tokenizer(cfg: Config) -> Tokenizer:
    path = cfg.model.tokenizer
    if not path and cfg.model.init_from:
        path = str(resolve_checkpoint(cfg.model.init_from) / "tokenizer.model")
    if not path:
        raise ConfigError("model.tokenizer is not set: give a SentencePiece model (tools/train_tokenizer.py builds one)")
    tokenizer = Tokenizer.load(path)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but the tokenizer {path} has {tokenizer.vocab_size} "
            f"tokens; remove model.vocab_size (it is read from the tokenizer) or use the matching tokenizer"
        )
    return tokenizer


# ----------------------------------------------------------------------------- data positions


@dataclass
class DataPosition:
    """Where a recipe is in a dataset: the first ``offset`` indices of ``epoch_order(epoch)``
    are consumed. Independent of the layout, so a resumed run continues exactly."""

    epoch: int = 0
    offset: int = 0

    def next_batch(self, num_examples: int, batch_size: int, seed: int, shuffle: bool) -> list[int]:
        """Indices of the next global batch (drop-last: a partial tail starts the next epoch)."""
        if self.offset + batch_size > num_examples:
            self.epoch += 1
            self.offset = 0
        order = epoch_order(num_examples, seed, self.epoch, shuffle)
        indices = order[self.offset : self.offset + batch_size]
        self.offset += batch_size
        return indices


def rank_slice(items, dp: int, dp_rank: int) -> list:
    """This data-parallel rank's contiguous share of a global batch."""
    per_rank = len(items) // dp
    return list(items[dp_rank * per_rank : (dp_rank + 1) * per_rank])


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """``train.max_steps`` when set (the data repeats as needed), else epochs x steps per epoch."""
    return cfg.train.max_steps or max(steps_per_epoch, 1) * cfg.train.epochs


# ----------------------------------------------------------------------------- the recipe interface


class Recipe(Protocol):
    kind: str  # checkpoint kind: "policy" | "reward"
    total_steps: int
    networks: dict  # checkpoint name -> trained (DDP-wrapped) model
    optimizers: dict  # same names
    schedulers: dict  # name -> LR schedule
    select_metric: Optional[str]  # the eval metric that picks checkpoints/best (None: no eval)
    select_mode: str  # "min" | "max"

    def train_step(self, step: int) -> dict[str, float]:
        """One step: log keys, with ``skipped`` (optimizer steps skipped for non-finite grads)
        and ``loss`` (the value the divergence guard watches) among them."""

    def evaluate(self) -> dict[str, float]:
        """``{"eval/...": value}`` on the held-out data, the same at any layout."""

    def state_dict(self) -> dict:
        """The recipe's own resume state (data positions, controllers), picklable."""

    def load_state_dict(self, state: dict) -> None: ...

    def extra_meta(self) -> dict:
        """Entries merged into every checkpoint's meta.json."""


@dataclass
class LoopState:
    step: int = 0
    skipped_steps: int = 0
    best: dict = field(default_factory=lambda: {"value": None, "step": None})


# ----------------------------------------------------------------------------- the loop


def run(ctx: RunContext, recipe: Recipe) -> dict:
    """Train ``recipe`` to ``recipe.total_steps`` with exact resume; returns a status dict."""
    cfg, train = ctx.cfg, ctx.cfg.train
    state = LoopState()
    latest = latest_checkpoint(ctx.checkpoints_dir)
    if latest is not None:
        state = _resume(latest, recipe)
    if state.step >= recipe.total_steps:
        if is_rank0():
            print(f"[{cfg.stage}] {latest} already reached {recipe.total_steps} steps; nothing to do")
        return {"status": "done", "step": state.step, "best": state.best}
    logger = MetricsLogger(ctx.output_dir, state.step, recipe.total_steps, train.tensorboard, train.progress_bar, desc=cfg.stage)
    if latest is not None:
        logger.message(f"resumed from {latest} at step {state.step}")
    checkpoints = _Checkpoints(ctx, recipe, state)
    checkpoints.saved_step = state.step if latest is not None else None
    preempt = PreemptionFlag()
    evaluating = recipe.select_metric is not None
    nonfinite = 0
    try:
        if evaluating and state.step == 0:
            _evaluate(ctx, recipe, state, logger, checkpoints)
        while state.step < recipe.total_steps:
            metrics = recipe.train_step(state.step)
            state.step += 1
            skipped = int(metrics.pop("skipped", 0))
            state.skipped_steps += skipped
            if skipped or not math.isfinite(metrics.get("loss", 0.0)):
                nonfinite += 1
                logger.message(f"step {state.step}: non-finite loss or gradients, optimizer step skipped ({nonfinite} in a row, {state.skipped_steps} in all)")
                if nonfinite >= train.max_nonfinite_steps:
                    raise DivergenceError(
                        f"{nonfinite} consecutive steps had non-finite loss or gradients (step {state.step}); the run "
                        f"diverged and stopped without saving. Lower train.lr or raise train.clip_grad, then rerun: it "
                        f"resumes from {_quiet_resume_point(ctx.checkpoints_dir) or 'scratch'}"
                    )
            else:
                nonfinite = 0
            metrics.pop("loss", None)
            if state.step % train.log_interval == 0 or state.step == recipe.total_steps:
                logger.log(state.step, metrics)
            logger.advance()
            if evaluating and train.eval_interval and state.step % train.eval_interval == 0 and state.step < recipe.total_steps:
                _evaluate(ctx, recipe, state, logger, checkpoints)
            if train.save_interval and state.step % train.save_interval == 0:
                checkpoints.save()
            if preempt.any_rank():
                checkpoints.save()
                logger.message(f"preempted: checkpoint saved at step {state.step}; run the same command to resume")
                return {"status": "preempted", "step": state.step}
        if evaluating:
            _evaluate(ctx, recipe, state, logger, checkpoints)
        checkpoints.save()
        return {"status": "done", "step": state.step, "best": state.best}
    finally:
        logger.close()


def _resume(latest: Path, recipe: Recipe) -> LoopState:
    saved = load_checkpoint(latest, recipe.networks, recipe.optimizers)
    try:
        for name, scheduler in recipe.schedulers.items():
            scheduler.load_state_dict(saved["schedulers"][name])
            reapply_schedule(recipe.optimizers[name], scheduler)
        recipe.load_state_dict(saved["recipe"])
        return LoopState(**saved["loop"])
    except KeyError as exc:
        raise CheckpointError(f"{latest}/state.pt lacks {exc}: it was written by another recipe or version; start a new output_dir") from None


class _Checkpoints:
    def __init__(self, ctx: RunContext, recipe: Recipe, state: LoopState):
        self.ctx, self.recipe, self.state = ctx, recipe, state
        self.saved_step: Optional[int] = None

    def save(self) -> Path:
        ctx, recipe, state = self.ctx, self.recipe, self.state
        if self.saved_step == state.step:
            return ctx.checkpoints_dir / iter_name(state.step)
        if not _weights_are_finite(recipe.networks.values()):
            raise DivergenceError(f"the weights are not finite at step {state.step}; nothing was saved. Lower train.lr and rerun: it resumes from the last good checkpoint")
        self.saved_step = state.step
        meta = checkpoint_meta(ctx.cfg, ctx.tokenizer, recipe.kind, **recipe.extra_meta())
        python_state = {
            "loop": dataclasses.asdict(state),
            "recipe": recipe.state_dict(),
            "schedulers": {name: s.state_dict() for name, s in recipe.schedulers.items()},
        }
        return save_checkpoint(
            ctx.checkpoints_dir, state.step, recipe.networks, meta, recipe.optimizers, python_state,
            ctx.tokenizer.serialized_model(), ctx.cfg.train.keep_last,
        )


def _weights_are_finite(networks) -> bool:
    finite = all(bool(torch.isfinite(p).all()) for network in networks for p in network.parameters())
    return all_reduce(torch.tensor([1.0 if finite else 0.0]), op=dist.ReduceOp.MIN).item() > 0


def _evaluate(ctx: RunContext, recipe: Recipe, state: LoopState, logger: MetricsLogger, checkpoints: _Checkpoints) -> None:
    metrics = recipe.evaluate()
    logger.log(state.step, metrics)
    value = metrics.get(recipe.select_metric)
    # Candidates are the trained checkpoints (step > 0): the step-0 evaluation is the
    # starting point's figure, logged for comparison; were it a candidate, a run that
    # never beat its init would have no checkpoints/best for the next stage to load.
    if state.step == 0 or value is None or not math.isfinite(value):
        return
    best = state.best["value"]
    if best is None or (value < best if recipe.select_mode == "min" else value > best):
        state.best.update(value=value, step=state.step)
        if ctx.cfg.train.select_best:
            mark_best(ctx.checkpoints_dir, checkpoints.save())
