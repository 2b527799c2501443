"""Stage 3, PPO-ptx (InstructGPT §3.5, eq. 2): optimise the policy against the reward model.

    objective(phi) = E_(x,y)~pi_RL [ r(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x)) ]
                     + gamma * E_x~D_pretrain [ log pi_RL(x) ]

Each iteration:
 1. sample a batch of prompts and generate one response each with the actor (KV cache);
 2. score the episodes: actor log-probs (the "old" policy), frozen reference log-probs,
    critic values, and the frozen reward model's score at the last token;
 3. shape per-token rewards (-beta * KL_t, plus the score at the last token), run GAE and
    whiten the advantages over the global batch;
 4. for ``ppo.ppo_epochs`` passes over mini-batches: one actor step on the clipped policy
    loss (+ optional entropy bonus) mixed with gamma x the pretraining NLL of
    ``ptx_ratio`` x as many pretraining sequences, and one critic step on the clipped value
    loss (separate optimizer);
 5. update the KL controller, log, checkpoint.

The four models share the job's layout and devices: the actor (from SFT) and critic (from
the RM) train; the reference (SFT) and reward model are frozen (no grads, no optimizer
state) and can live in CPU memory between scoring phases (``ppo.offload_frozen``).
Any TP/PP layout: rollouts are generated through the pipeline stages (the last stage samples
and broadcasts the tokens, see ``models/generation.py``); log-probs, values and rewards come
from Megatron's forward-only schedule and are broadcast from the last stage, so every rank
holds the whole rollout batch; the update runs Megatron's 1F1B schedule, whose loss
functions (and metrics) live on the last stage and are shared by ``run_schedule``.
Left out on purpose: a separate rollout engine (vLLM): rollouts use Megatron's own static
KV cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_rlhf.algorithms import advantages as adv_lib
from megatron_rlhf.algorithms import ppo as ppo_lib
from megatron_rlhf.algorithms.kl import AdaptiveKLController, FixedKLController
from megatron_rlhf.config import Config, ConfigError
from megatron_rlhf.data import collate_sft, epoch_order, load_pretrain, load_prompts, prompt_budget
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.models.generation import generate, padded_batch
from megatron_rlhf.models.logprobs import token_logprobs, vocab_parallel_entropy
from megatron_rlhf.models.reward import score_sequences
from megatron_rlhf.stages.common import StageContext, checkpoint_meta, check_compatible, next_global_batch, setup_stage
from megatron_rlhf.training import checkpoint as ckpt_lib
from megatron_rlhf.training.metrics import MetricsLogger
from megatron_rlhf.training.trainer import (
    PreemptionFlag, TrainState, broadcast_from_last_stage, forward_collect, lr_now, optimizer_step, run_schedule, wrap_for_training,
)


@dataclasses.dataclass
class Episodes:
    """A rollout batch on this rank. Per-action tensors are ``[b, s-1]``: action t is token t+1."""

    tokens: torch.Tensor  # [b, s] prompt + response, right-padded
    action_mask: torch.Tensor  # [b, s-1] True where token t+1 was generated (eos included)
    old_logprobs: torch.Tensor  # [b, s-1]
    ref_logprobs: torch.Tensor  # [b, s-1]
    old_values: torch.Tensor  # [b, s-1] critic value of the state before action t
    advantages: torch.Tensor  # [b, s-1] whitened
    returns: torch.Tensor  # [b, s-1]

    def rows(self, index):
        return Episodes(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def _positions(tokens):
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _device(t):
    return t.cuda(non_blocking=True) if torch.cuda.is_available() else t


def _seed(*values) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, values)).encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------- scoring


def _logprob_forward(model, tokens, *, vocab_size):
    logits = model(tokens, _positions(tokens), None)
    return logits, lambda logits: token_logprobs(logits[:, :-1], tokens[:, 1:], vocab_size)


def _value_forward(model, tokens):
    values = model(tokens, _positions(tokens), None)
    return values, lambda values: values.squeeze(-1)[:, :-1].float()


@torch.no_grad()
def _per_action(model, tokens, micro_batch_size, forward_fn):
    """``[b, s-1]`` fp32 per-action outputs of ``model`` on ``tokens`` ``[b, s]``, on every rank.

    Runs Megatron's forward-only schedule (any TP/PP): the outputs exist on the last pipeline
    stage and are broadcast to the others, since every stage keeps the whole Episodes.
    """
    chunks = list(tokens.split(micro_batch_size))
    outputs = forward_collect(model, chunks, forward_fn, tokens.shape[1], micro_batch_size)
    result = torch.cat(outputs).float() if outputs is not None else None
    return broadcast_from_last_stage(result, (tokens.shape[0], tokens.shape[1] - 1))


def sequence_logprobs(model, tokens, vocab_size, micro_batch_size):
    """Log-prob of every next token, ``[b, s-1]``, from vocab-parallel logits (no gather)."""
    return _per_action(model, tokens, micro_batch_size, partial(_logprob_forward, vocab_size=vocab_size))


def sequence_values(model, tokens, micro_batch_size):
    """Critic value of the state before every action, ``[b, s-1]``."""
    return _per_action(model, tokens, micro_batch_size, _value_forward)


def _offload(model, to_cpu: bool):
    if torch.cuda.is_available():
        model.to("cpu" if to_cpu else torch.cuda.current_device())


# ----------------------------------------------------------------------------- losses


def actor_forward(model, batch, *, vocab_size, clip_eps, entropy_coef, ptx_coef, ptx_scale):
    """One micro-batch of the actor step: an ``Episodes`` slice or a pretraining batch."""
    if isinstance(batch, Episodes):
        logits = model(batch.tokens, _positions(batch.tokens), None)

        def loss_fn(logits):
            logits = logits[:, :-1]
            logprobs = token_logprobs(logits, batch.tokens[:, 1:], vocab_size)
            # num_tokens=1 turns the masked means into sums: Megatron divides by the global count.
            loss_sum, m = ppo_lib.policy_loss(logprobs, batch.old_logprobs, batch.advantages, batch.action_mask, clip_eps, num_tokens=1)
            entropy = vocab_parallel_entropy(logits if entropy_coef else logits.detach(), vocab_size)
            entropy_sum = (entropy * batch.action_mask).sum()
            if entropy_coef:
                loss_sum = loss_sum - entropy_coef * entropy_sum
            n = batch.action_mask.sum()
            return loss_sum, n, {"policy_loss": (m["policy_loss"], n), "clipfrac": (m["clipfrac"], n), "approx_kl": (m["approx_kl"], n), "entropy": (entropy_sum, n)}

        return logits, loss_fn
    nll = model(batch.tokens, batch.position_ids, None, labels=batch.labels)

    def ptx_fn(nll):
        mask = batch.loss_mask.float()
        nll_sum = (nll.float() * mask).sum()
        # gamma * mean pretraining NLL, expressed in the policy loss's denominator (see module doc)
        return ptx_coef * ptx_scale * nll_sum, torch.zeros((), dtype=torch.int), {"ptx_loss": (nll_sum, mask.sum())}

    return nll, ptx_fn


def critic_forward(model, batch, *, clip_eps):
    values = model(batch.tokens, _positions(batch.tokens), None)

    def loss_fn(values):
        values = values.squeeze(-1)[:, :-1].float()
        loss_sum, m = ppo_lib.value_loss(values, batch.old_values, batch.returns, batch.action_mask, clip_eps, num_tokens=1)
        n = batch.action_mask.sum()
        return loss_sum, n, {"value_loss": (loss_sum, n), "value_clipfrac": (m["value_clipfrac"], n)}

    return values, loss_fn


def _global_sum(x: float) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    if dist.is_initialized():
        t = _device(t)
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return float(t.item())


# ----------------------------------------------------------------------------- the stage


def check_ppo_config(cfg: Config) -> None:
    """PPO's checks on the config alone, made before anything is loaded or built
    (tests/test_slurm.py runs them on every example config)."""
    if cfg.parallel.sequence_parallel:
        # Megatron fixes sequence parallelism in the modules when it builds them, and a
        # KV-cache decode step (one token) cannot be split along the sequence across TP ranks.
        raise ConfigError(
            "PPO does not support parallel.sequence_parallel=true: its rollouts decode one token at a time, which "
            "cannot be split along the sequence across tensor-parallel ranks; set parallel.sequence_parallel=false "
            "(the SFT and RM stages support it)"
        )
    if not cfg.model.init_from:
        raise ConfigError("PPO starts the actor and reference from an SFT checkpoint: set model.init_from=<sft run or checkpoint>")
    if not cfg.ppo.reward_model:
        raise ConfigError("set ppo.reward_model=<reward model run or checkpoint> (the critic starts from it too)")
    if cfg.ppo.ptx_coef and not cfg.ppo.pretrain_path:
        raise ConfigError(f"ppo.ptx_coef={cfg.ppo.ptx_coef} needs pretraining text: set ppo.pretrain_path (JSONL of {{\"text\": ...}})")


class PPOTrainer:
    def __init__(self, ctx: StageContext):
        cfg, self.ctx, self.cfg = ctx.cfg, ctx, ctx.cfg
        ppo = cfg.ppo
        check_ppo_config(cfg)
        tok = ctx.tokenizer
        self.vocab = tok.vocab_size
        sft = ckpt_lib.resolve_checkpoint(cfg.model.init_from)
        check_compatible(sft, cfg, tok)
        rm = ckpt_lib.resolve_checkpoint(ppo.reward_model)
        rm_meta = ckpt_lib.read_meta(rm)
        if rm_meta.get("tokenizer_fingerprint") != tok.fingerprint():
            raise ckpt_lib.CheckpointError(
                f"actor/RM tokenizer mismatch: ppo.reward_model={rm} uses tokenizer {rm_meta.get('tokenizer_fingerprint')}, "
                f"the actor ({sft}) uses {tok.fingerprint()}; train the RM from this SFT model"
            )
        rm_model_cfg = dataclasses.replace(cfg.model, **{k: rm_meta["model"][k] for k in ("flavour", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "untie_embeddings_and_output_weights")})
        policy_net = "actor" if "actor" in ckpt_lib.read_meta(sft).get("networks", []) else "model"
        seed = cfg.train.seed
        self.actor = build_model(cfg.model, cfg.parallel, self.vocab, seed=seed)
        ckpt_lib.load_weights(self.actor, sft, policy_net)
        self.reference = build_model(cfg.model, cfg.parallel, self.vocab, seed=seed)
        ckpt_lib.load_weights(self.reference, sft, policy_net)
        self.critic = build_model(rm_model_cfg, cfg.parallel, self.vocab, scalar_head=True, seed=seed)
        ckpt_lib.load_weights(self.critic, rm, "model")
        self.reward_model = build_model(rm_model_cfg, cfg.parallel, self.vocab, scalar_head=True, seed=seed)
        ckpt_lib.load_weights(self.reward_model, rm, "model")
        for frozen in (self.reference, self.reward_model):
            frozen.requires_grad_(False)
            frozen.eval()
            _offload(frozen, ppo.offload_frozen)

        self.prompts = load_prompts(ppo.prompts_path, tok, prompt_budget(cfg.model.seq_length, ppo.max_new_tokens))
        # With ptx_coef=0 and a pretrain_path the ptx batches still run (coefficient 0, no
        # gradient) so that ptx/loss is logged and comparable; leave pretrain_path empty to skip them.
        self.pretrain = load_pretrain(ppo.pretrain_path, tok, cfg.model.seq_length) if ppo.pretrain_path else []
        if ppo.ptx_coef and not self.pretrain:
            raise ConfigError(f"ppo.ptx_coef={ppo.ptx_coef} needs pretraining text: set ppo.pretrain_path (JSONL of {{\"text\": ...}})")
        self.total_steps = cfg.train.max_steps or max(len(self.prompts) // cfg.train.global_batch_size, 1) * cfg.train.epochs
        rollout_per_rank = cfg.train.global_batch_size // ctx.dp
        if cfg.train.global_batch_size % ctx.dp or ppo.mini_batch_size % ctx.dp or cfg.train.global_batch_size % ppo.mini_batch_size:
            raise ConfigError(
                f"train.global_batch_size={cfg.train.global_batch_size} (episodes per iteration) must be a multiple of "
                f"ppo.mini_batch_size={ppo.mini_batch_size}, and both of the data-parallel size {ctx.dp}"
            )
        self.updates_per_step = ppo.ppo_epochs * (rollout_per_rank // (ppo.mini_batch_size // ctx.dp))
        total_updates = self.total_steps * self.updates_per_step
        if cfg.parallel.pipeline_model_parallel_size > 1:
            # Episodes and pretraining micro-batches differ in width (and a last micro-batch
            # may have fewer rows): the pipeline stages exchange shapes before each transfer.
            for model in (self.actor, self.critic, self.reference, self.reward_model):
                model.config.variable_seq_lengths = True
        self.actor, self.actor_opt, self.actor_sched = wrap_for_training(self.actor, cfg.parallel, cfg.train, total_steps=total_updates)
        self.critic, self.critic_opt, self.critic_sched = wrap_for_training(self.critic, cfg.parallel, cfg.train, lr=ppo.critic_lr, total_steps=total_updates)
        self.kl_ctl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl else FixedKLController(ppo.kl_coef)
        self.state = TrainState()
        self.ptx_state = TrainState()

    # 1-3: rollout and scoring
    def rollout(self, step: int) -> tuple[Episodes, dict]:
        cfg, ppo, ctx = self.cfg, self.cfg.ppo, self.ctx
        indices = next_global_batch(len(self.prompts), self.state, cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
        per_rank = cfg.train.global_batch_size // ctx.dp
        mine = [self.prompts[i] for i in indices[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]]
        t0 = time.perf_counter()
        generator = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(_seed(cfg.train.seed, step, ctx.dp_rank))
        gen = generate(self.actor, mine, ppo.max_new_tokens, eos_id=ctx.tokenizer.eos_id, pad_id=ctx.tokenizer.pad_id,
                       temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p, generator=generator, vocab_size=self.vocab)
        t1 = time.perf_counter()
        batch = padded_batch(gen, pad_id=ctx.tokenizer.pad_id)
        tokens = _device(batch.tokens)
        action_mask = _device(batch.response_mask[:, 1:])
        mbs = cfg.train.micro_batch_size
        old_logprobs = sequence_logprobs(self.actor, tokens, self.vocab, mbs)
        for frozen in (self.reference, self.reward_model):
            _offload(frozen, False)
        ref_logprobs = sequence_logprobs(self.reference, tokens, self.vocab, mbs)
        scores = _device(score_sequences(self.reward_model, gen.sequences, mbs, pad_id=ctx.tokenizer.pad_id))
        for frozen in (self.reference, self.reward_model):
            _offload(frozen, ppo.offload_frozen)
        old_values = sequence_values(self.critic, tokens, mbs)
        rewards, kl = adv_lib.shape_rewards(scores, old_logprobs, ref_logprobs, action_mask, self.kl_ctl.value, ppo.kl_estimator)
        advantages, returns = adv_lib.gae(rewards, old_values * action_mask, action_mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            moments = torch.stack(adv_lib.masked_moments(advantages, action_mask))
            if dist.is_initialized():
                moments = _device(moments)
                dist.all_reduce(moments, group=parallel_state.get_data_parallel_group())
            mean, var = adv_lib.moments_to_mean_var(*moments)
            advantages = adv_lib.whiten_with_moments(advantages, action_mask, mean, var)
        t2 = time.perf_counter()
        n = cfg.train.global_batch_size
        episode_kl = kl.sum(1)
        metrics = {
            "rollout/reward": _global_sum(scores.sum()) / n,
            "rollout/kl": _global_sum(episode_kl.sum()) / n,
            "rollout/kl_coef": self.kl_ctl.value,
            "rollout/response_length": _global_sum(batch.response_lengths.sum()) / n,
            "rollout/non_score_reward": _global_sum((rewards.sum(1) - scores).sum()) / n,
            "time/generate_s": t1 - t0,
            "time/score_s": t2 - t1,
            "generated_tokens": _global_sum(batch.response_lengths.sum()),
        }
        episodes = Episodes(tokens, action_mask, old_logprobs, ref_logprobs, old_values, advantages, returns)
        return episodes, metrics

    def _ptx_batches(self, count: int) -> list:
        cfg = self.cfg
        per_rank = count // self.ctx.dp
        if per_rank == 0:
            return []
        indices = next_global_batch(len(self.pretrain), self.ptx_state, count, cfg.train.seed + 1, cfg.data.shuffle)
        mine = [self.pretrain[i] for i in indices[self.ctx.dp_rank * per_rank : (self.ctx.dp_rank + 1) * per_rank]]
        batch = collate_sft(mine, pad_id=self.ctx.tokenizer.pad_id, max_len=cfg.model.seq_length)
        return [type(batch)(*(_device(t[i : i + cfg.train.micro_batch_size]) for t in batch)) for i in range(0, per_rank, cfg.train.micro_batch_size)]

    # 4: the update
    def update(self, episodes: Episodes, step: int) -> dict:
        cfg, ppo = self.cfg, self.cfg.ppo
        mbs = cfg.train.micro_batch_size
        mini = ppo.mini_batch_size // self.ctx.dp
        sums: dict[str, list] = {}
        for epoch in range(ppo.ppo_epochs):
            order = epoch_order(episodes.tokens.shape[0], _seed(cfg.train.seed, step, epoch, self.ctx.dp_rank), 0, True)
            for start in range(0, len(order), mini):
                rows = torch.tensor(order[start : start + mini])
                part = episodes.rows(_device(rows))
                micro = [part.rows(slice(i, i + mbs)) for i in range(0, mini, mbs)]
                actor_metrics = {}
                if step >= ppo.critic_warmup_steps:  # during critic warm-up only the critic learns
                    ptx = self._ptx_batches(ppo_lib.ptx_batch_size(ppo.mini_batch_size, ppo.ptx_ratio)) if self.pretrain else []
                    n_policy = _global_sum(part.action_mask.sum())
                    n_ptx = _global_sum(sum(b.loss_mask.sum() for b in ptx)) if ptx else 1.0
                    forward = partial(actor_forward, vocab_size=self.vocab, clip_eps=ppo.clip_eps, entropy_coef=ppo.entropy_coef,
                                      ptx_coef=ppo.ptx_coef, ptx_scale=n_policy / max(n_ptx, 1.0))
                    names = ["policy_loss", "clipfrac", "approx_kl", "entropy", "ptx_loss"]
                    actor_metrics = self._step(self.actor, self.actor_opt, self.actor_sched, micro + ptx, forward, names)
                critic_metrics = self._step(self.critic, self.critic_opt, self.critic_sched, micro,
                                            partial(critic_forward, clip_eps=ppo.value_clip_eps), ["value_loss", "value_clipfrac"])
                for k, v in {**actor_metrics, **critic_metrics}.items():
                    sums.setdefault(k, []).append(v)
        return {key: sum(v) / len(v) for key, v in sums.items()}

    def _step(self, model, optimizer, scheduler, micro, forward, names):
        model.train()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        width = max(b.tokens.shape[1] for b in micro)
        metrics = run_schedule(model, micro, forward, names, width, self.cfg.train.micro_batch_size, forward_only=False)
        stepped, grad_norm = optimizer_step(model, optimizer, scheduler)
        if not stepped:
            self.ctx_log("non-finite gradients in a PPO update: optimizer step skipped")
        return metrics

    ctx_log = print

    # checkpoints
    def save(self, step: int):
        cfg, ctx = self.cfg, self.ctx
        meta = checkpoint_meta(cfg, ctx.tokenizer, "policy", reward_model=str(ckpt_lib.resolve_checkpoint(cfg.ppo.reward_model)))
        state = {
            "train_state": dataclasses.asdict(self.state), "ptx_state": dataclasses.asdict(self.ptx_state),
            "actor_scheduler": self.actor_sched.state_dict(), "critic_scheduler": self.critic_sched.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
        }
        return ckpt_lib.save_checkpoint(ctx.checkpoints_dir, step, {"actor": self.actor, "critic": self.critic}, meta,
                                        {"actor": self.actor_opt, "critic": self.critic_opt}, state, ctx.tokenizer.serialized_model(), cfg.train.keep_last)

    def resume(self) -> bool:
        latest = ckpt_lib.latest_checkpoint(self.ctx.checkpoints_dir)
        if latest is None:
            return False
        saved = ckpt_lib.load_checkpoint(latest, {"actor": self.actor, "critic": self.critic}, {"actor": self.actor_opt, "critic": self.critic_opt})
        self.state = TrainState(**saved["train_state"])
        self.ptx_state = TrainState(**saved["ptx_state"])
        self.actor_sched.load_state_dict(saved["actor_scheduler"])
        self.critic_sched.load_state_dict(saved["critic_scheduler"])
        self.kl_ctl.load_state_dict(saved["kl_controller"])
        return True


def run(cfg: Config) -> dict:
    check_ppo_config(cfg)
    ctx = setup_stage(cfg)
    trainer = PPOTrainer(ctx)
    resumed = trainer.resume()
    if trainer.state.step >= trainer.total_steps:
        print(f"[ppo] already at step {trainer.state.step} of {trainer.total_steps}; nothing to do")
        return {"status": "done", "step": trainer.state.step}
    logger = MetricsLogger(ctx.output_dir, trainer.state.step, trainer.total_steps, cfg.train.tensorboard, cfg.train.progress_bar, desc="ppo")
    trainer.ctx_log = logger.message
    if resumed:
        logger.message(f"resumed from {ckpt_lib.latest_checkpoint(ctx.checkpoints_dir)} at step {trainer.state.step}")
    preempt = PreemptionFlag()
    saved_at = trainer.state.step if resumed else -1
    while trainer.state.step < trainer.total_steps:
        step = trainer.state.step
        t0 = time.perf_counter()
        episodes, metrics = trainer.rollout(step)
        t1 = time.perf_counter()
        metrics.update({f"policy/{k}" if k in ("clipfrac", "approx_kl", "entropy", "policy_loss") else
                        ("ptx/loss" if k == "ptx_loss" else f"value/{k.replace('value_', '')}"): v
                        for k, v in trainer.update(episodes, step).items()})
        t2 = time.perf_counter()
        trainer.kl_ctl.update(metrics["rollout/kl"], cfg.train.global_batch_size)
        trainer.state.step += 1
        metrics.update({"time/train_s": t2 - t1, "tokens_per_s": metrics.pop("generated_tokens") / max(t2 - t0, 1e-9),
                        "lr": lr_now(trainer.actor_opt), "critic_lr": lr_now(trainer.critic_opt)})
        logger.log(trainer.state.step, metrics)
        logger.advance()
        if cfg.train.save_interval and trainer.state.step % cfg.train.save_interval == 0:
            trainer.save(trainer.state.step)
            saved_at = trainer.state.step
        if preempt.any_rank():
            if saved_at != trainer.state.step:
                trainer.save(trainer.state.step)
            logger.message(f"preempted: checkpoint saved at step {trainer.state.step}; run the same command to resume")
            logger.close()
            return {"status": "preempted", "step": trainer.state.step}
    if saved_at != trainer.state.step:
        trainer.save(trainer.state.step)
    logger.close()
    return {"status": "done", "step": trainer.state.step}
