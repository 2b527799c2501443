"""Recipe 3, PPO-ptx (InstructGPT §3.5, eq. 2): optimise the policy against the reward model.

    objective(phi) = E_(x,y)~pi_RL [ r(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x)) ]
                     + gamma * E_x~D_pretrain [ log pi_RL(x) ]

Each iteration (:meth:`PPORecipe.train_step`):
 1. sample a global batch of prompts; each data-parallel rank generates
    ``ppo.samples_per_prompt`` responses per prompt of its share with the actor (KV cache;
    ``ppo.rollout_engine``: ours, or Megatron-Core's dynamic engine on a GPU);
 2. score the episodes: actor log-probs (the "old" policy), frozen reference log-probs,
    critic values, and the reward: the frozen reward model's score at the last token and/or a
    rule-based ``ppo.reward_fn``; gather the whole batch on every rank;
 3. advantages (``ppo.advantage_estimator``): ``gae`` shapes per-token rewards (-beta * KL_t,
    plus the score at the last token) and runs GAE against the critic; ``grpo`` / ``rloo``
    compare each response with the other responses to its prompt (no critic; the KL is in
    the reward or, with ``ppo.kl_in_reward=false``, a k3 loss term of the actor step); then
    whiten over the global batch if ``ppo.whiten_advantages``;
 4. for ``ppo.ppo_epochs`` passes over mini-batches: one actor step on the clipped policy
    loss (+ optional entropy bonus) mixed with gamma x the pretraining NLL of
    ``ptx_ratio`` x as many pretraining sequences, and (``gae`` only) one critic step on the
    clipped value loss (separate optimizer);
 5. update the KL controller.
The loop (``training/loop.py``) logs, evaluates nothing, checkpoints and resumes.

The four models share the job's layout and devices: the actor (from SFT) and critic (from
the RM) train; the reference (SFT) and reward model are frozen (no grads, no optimizer
state) and can live in CPU memory between scoring phases (``ppo.offload_frozen``). Any
TP/PP layout: rollouts go through the pipeline stages (``rollout/engine.py``); scoring
runs Megatron's forward-only schedule (``models/scoring.py``); the update its 1F1B schedule.
Left out on purpose: a separate rollout engine (vLLM): rollouts run the actor's own module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from functools import partial

import torch

from megatron_rlhf.algorithms import advantages as adv_lib
from megatron_rlhf.algorithms.kl import AdaptiveKLController, FixedKLController
from megatron_rlhf.algorithms.ppo import actor_report, critic_report, ptx_batch_size, ptx_report
from megatron_rlhf.checkpoint import check_compatible, check_kind, load_weights, policy_network, read_meta, resolve_checkpoint, with_architecture
from megatron_rlhf.config import Config, ConfigError
from megatron_rlhf.data import prompt_budget
from megatron_rlhf.data.prompts import load_prompt_records
from megatron_rlhf.data.reward_fn import load_reward_fn
from megatron_rlhf.models.attention import packed_seq_params
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.rollout import padded_batch
from megatron_rlhf.rollout import rollout as generate_rollouts
from megatron_rlhf.rollout.dynamic import DynamicRollout, check_dynamic_config
from megatron_rlhf.models.logprobs import token_logprobs, vocab_parallel_entropy
from megatron_rlhf.models.reward import score_sequences
from megatron_rlhf.models.scoring import positions, sequence_logprobs, sequence_values
from megatron_rlhf.parallel import device, to_device
from megatron_rlhf.rollout.episodes import Episodes, gather_episodes, minibatch_rows
from megatron_rlhf.training import loop
from megatron_rlhf.training.loop import DataPosition, rank_slice
from megatron_rlhf.training.ptx import PretrainMix, global_tokens
from megatron_rlhf.training.step import lr_now, train_step, wrap_for_training


def _seed(*values) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, values)).encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------- forward steps


def actor_forward(model, batch, *, vocab_size, clip_eps, entropy_coef, ptx_coef, episode_tokens, ptx_tokens, kl_loss_coef=None, kl_estimator="k3",
                  temperature=1.0):
    """One micro-batch of the actor step: an ``Episodes`` slice (``actor_report``) or a
    pretraining batch (``ptx_report``); see ``algorithms/ppo.py`` for how they combine."""
    if isinstance(batch, Episodes):
        logits = model(batch.tokens, positions(batch.tokens), None)

        def loss_fn(logits):
            logits = logits[:, :-1]
            logprobs = token_logprobs(logits, batch.tokens[:, 1:], vocab_size, temperature)
            tempered = logits / temperature if temperature != 1.0 else logits
            entropy = vocab_parallel_entropy(tempered if entropy_coef else tempered.detach(), vocab_size)
            ref = batch.ref_logprobs if kl_loss_coef is not None else None
            return actor_report(logprobs, entropy, batch.old_logprobs, batch.advantages, batch.action_mask, clip_eps, entropy_coef,
                                ref, kl_loss_coef or 0.0, kl_estimator)

        return logits, loss_fn
    logits = model(batch.tokens, batch.position_ids, None, packed_seq_params=packed_seq_params(batch))  # packed with data.packing
    return logits, lambda logits: ptx_report(token_logprobs(logits, batch.labels, vocab_size), batch.loss_mask, ptx_coef, episode_tokens, ptx_tokens)


def critic_forward(model, batch: Episodes, *, clip_eps):
    values = model(batch.tokens, positions(batch.tokens), None)
    return values, lambda values: critic_report(values.squeeze(-1)[:, :-1].float(), batch.old_values, batch.returns, batch.action_mask, clip_eps)


def _offload(model, to_cpu: bool):
    if torch.cuda.is_available():
        model.to("cpu" if to_cpu else device())


def check_ppo_config(cfg: Config) -> None:
    """PPO's checks on the config alone, made before anything is loaded or built
    (tests/test_slurm.py runs them on every example config)."""
    if cfg.parallel.sequence_parallel:
        # Megatron fixes sequence parallelism in the modules when it builds them, and a
        # KV-cache decode step (one token) cannot be split along the sequence across TP ranks.
        raise ConfigError(
            "PPO does not support parallel.sequence_parallel=true: its rollouts decode one token at a time, which "
            "cannot be split along the sequence across tensor-parallel ranks; set parallel.sequence_parallel=false "
            "(the SFT and RM recipes support it)"
        )
    if not cfg.model.init_from:
        raise ConfigError("PPO starts the actor and reference from an SFT checkpoint: set model.init_from=<sft run or checkpoint>")
    if not cfg.ppo.reward_model and not cfg.ppo.reward_fn:
        raise ConfigError(
            "set ppo.reward_model=<reward model run or checkpoint> (the critic starts from it too) and/or "
            "ppo.reward_fn=path/to/file.py:function (a rule-based reward)"
        )
    if cfg.ppo.reward_fn:
        load_reward_fn(cfg.ppo.reward_fn)  # a missing file or function fails before anything is built
    if cfg.ppo.ptx_coef and not cfg.ppo.pretrain_path:
        raise ConfigError(f"ppo.ptx_coef={cfg.ppo.ptx_coef} needs pretraining text: set ppo.pretrain_path (JSONL of {{\"text\": ...}})")
    if cfg.ppo.rollout_engine == "dynamic":
        if cfg.ppo.rollout_micro_batches:
            raise ConfigError(
                f"ppo.rollout_micro_batches={cfg.ppo.rollout_micro_batches} sets our engine's slot groups; the dynamic engine "
                "schedules its own: unset it (0) or set ppo.rollout_engine=builtin"
            )
        check_dynamic_config(cfg)  # CUDA, flash attention, bf16, and the sampling it can honour
    gbs, mini, n = cfg.train.global_batch_size, cfg.ppo.mini_batch_size, cfg.ppo.samples_per_prompt
    if gbs % mini:
        raise ConfigError(f"train.global_batch_size={gbs} (episodes per iteration) must be a multiple of ppo.mini_batch_size={mini}")
    if gbs % n:
        raise ConfigError(f"train.global_batch_size={gbs} (episodes per iteration) must be a multiple of ppo.samples_per_prompt={n}")


def rollout_engine(cfg: Config, actor, episodes_per_rank: int):
    """Step 1's generator, called as :func:`megatron_rlhf.rollout.rollout`: ours, or Megatron-Core's
    dynamic engine over the actor's own module (its KV buffer sized for ``ppo.rollout_slots``
    requests, else this rank's episodes per iteration)."""
    ppo = cfg.ppo
    if ppo.rollout_engine == "dynamic":
        return DynamicRollout(actor, max_requests=ppo.rollout_slots or episodes_per_rank, seed=cfg.train.seed)
    return partial(generate_rollouts, slots=ppo.rollout_slots or None, micro_batches=ppo.rollout_micro_batches or None)


# ----------------------------------------------------------------------------- the recipe


class PPORecipe:
    kind = "policy"
    select_metric = None  # PPO has no held-out metric; every checkpoint is a candidate policy
    select_mode = "max"

    def __init__(self, ctx: loop.RunContext):
        check_ppo_config(ctx.cfg)
        cfg, ppo, tok = ctx.cfg, ctx.cfg.ppo, ctx.tokenizer
        self.ctx, self.cfg, self.vocab = ctx, cfg, tok.vocab_size
        self.prompts_per_step = cfg.train.global_batch_size // ppo.samples_per_prompt
        if self.prompts_per_step % ctx.dp or ppo.mini_batch_size % ctx.dp:
            raise ConfigError(
                f"the prompts per iteration (train.global_batch_size / ppo.samples_per_prompt = {self.prompts_per_step}) and "
                f"ppo.mini_batch_size={ppo.mini_batch_size} must be multiples of the data-parallel size {ctx.dp}"
            )
        # the models: actor and reference from the SFT policy; the reward model (frozen) and the
        # critic (gae only) from the RM, or the critic from the SFT with a fresh head when the
        # reward is rule-based alone
        sft = resolve_checkpoint(cfg.model.init_from)
        sft_meta = check_compatible(sft, cfg, tok)
        check_kind(sft, sft_meta, "policy", "model.init_from")
        self.reward_fn = load_reward_fn(ppo.reward_fn) if ppo.reward_fn else None
        rm = resolve_checkpoint(ppo.reward_model) if ppo.reward_model else None
        rm_model = cfg.model
        if rm is not None:
            rm_meta = read_meta(rm)
            check_kind(rm, rm_meta, "reward", "ppo.reward_model")
            if rm_meta.get("tokenizer_fingerprint") != tok.fingerprint():
                raise ConfigError(
                    f"actor/RM tokenizer mismatch: ppo.reward_model={rm} uses tokenizer {rm_meta.get('tokenizer_fingerprint')}, "
                    f"the actor ({sft}) uses {tok.fingerprint()}; train the RM from this SFT model"
                )
            rm_model = with_architecture(cfg.model, rm_meta)
        self.critic_model = rm_model
        seed = cfg.train.seed
        self.actor = build_model(cfg.model, cfg.parallel, self.vocab, seed=seed)
        load_weights(self.actor, sft, policy_network(sft_meta))
        self.reference = build_model(cfg.model, cfg.parallel, self.vocab, seed=seed)
        load_weights(self.reference, sft, policy_network(sft_meta))
        self.critic = self.reward_model = None
        if ppo.advantage_estimator == "gae":
            self.critic = build_model(rm_model, cfg.parallel, self.vocab, scalar_head=True, seed=seed)
            if rm is not None:
                load_weights(self.critic, rm, "model")
            else:
                load_weights(self.critic, sft, policy_network(sft_meta), skip_output_layer=True)
        if rm is not None:
            self.reward_model = build_model(rm_model, cfg.parallel, self.vocab, scalar_head=True, seed=seed)
            load_weights(self.reward_model, rm, "model")
        self.frozen = [m for m in (self.reference, self.reward_model) if m is not None]
        for frozen in self.frozen:
            frozen.requires_grad_(False)
            frozen.eval()
            _offload(frozen, ppo.offload_frozen)
        if cfg.parallel.pipeline_model_parallel_size > 1:
            # Episodes and pretraining micro-batches differ in width (and a last micro-batch
            # may have fewer rows): the pipeline stages exchange shapes before each transfer.
            for model in (self.actor, self.critic, *self.frozen):
                if model is not None:
                    model.config.variable_seq_lengths = True

        self.prompts = load_prompt_records(ppo.prompts_path, tok, prompt_budget(cfg.model.seq_length, ppo.max_new_tokens))
        # With ptx_coef=0 and a pretrain_path the ptx batches still run (coefficient 0, no
        # gradient) so that ptx/loss is logged and comparable; leave pretrain_path empty to skip them.
        self.ptx = PretrainMix.from_file(ctx, ppo.pretrain_path) if ppo.pretrain_path else None
        if len(self.prompts) < self.prompts_per_step:
            raise ConfigError(f"{ppo.prompts_path}: {len(self.prompts)} prompts, fewer than one iteration's {self.prompts_per_step}")
        self.total_steps = loop.total_steps(cfg, len(self.prompts) // self.prompts_per_step)
        total_updates = self.total_steps * ppo.ppo_epochs * (cfg.train.global_batch_size // ppo.mini_batch_size)
        self.actor, actor_opt, actor_sched = wrap_for_training(self.actor, cfg.parallel, cfg.train, total_steps=total_updates)
        self.networks, self.optimizers, self.schedulers = {"actor": self.actor}, {"actor": actor_opt}, {"actor": actor_sched}
        if self.critic is not None:
            self.critic, critic_opt, critic_sched = wrap_for_training(self.critic, cfg.parallel, cfg.train, lr=ppo.critic_lr, total_steps=total_updates)
            self.networks["critic"], self.optimizers["critic"], self.schedulers["critic"] = self.critic, critic_opt, critic_sched
        # the rollout engine, built once
        self.generate = rollout_engine(cfg, self.actor, episodes_per_rank=self.prompts_per_step // ctx.dp * ppo.samples_per_prompt)
        self.kl_ctl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl else FixedKLController(ppo.kl_coef)
        self.prompt_position = DataPosition()
        # greedy rollouts (temperature 0) are scored under the model's own distribution
        self.temperature = ppo.temperature or 1.0

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        episodes, metrics = self.rollout(step)  # 1-3
        t1 = time.perf_counter()
        update = self.update(episodes, step)  # 4
        self.kl_ctl.update(metrics["rollout/kl"], self.cfg.train.global_batch_size)  # 5
        t2 = time.perf_counter()
        names = {"policy_loss": "policy/policy_loss", "clipfrac": "policy/clipfrac", "approx_kl": "policy/approx_kl", "entropy": "policy/entropy",
                 "actor_grad_norm": "policy/grad_norm", "ptx_loss": "ptx/loss", "value_loss": "value/loss", "value_clipfrac": "value/clipfrac",
                 "critic_grad_norm": "value/grad_norm", "kl_loss": "policy/kl_loss"}
        metrics.update({names[k]: v for k, v in update.items() if k in names})
        metrics.update({"time/train_s": t2 - t1, "tokens_per_s": metrics.pop("generated_tokens") / max(t2 - t0, 1e-9),
                        "lr": lr_now(self.optimizers["actor"]), "skipped": update["skipped"],
                        "loss": update.get("policy_loss", update.get("value_loss", 0.0))})
        if "critic" in self.optimizers:
            metrics["critic_lr"] = lr_now(self.optimizers["critic"])
        return metrics

    # 1-3: rollout and scoring
    def rollout(self, step: int) -> tuple[Episodes, dict]:
        cfg, ppo, ctx, tok = self.cfg, self.cfg.ppo, self.ctx, self.ctx.tokenizer
        # 1. this rank's prompts, each ppo.samples_per_prompt times (a prompt's group stays on one rank)
        indices = self.prompt_position.next_batch(len(self.prompts), self.prompts_per_step, cfg.train.seed, cfg.data.shuffle)
        n = ppo.samples_per_prompt
        picked = [i for i in rank_slice(indices, ctx.dp, ctx.dp_rank) for _ in range(n)]
        mine = [self.prompts[i] for i in picked]
        # one sampling stream per (step, prompt, sample): the episodes do not depend on the DP size
        # (the dynamic engine draws from one stream per rank, seeded from all of them)
        seeds = [_seed(cfg.train.seed, step, i, j % n) for j, i in enumerate(picked)]
        t0 = time.perf_counter()
        gen = self.generate(self.actor, [p.ids for p in mine], ppo.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=ppo.temperature,
                            top_k=ppo.top_k, top_p=ppo.top_p, seeds=seeds, vocab_size=self.vocab)
        t1 = time.perf_counter()
        # 2. score: old and reference log-probs, values, the reward
        batch = padded_batch(gen, pad_id=tok.pad_id)
        tokens = to_device(batch.tokens)
        mbs = cfg.train.micro_batch_size
        # log-probs of the distribution sampled from: softmax(logits / temperature), before top-k/top-p
        old_logprobs = sequence_logprobs(self.actor, tokens, self.vocab, mbs, self.temperature)
        for frozen in self.frozen:
            _offload(frozen, False)
        ref_logprobs = sequence_logprobs(self.reference, tokens, self.vocab, mbs, self.temperature)
        rm_scores = rule_scores = torch.zeros(len(mine))
        if self.reward_model is not None:
            rm_scores = score_sequences(self.reward_model, gen.sequences, mbs, pad_id=tok.pad_id)
        for frozen in self.frozen:
            _offload(frozen, ppo.offload_frozen)
        if self.reward_fn is not None:
            rule_scores = self.reward_fn.score(mine, [tok.decode([t for t in r if t != tok.eos_id]) for r in gen.responses])
        action_mask = to_device(batch.response_mask[:, 1:])
        old_values = sequence_values(self.critic, tokens, mbs) if self.critic is not None else torch.zeros_like(old_logprobs)
        scores = torch.stack([rm_scores, rule_scores, rm_scores + rule_scores], dim=1)
        episodes = gather_episodes(Episodes(tokens, action_mask, old_logprobs, ref_logprobs, old_values, to_device(scores)), tok.pad_id)
        rm_scores, rule_scores, episodes.scores = episodes.scores.unbind(1)
        # 3. advantages, on the whole batch (every rank holds it)
        mask = episodes.action_mask
        kl_coef = self.kl_ctl.value if ppo.kl_in_reward else 0.0
        rewards, kl = adv_lib.shape_rewards(episodes.scores, episodes.old_logprobs, episodes.ref_logprobs, mask, kl_coef, ppo.kl_estimator)
        if ppo.advantage_estimator == "gae":
            advantages, episodes.returns = adv_lib.gae(rewards, episodes.old_values * mask, mask, ppo.gamma, ppo.lam)
        else:  # grpo / rloo: each response against the others of its prompt (rows of a group are adjacent)
            sequence_rewards = rewards.sum(1)  # the score minus the KL penalty when it is in the reward
            if ppo.advantage_estimator == "grpo":
                per_response = adv_lib.grpo_advantages(sequence_rewards, ppo.samples_per_prompt, ppo.grpo_scale_by_std)
            else:
                per_response = adv_lib.rloo_advantages(sequence_rewards, ppo.samples_per_prompt)
            advantages, episodes.returns = adv_lib.expand_to_tokens(per_response, mask), torch.zeros_like(rewards)
        episodes.advantages = adv_lib.whiten(advantages, mask) if ppo.whiten_advantages else advantages
        t2 = time.perf_counter()
        n = cfg.train.global_batch_size
        response_lengths = mask.sum(1)
        metrics = {
            "rollout/reward": float(episodes.scores.sum()) / n,
            "rollout/kl": float(kl.sum(1).sum()) / n,
            "rollout/kl_coef": self.kl_ctl.value,
            "rollout/response_length": float(response_lengths.sum()) / n,
            "rollout/non_score_reward": float((rewards.sum(1) - episodes.scores).sum()) / n,
            "time/generate_s": t1 - t0,
            "time/score_s": t2 - t1,
            "generated_tokens": float(response_lengths.sum()),
        }
        if self.reward_model is not None and self.reward_fn is not None:
            metrics.update({"rollout/rm_score": float(rm_scores.sum()) / n, "rollout/rule_reward": float(rule_scores.sum()) / n})
        return episodes, metrics

    # 4: the update
    def update(self, episodes: Episodes, step: int) -> dict:
        cfg, ppo, ctx = self.cfg, self.cfg.ppo, self.ctx
        mbs = cfg.train.micro_batch_size
        sums: dict[str, list] = {}
        skipped = 0
        for epoch in range(ppo.ppo_epochs):
            # (the trailing 0 keeps the mini-batch order of the per-rank shuffles of earlier versions at DP=1)
            global_minibatches = minibatch_rows(episodes.tokens.shape[0], ppo.mini_batch_size, _seed(cfg.train.seed, step, epoch, 0))
            for global_rows in global_minibatches:
                part = episodes.rows(to_device(torch.tensor(rank_slice(global_rows, ctx.dp, ctx.dp_rank))))
                micro = [part.rows(slice(i, i + mbs)) for i in range(0, part.tokens.shape[0], mbs)]
                metrics = {}
                if step >= ppo.critic_warmup_steps:  # during critic warm-up only the critic learns
                    ptx = self.ptx.microbatches(ptx_batch_size(ppo.mini_batch_size, ppo.ptx_ratio)) if self.ptx is not None else []
                    ptx_tokens = global_tokens(ptx) if self.ptx is not None else 1.0
                    forward = partial(actor_forward, vocab_size=self.vocab, clip_eps=ppo.clip_eps, entropy_coef=ppo.entropy_coef, ptx_coef=ppo.ptx_coef,
                                      episode_tokens=float(episodes.action_mask[global_rows].sum()), ptx_tokens=ptx_tokens,
                                      kl_loss_coef=None if ppo.kl_in_reward else self.kl_ctl.value, kl_estimator=ppo.kl_estimator,
                                      temperature=self.temperature)
                    actor = train_step(self.actor, self.optimizers["actor"], self.schedulers["actor"], micro + ptx, forward)
                    skipped += actor.pop("skipped")
                    metrics.update(actor_grad_norm=actor.pop("grad_norm"), **actor)
                if self.critic is not None:
                    critic = train_step(self.critic, self.optimizers["critic"], self.schedulers["critic"], micro, partial(critic_forward, clip_eps=ppo.value_clip_eps))
                    skipped += critic.pop("skipped")
                    metrics.update(critic_grad_norm=critic.pop("grad_norm"), **critic)
                for k, v in metrics.items():
                    sums.setdefault(k, []).append(v)
        result = {key: sum(v) / len(v) for key, v in sums.items()}
        result["skipped"] = skipped
        return result

    def evaluate(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        # "pretrain" is saved without pretraining text too (the position it never moved from)
        pretrain = self.ptx.state_dict() if self.ptx is not None else vars(DataPosition()).copy()
        return {"prompts": vars(self.prompt_position).copy(), "pretrain": pretrain, "kl_controller": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.prompt_position = DataPosition(**state["prompts"])
        if self.ptx is not None:
            self.ptx.load_state_dict(state["pretrain"])
        self.kl_ctl.load_state_dict(state["kl_controller"])

    def extra_meta(self) -> dict:
        ppo = self.cfg.ppo
        meta = {"advantage_estimator": ppo.advantage_estimator, "reward_fn": ppo.reward_fn,
                "reward_model": str(resolve_checkpoint(ppo.reward_model)) if ppo.reward_model else ""}
        if self.critic is not None:
            meta["critic_model"] = dataclasses.asdict(self.critic_model)
        return meta


def run(cfg: Config) -> dict:
    check_ppo_config(cfg)
    ctx = loop.setup(cfg)
    return loop.run(ctx, PPORecipe(ctx))
