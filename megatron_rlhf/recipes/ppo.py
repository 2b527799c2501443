"""Recipe 3, PPO-ptx (InstructGPT §3.5, eq. 2): optimise the policy against the reward model.

    objective(phi) = E_(x,y)~pi_RL [ r(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x)) ]
                     + gamma * E_x~D_pretrain [ log pi_RL(x) ]

Each iteration (:meth:`PPORecipe.train_step`):
 1. sample a global batch of prompts; each data-parallel rank generates one response per
    prompt of its share with the actor (KV cache);
 2. score the episodes: actor log-probs (the "old" policy), frozen reference log-probs,
    critic values, and the frozen reward model's score at the last token; gather the whole
    batch on every rank;
 3. shape per-token rewards (-beta * KL_t, plus the score at the last token), run GAE and
    whiten the advantages over the global batch;
 4. for ``ppo.ppo_epochs`` passes over mini-batches: one actor step on the clipped policy
    loss (+ optional entropy bonus) mixed with gamma x the pretraining NLL of
    ``ptx_ratio`` x as many pretraining sequences, and one critic step on the clipped value
    loss (separate optimizer);
 5. update the KL controller.
The loop (``training/loop.py``) logs, evaluates nothing, checkpoints and resumes.

The four models share the job's layout and devices: the actor (from SFT) and critic (from
the RM) train; the reference (SFT) and reward model are frozen (no grads, no optimizer
state) and can live in CPU memory between scoring phases (``ppo.offload_frozen``). Any
TP/PP layout: rollouts go through the pipeline stages (``models/generation.py``); scoring
runs Megatron's forward-only schedule (``models/scoring.py``); the update its 1F1B schedule.
Left out on purpose: a separate rollout engine (vLLM): rollouts use Megatron's own KV cache.
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
from megatron_rlhf.data import collate_sft, load_pretrain, load_prompts, prompt_budget
from megatron_rlhf.data.packing import pack_microbatches, pack_sft, sft_unit_length
from megatron_rlhf.models.attention import packed_seq_params
from megatron_rlhf.models.builder import build_model
from megatron_rlhf.models.generation import generate, padded_batch
from megatron_rlhf.models.logprobs import token_logprobs, vocab_parallel_entropy
from megatron_rlhf.models.reward import score_sequences
from megatron_rlhf.models.scoring import positions, sequence_logprobs, sequence_values
from megatron_rlhf.parallel import data_parallel_sum, device, to_device
from megatron_rlhf.rollout.episodes import Episodes, gather_episodes, minibatch_rows
from megatron_rlhf.training import loop
from megatron_rlhf.training.loop import DataPosition, rank_slice
from megatron_rlhf.training.step import lr_now, train_step, wrap_for_training


def _seed(*values) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, values)).encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------- forward steps


def actor_forward(model, batch, *, vocab_size, clip_eps, entropy_coef, ptx_coef, episode_tokens, ptx_tokens):
    """One micro-batch of the actor step: an ``Episodes`` slice (``actor_report``) or a
    pretraining batch (``ptx_report``); see ``algorithms/ppo.py`` for how they combine."""
    if isinstance(batch, Episodes):
        logits = model(batch.tokens, positions(batch.tokens), None)

        def loss_fn(logits):
            logits = logits[:, :-1]
            logprobs = token_logprobs(logits, batch.tokens[:, 1:], vocab_size)
            entropy = vocab_parallel_entropy(logits if entropy_coef else logits.detach(), vocab_size)
            return actor_report(logprobs, entropy, batch.old_logprobs, batch.advantages, batch.action_mask, clip_eps, entropy_coef)

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
    if not cfg.ppo.reward_model:
        raise ConfigError("set ppo.reward_model=<reward model run or checkpoint> (the critic starts from it too)")
    if cfg.ppo.ptx_coef and not cfg.ppo.pretrain_path:
        raise ConfigError(f"ppo.ptx_coef={cfg.ppo.ptx_coef} needs pretraining text: set ppo.pretrain_path (JSONL of {{\"text\": ...}})")
    gbs, mini = cfg.train.global_batch_size, cfg.ppo.mini_batch_size
    if gbs % mini:
        raise ConfigError(f"train.global_batch_size={gbs} (episodes per iteration) must be a multiple of ppo.mini_batch_size={mini}")


# ----------------------------------------------------------------------------- the recipe


class PPORecipe:
    kind = "policy"
    select_metric = None  # PPO has no held-out metric; every checkpoint is a candidate policy
    select_mode = "max"

    def __init__(self, ctx: loop.RunContext):
        check_ppo_config(ctx.cfg)
        cfg, ppo, tok = ctx.cfg, ctx.cfg.ppo, ctx.tokenizer
        self.ctx, self.cfg, self.vocab = ctx, cfg, tok.vocab_size
        if cfg.train.global_batch_size % ctx.dp or ppo.mini_batch_size % ctx.dp:
            raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} and ppo.mini_batch_size={ppo.mini_batch_size} must be multiples of the data-parallel size {ctx.dp}")
        # the four models: actor and reference from the SFT policy, critic and RM from the RM
        sft = resolve_checkpoint(cfg.model.init_from)
        sft_meta = check_compatible(sft, cfg, tok)
        check_kind(sft, sft_meta, "policy", "model.init_from")
        rm = resolve_checkpoint(ppo.reward_model)
        rm_meta = read_meta(rm)
        check_kind(rm, rm_meta, "reward", "ppo.reward_model")
        if rm_meta.get("tokenizer_fingerprint") != tok.fingerprint():
            raise ConfigError(
                f"actor/RM tokenizer mismatch: ppo.reward_model={rm} uses tokenizer {rm_meta.get('tokenizer_fingerprint')}, "
                f"the actor ({sft}) uses {tok.fingerprint()}; train the RM from this SFT model"
            )
        rm_model = self.critic_model = with_architecture(cfg.model, rm_meta)
        seed = cfg.train.seed
        self.actor = build_model(cfg.model, cfg.parallel, self.vocab, seed=seed)
        load_weights(self.actor, sft, policy_network(sft_meta))
        self.reference = build_model(cfg.model, cfg.parallel, self.vocab, seed=seed)
        load_weights(self.reference, sft, policy_network(sft_meta))
        self.critic = build_model(rm_model, cfg.parallel, self.vocab, scalar_head=True, seed=seed)
        load_weights(self.critic, rm, "model")
        self.reward_model = build_model(rm_model, cfg.parallel, self.vocab, scalar_head=True, seed=seed)
        load_weights(self.reward_model, rm, "model")
        for frozen in (self.reference, self.reward_model):
            frozen.requires_grad_(False)
            frozen.eval()
            _offload(frozen, ppo.offload_frozen)
        if cfg.parallel.pipeline_model_parallel_size > 1:
            # Episodes and pretraining micro-batches differ in width (and a last micro-batch
            # may have fewer rows): the pipeline stages exchange shapes before each transfer.
            for model in (self.actor, self.critic, self.reference, self.reward_model):
                model.config.variable_seq_lengths = True

        self.prompts = load_prompts(ppo.prompts_path, tok, prompt_budget(cfg.model.seq_length, ppo.max_new_tokens))
        # With ptx_coef=0 and a pretrain_path the ptx batches still run (coefficient 0, no
        # gradient) so that ptx/loss is logged and comparable; leave pretrain_path empty to skip them.
        self.pretrain = load_pretrain(ppo.pretrain_path, tok, cfg.model.seq_length) if ppo.pretrain_path else []
        if len(self.prompts) < cfg.train.global_batch_size:
            raise ConfigError(f"{ppo.prompts_path}: {len(self.prompts)} prompts, fewer than train.global_batch_size={cfg.train.global_batch_size}")
        self.total_steps = loop.total_steps(cfg, len(self.prompts) // cfg.train.global_batch_size)
        total_updates = self.total_steps * ppo.ppo_epochs * (cfg.train.global_batch_size // ppo.mini_batch_size)
        self.actor, actor_opt, actor_sched = wrap_for_training(self.actor, cfg.parallel, cfg.train, total_steps=total_updates)
        self.critic, critic_opt, critic_sched = wrap_for_training(self.critic, cfg.parallel, cfg.train, lr=ppo.critic_lr, total_steps=total_updates)
        self.networks = {"actor": self.actor, "critic": self.critic}
        self.optimizers = {"actor": actor_opt, "critic": critic_opt}
        self.schedulers = {"actor": actor_sched, "critic": critic_sched}
        self.kl_ctl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl else FixedKLController(ppo.kl_coef)
        self.prompt_position = DataPosition()
        self.ptx_position = DataPosition()

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        episodes, metrics = self.rollout(step)  # 1-3
        t1 = time.perf_counter()
        update = self.update(episodes, step)  # 4
        self.kl_ctl.update(metrics["rollout/kl"], self.cfg.train.global_batch_size)  # 5
        t2 = time.perf_counter()
        names = {"policy_loss": "policy/policy_loss", "clipfrac": "policy/clipfrac", "approx_kl": "policy/approx_kl", "entropy": "policy/entropy",
                 "actor_grad_norm": "policy/grad_norm", "ptx_loss": "ptx/loss", "value_loss": "value/loss", "value_clipfrac": "value/clipfrac",
                 "critic_grad_norm": "value/grad_norm"}
        metrics.update({names[k]: v for k, v in update.items() if k in names})
        metrics.update({"time/train_s": t2 - t1, "tokens_per_s": metrics.pop("generated_tokens") / max(t2 - t0, 1e-9),
                        "lr": lr_now(self.optimizers["actor"]), "critic_lr": lr_now(self.optimizers["critic"]),
                        "skipped": update["skipped"], "loss": update.get("policy_loss", update["value_loss"])})
        return metrics

    # 1-3: rollout and scoring
    def rollout(self, step: int) -> tuple[Episodes, dict]:
        cfg, ppo, ctx, tok = self.cfg, self.cfg.ppo, self.ctx, self.ctx.tokenizer
        indices = self.prompt_position.next_batch(len(self.prompts), cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
        mine = [self.prompts[i] for i in rank_slice(indices, ctx.dp, ctx.dp_rank)]
        t0 = time.perf_counter()
        generator = torch.Generator(device=device()).manual_seed(_seed(cfg.train.seed, step, ctx.dp_rank))
        gen = generate(self.actor, mine, ppo.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p, generator=generator, vocab_size=self.vocab)
        t1 = time.perf_counter()
        batch = padded_batch(gen, pad_id=tok.pad_id)
        tokens = to_device(batch.tokens)
        mbs = cfg.train.micro_batch_size
        old_logprobs = sequence_logprobs(self.actor, tokens, self.vocab, mbs)
        for frozen in (self.reference, self.reward_model):
            _offload(frozen, False)
        ref_logprobs = sequence_logprobs(self.reference, tokens, self.vocab, mbs)
        scores = to_device(score_sequences(self.reward_model, gen.sequences, mbs, pad_id=tok.pad_id))
        for frozen in (self.reference, self.reward_model):
            _offload(frozen, ppo.offload_frozen)
        old_values = sequence_values(self.critic, tokens, mbs)
        mine = Episodes(tokens, to_device(batch.response_mask[:, 1:]), old_logprobs, ref_logprobs, old_values, scores)
        episodes = gather_episodes(mine, tok.pad_id)
        # 3. per-token rewards, GAE and whitening, on the whole batch (every rank holds it)
        mask = episodes.action_mask
        rewards, kl = adv_lib.shape_rewards(episodes.scores, episodes.old_logprobs, episodes.ref_logprobs, mask, self.kl_ctl.value, ppo.kl_estimator)
        advantages, episodes.returns = adv_lib.gae(rewards, episodes.old_values * mask, mask, ppo.gamma, ppo.lam)
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
        return episodes, metrics

    def _ptx_batches(self, count: int) -> list:
        cfg = self.cfg
        indices = self.ptx_position.next_batch(len(self.pretrain), count, cfg.train.seed + 1, cfg.data.shuffle)
        mine = [self.pretrain[i] for i in rank_slice(indices, self.ctx.dp, self.ctx.dp_rank)]
        if not mine:
            return []
        mbs = cfg.train.micro_batch_size
        if cfg.data.packing:  # bins of an unpacked micro-batch's tokens, no padding between the chunks
            return [to_device(b) for b in pack_microbatches(mine, sft_unit_length, partial(pack_sft, pad_id=self.ctx.tokenizer.pad_id), mbs * cfg.model.seq_length)]
        batch = collate_sft(mine, pad_id=self.ctx.tokenizer.pad_id, max_len=cfg.model.seq_length)
        return [to_device(type(batch)(*(t[i : i + mbs] for t in batch))) for i in range(0, len(mine), mbs)]

    # 4: the update
    def update(self, episodes: Episodes, step: int) -> dict:
        cfg, ppo, ctx = self.cfg, self.cfg.ppo, self.ctx
        mbs = cfg.train.micro_batch_size
        sums: dict[str, list] = {}
        skipped = 0
        for epoch in range(ppo.ppo_epochs):
            # (the trailing 0 keeps the mini-batch order of the per-rank shuffles of earlier versions at DP=1)
            global_minibatches = minibatch_rows(episodes.tokens.shape[0], ppo.mini_batch_size, _seed(cfg.train.seed, step, epoch, 0), 1, 0)
            for global_rows in global_minibatches:
                part = episodes.rows(to_device(torch.tensor(rank_slice(global_rows, ctx.dp, ctx.dp_rank))))
                micro = [part.rows(slice(i, i + mbs)) for i in range(0, part.tokens.shape[0], mbs)]
                metrics = {}
                if step >= ppo.critic_warmup_steps:  # during critic warm-up only the critic learns
                    ptx = self._ptx_batches(ptx_batch_size(ppo.mini_batch_size, ppo.ptx_ratio)) if self.pretrain else []
                    (ptx_tokens,) = data_parallel_sum([sum(float(b.loss_mask.sum()) for b in ptx)]) if self.pretrain else (1.0,)
                    forward = partial(actor_forward, vocab_size=self.vocab, clip_eps=ppo.clip_eps, entropy_coef=ppo.entropy_coef, ptx_coef=ppo.ptx_coef,
                                      episode_tokens=float(episodes.action_mask[global_rows].sum()), ptx_tokens=ptx_tokens)
                    actor = train_step(self.actor, self.optimizers["actor"], self.schedulers["actor"], micro + ptx, forward)
                    skipped += actor.pop("skipped")
                    metrics.update(actor_grad_norm=actor.pop("grad_norm"), **actor)
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
        return {"prompts": vars(self.prompt_position).copy(), "pretrain": vars(self.ptx_position).copy(), "kl_controller": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.prompt_position = DataPosition(**state["prompts"])
        self.ptx_position = DataPosition(**state["pretrain"])
        self.kl_ctl.load_state_dict(state["kl_controller"])

    def extra_meta(self) -> dict:
        return {"reward_model": str(resolve_checkpoint(self.cfg.ppo.reward_model)), "critic_model": dataclasses.asdict(self.critic_model)}


def run(cfg: Config) -> dict:
    check_ppo_config(cfg)
    ctx = loop.setup(cfg)
    return loop.run(ctx, PPORecipe(ctx))
