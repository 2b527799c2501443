#!/usr/bin/env python
"""One PPO-ptx iteration, timed by phase, ours against a transformers baseline in one run.

    # one GPU, the acceptance figures (1.3B Llama-style, 64 prompts, 512 new tokens)
    python bench/ppo_step.py --preset 1.3b --flavour llama --batch 64 --max-new-tokens 512 --micro-batch-size 8
    # CPU smoke run (seconds; fp32; numbers are not performance claims)
    python bench/ppo_step.py --preset tiny --batch 4 --prompt-length 8 --max-new-tokens 8 --micro-batch-size 2

An iteration: generate ``--max-new-tokens`` for ``--batch`` prompts of ``--prompt-length``
random tokens (sampling at temperature 1; end-of-sequence is never produced, so every
response has exactly ``--max-new-tokens`` tokens and both sides do the same work); score
the episodes with the actor (old log-probs), the frozen reference, the critic and the frozen
reward model; shape rewards, GAE, whitening; then ONE actor step (clipped policy loss mixed
with gamma x the NLL of ``ptx_ratio x batch`` pretraining sequences of ``--ptx-length``
tokens) and ONE critic step (clipped value loss). All four models have the actor's shape
(critic and RM with a scalar head), random weights.

Ours: the PPO recipe's own ``PPORecipe.rollout`` and ``PPORecipe.update`` (KV-cache
generation on Megatron's static inference context, Megatron DDP + optimizer), with the
four models built here instead of loaded from checkpoints (``BenchPPORecipe``).
Baseline: TRL has no PPO trainer any more (removed from TRL; 1.16.0 on PyPI has none), so
the baseline is what a user would write with plain transformers: ``model.generate`` (the
default dynamic KV cache, SDPA), forwards of reference/critic/RM, the same loss functions
(``megatron_rlhf.algorithms``), ``torch.optim.AdamW``; fp32 weights under BF16 autocast for
the trained models and BF16 weights for the frozen ones on GPU (``--baseline-dtype bf16``:
BF16 weights everywhere).

Reported: the time split (generate / score / train), generated tokens/s, peak memory, and
decoding against the memory-bandwidth roofline: every decode step must read the actor's
weights and the KV cache so far, bytes_per_step = weight bytes + KV bytes at the mean
context length; roofline time = bytes / HBM bandwidth; fraction = roofline time / measured
time per step (generate time / new tokens, so prefill and sampling count against us).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

PTX_COEF = 27.8  # InstructGPT's gamma
KL_COEF = 0.02


def _data(spec):
    """The prompts and the pretraining sequences, identical for ours and the baseline."""
    import torch

    v, b, g = spec["model"]["vocab_size"], spec["batch"], torch.Generator().manual_seed(spec["seed"])
    prompts = torch.randint(1, v, (b, spec["prompt_length"]), generator=g)
    n_ptx = _ptx_count(spec)
    pretrain = torch.randint(1, v, (n_ptx, spec["ptx_length"] + 1), generator=g)
    return prompts, pretrain


def _ptx_count(spec):
    from megatron_rlhf.algorithms.ppo import ptx_batch_size

    return ptx_batch_size(spec["batch"], spec["ptx_ratio"]) if spec["ptx_ratio"] else 0


def _phases(rollout_s, generate_s, train_s, new_tokens, spec):
    total = rollout_s + train_s
    return dict(iteration_s=total, generate_s=generate_s, score_s=rollout_s - generate_s, train_s=train_s,
                generated_tokens=new_tokens, generated_tokens_per_s=new_tokens / generate_s,
                tokens_per_s=new_tokens / total, decode_step_s=generate_s / spec["max_new_tokens"])


# ----------------------------------------------------------------------------- ours


def child_ours(spec):
    from megatron_rlhf.algorithms.kl import FixedKLController
    from megatron_rlhf.config import Config, ModelConfig, ParallelConfig, PPOConfig, TrainConfig
    from megatron_rlhf.data.prompts import PromptRecord
    from megatron_rlhf.data.sft import SftExample
    from megatron_rlhf.models.builder import build_model, use_transformer_engine
    from megatron_rlhf.parallel import init_distributed, seed_everything
    from megatron_rlhf.recipes.ppo import PPORecipe, rollout_engine
    from megatron_rlhf.training.loop import DataPosition, RunContext
    from megatron_rlhf.training.ptx import PretrainMix
    from megatron_rlhf.training.step import wrap_for_training

    model_cfg = ModelConfig(**spec["model"])
    parallel = ParallelConfig(**spec["parallel"])
    b = spec["batch"]
    cfg = Config(stage="ppo", model=model_cfg, parallel=parallel,
                 train=TrainConfig(lr=1e-6, global_batch_size=b, micro_batch_size=spec["micro_batch_size"], seed=spec["seed"],
                                   tensorboard=False, progress_bar=False),
                 ppo=PPOConfig(max_new_tokens=spec["max_new_tokens"], mini_batch_size=b, ppo_epochs=1, kl_coef=KL_COEF,
                               ptx_coef=PTX_COEF if spec["ptx_ratio"] else 0.0, ptx_ratio=spec["ptx_ratio"], temperature=1.0))
    cfg.validate()
    env = init_distributed(parallel, model_cfg)
    seed_everything(spec["seed"])
    prompts, pretrain = _data(spec)

    class BenchTokenizer:
        """What the trainer reads of a tokenizer; eos None: every response runs to max_new_tokens."""

        vocab_size, eos_id, pad_id = model_cfg.vocab_size, None, 0

    class BenchPPORecipe(PPORecipe):
        """PPORecipe with random-weight models built here (PPORecipe.__init__ loads checkpoints)."""

        def __init__(self, ctx):
            self.ctx, self.cfg, self.vocab = ctx, ctx.cfg, model_cfg.vocab_size
            seed = cfg.train.seed
            self.actor = build_model(model_cfg, parallel, self.vocab, seed=seed)
            self.reference = build_model(model_cfg, parallel, self.vocab, seed=seed)
            self.reference.load_state_dict(self.actor.state_dict())
            self.critic = build_model(model_cfg, parallel, self.vocab, scalar_head=True, seed=seed + 1)
            self.reward_model = build_model(model_cfg, parallel, self.vocab, scalar_head=True, seed=seed + 1)
            self.reward_model.load_state_dict(self.critic.state_dict())
            for frozen in (self.reference, self.reward_model):
                frozen.requires_grad_(False)
                frozen.eval()
            self.prompts = [PromptRecord(ids, "", {}, "bench", i + 1) for i, ids in enumerate(prompts.tolist())]
            self.ptx = PretrainMix(ctx, [SftExample(row[:1], row[1:]) for row in pretrain.tolist()]) if len(pretrain) else None
            self.frozen, self.reward_fn, self.critic_model = [self.reference, self.reward_model], None, model_cfg
            self.prompts_per_step, self.temperature = b, cfg.ppo.temperature or 1.0
            self.generate = rollout_engine(cfg, self.actor, episodes_per_rank=b)
            self.total_steps = spec["warmup"] + 1
            self.actor, actor_opt, actor_sched = wrap_for_training(self.actor, parallel, cfg.train, total_steps=self.total_steps)
            self.critic, critic_opt, critic_sched = wrap_for_training(self.critic, parallel, cfg.train, lr=cfg.ppo.critic_lr, total_steps=self.total_steps)
            self.networks = {"actor": self.actor, "critic": self.critic}
            self.optimizers, self.schedulers = {"actor": actor_opt, "critic": critic_opt}, {"actor": actor_sched, "critic": critic_sched}
            self.kl_ctl = FixedKLController(cfg.ppo.kl_coef)
            self.prompt_position = DataPosition()

    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        trainer = BenchPPORecipe(RunContext(cfg, env, BenchTokenizer(), Path(tmp)))
        params = sum(p.numel() for p in trainer.actor.parameters())
        full_cfg = trainer.cfg
        for step in range(spec["warmup"]):  # short warm-up iterations: kernels, allocator, FP8 state
            trainer.cfg = dataclasses.replace(full_cfg, ppo=dataclasses.replace(full_cfg.ppo, max_new_tokens=min(8, spec["max_new_tokens"])))
            trainer.update(trainer.rollout(step)[0], step)
        trainer.cfg = full_cfg
        bc.reset_peak_memory()
        with bc.Timer() as rollout:
            episodes, metrics = trainer.rollout(spec["warmup"])
        with bc.Timer() as train:
            update = trainer.update(episodes, spec["warmup"])
        result = _phases(rollout.seconds, metrics["time/generate_s"], train.seconds, metrics["generated_tokens"], spec)
    result.update(bc.peak_memory(), implementation="megatron-rlhf PPORecipe.rollout/update on megatron-core GPTModel ("
                  + ("Transformer Engine" if use_transformer_engine(model_cfg) else "local layers, SDPA") + ", static KV cache)",
                  actor_parameters=params, reward=metrics["rollout/reward"], policy_loss=update.get("policy_loss"),
                  ptx_loss=update.get("ptx_loss"), value_loss=update.get("value_loss"))
    return result


# ----------------------------------------------------------------------------- baseline


def child_baseline(spec):
    import contextlib

    import torch
    from transformers import GenerationConfig

    from megatron_rlhf.algorithms import advantages as adv_lib
    from megatron_rlhf.algorithms import ppo as ppo_lib
    from sft_throughput import hf_model

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    mixed = cuda and spec["precision"] != "fp32"
    trained_dtype = torch.bfloat16 if mixed and spec["baseline_dtype"] == "bf16" else torch.float32
    frozen_dtype = torch.bfloat16 if mixed else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if mixed else contextlib.nullcontext
    mbs, b, new = spec["micro_batch_size"], spec["batch"], spec["max_new_tokens"]
    torch.manual_seed(spec["seed"])

    class ValueModel(torch.nn.Module):
        """The transformer body and a Linear(h, 1) head: per-token values (critic) or scores (RM)."""

        def __init__(self, dtype):
            super().__init__()
            body = hf_model(spec["model"], dtype)
            self.body = body.model if hasattr(body, "model") else body.transformer
            self.head = torch.nn.Linear(self.body.config.hidden_size, 1, device=device, dtype=dtype)

        def forward(self, tokens):
            return self.head(self.body(input_ids=tokens).last_hidden_state).squeeze(-1).float()

    actor = hf_model(spec["model"], trained_dtype)
    reference = hf_model(spec["model"], frozen_dtype)
    reference.load_state_dict(actor.state_dict())
    critic, reward_model = ValueModel(trained_dtype), ValueModel(frozen_dtype)
    reward_model.load_state_dict(critic.state_dict())
    for frozen in (reference, reward_model):
        frozen.requires_grad_(False)
        frozen.eval()
    params = sum(p.numel() for p in actor.parameters())
    opt_kw = {"fused": True} if cuda else {}
    actor_opt = torch.optim.AdamW(actor.parameters(), lr=1e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, **opt_kw)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=9e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, **opt_kw)
    prompts, pretrain = _data(spec)
    prompts, pretrain = prompts.to(device), pretrain.to(device)
    p_len = prompts.shape[1]

    def logprobs(model, tokens):
        with autocast():
            logits = model(input_ids=tokens).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)

    def iteration(max_new):
        gen_cfg = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=True, temperature=1.0, top_k=0,
                                   top_p=1.0, eos_token_id=None, pad_token_id=0, bos_token_id=None, use_cache=True)
        with bc.Timer() as gen_t:
            actor.eval()
            with torch.no_grad(), autocast():
                seqs = actor.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=gen_cfg)
        with bc.Timer() as score_t:
            mask = torch.zeros(b, seqs.shape[1] - 1, dtype=torch.bool, device=device)
            mask[:, p_len - 1:] = True
            with torch.no_grad():
                old = torch.cat([logprobs(actor, c) for c in seqs.split(mbs)])
                ref = torch.cat([logprobs(reference, c) for c in seqs.split(mbs)])
                with autocast():
                    values = torch.cat([critic(c)[:, :-1] for c in seqs.split(mbs)])
                    scores = torch.cat([reward_model(c)[:, -1] for c in seqs.split(mbs)])
            rewards, _ = adv_lib.shape_rewards(scores, old, ref, mask, KL_COEF, "k1")
            adv, returns = adv_lib.gae(rewards, values * mask, mask, 1.0, 0.95)
            adv = adv_lib.whiten(adv, mask)
            n_actions = mask.sum()
        with bc.Timer() as train_t:
            actor.train()
            for i in range(0, b, mbs):
                rows = slice(i, i + mbs)
                new_lp = logprobs(actor, seqs[rows])
                loss, _ = ppo_lib.policy_loss(new_lp, old[rows], adv[rows], mask[rows], 0.2, num_tokens=1)
                (loss / n_actions).backward()
            if len(pretrain):
                for chunk in pretrain.split(mbs):
                    with autocast():
                        logits = actor(input_ids=chunk[:, :-1]).logits.float()
                    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
                    (PTX_COEF * nll * chunk.shape[0] / len(pretrain)).backward()
            torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
            actor_opt.step()
            actor_opt.zero_grad(set_to_none=True)
            critic.train()
            for i in range(0, b, mbs):
                rows = slice(i, i + mbs)
                with autocast():
                    v = critic(seqs[rows])[:, :-1]
                loss, _ = ppo_lib.value_loss(v, values[rows], returns[rows], mask[rows], 0.2, num_tokens=1)
                (loss / n_actions).backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            critic_opt.step()
            critic_opt.zero_grad(set_to_none=True)
        return gen_t.seconds, score_t.seconds, train_t.seconds, int(mask.sum()), float(scores.mean())

    for _ in range(spec["warmup"]):
        iteration(min(8, new))
    bc.reset_peak_memory()
    gen_s, score_s, train_s, generated, reward = iteration(new)
    result = _phases(gen_s + score_s, gen_s, train_s, generated, spec)
    result.update(bc.peak_memory(), actor_parameters=params, reward=reward,
                  implementation=f"transformers {type(actor).__name__}.generate (dynamic KV cache, sdpa) + hand-written PPO-ptx step, "
                                 f"torch.optim.AdamW; trained weights {str(trained_dtype).replace('torch.', '')}"
                                 + (" under bf16 autocast" if mixed else "") + f", frozen {str(frozen_dtype).replace('torch.', '')}")
    return result


# ----------------------------------------------------------------------------- the parent


def roofline(phases: dict, m, spec: dict, info: dict, weight_bytes: int, kv_bytes: int) -> dict:
    """Decoding against the HBM roofline (see the module doc)."""
    p, n, b = spec["prompt_length"], spec["max_new_tokens"], spec["batch"]
    mean_context = p + (n + 1) / 2
    weights = bc.matmul_params(m) * weight_bytes
    kv = bc.kv_bytes_per_token(m, kv_bytes) * b * mean_context
    per_step = weights + kv
    achieved = per_step / phases["decode_step_s"]
    bandwidth = info.get("hbm_bandwidth_tbs")
    return dict(bytes_per_decode_step=per_step, weight_bytes_per_step=weights, kv_bytes_per_step=kv,
                mean_context_tokens=mean_context, achieved_bandwidth_gbs=achieved / 1e9,
                roofline_step_s=per_step / (bandwidth * 1e12) if bandwidth else None,
                roofline_fraction=achieved / (bandwidth * 1e12) if bandwidth else None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return bc.child_main(argv, {"ours": child_ours, "baseline": child_baseline})
    p = bc.parser(__doc__)
    p.add_argument("--batch", type=int, default=64, help="prompts (episodes) per iteration")
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--ptx-ratio", type=float, default=1.0, help="pretraining sequences per episode (InstructGPT: 8; 0: no ptx)")
    p.add_argument("--ptx-length", type=int, help="tokens per pretraining sequence (default prompt + new tokens)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward when scoring and training")
    p.add_argument("--warmup", type=int, default=1, help="untimed short iterations first (8 new tokens)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--fp8", action="store_true", help="Transformer Engine FP8 (hybrid recipe) for all four models")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"], default="auto")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True, help="also time the transformers loop")
    p.add_argument("--baseline-dtype", choices=["mixed", "bf16"], default="mixed",
                   help="trained baseline models: fp32 weights + bf16 autocast (mixed) or bf16 weights")
    p.add_argument("--peak-tflops", type=float, help="dense BF16 peak of a GPU the table does not know")
    p.add_argument("--hbm-bandwidth-tbs", type=float, help="HBM bandwidth (TB/s) of a GPU the table does not know")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, help="seconds per measurement process")
    p.add_argument("--output", help="JSON file (default bench/results/ppo_<shape>_<precision>_<device>.json)")
    args = p.parse_args(argv)
    if min(args.batch, args.prompt_length, args.max_new_tokens, args.micro_batch_size) < 1 or args.warmup < 0 or args.ptx_ratio < 0:
        p.error("--batch, --prompt-length, --max-new-tokens, --micro-batch-size must be >= 1; --warmup, --ptx-ratio >= 0")
    if args.batch % args.micro_batch_size:
        p.error(f"--batch {args.batch} must be a multiple of --micro-batch-size {args.micro_batch_size}")
    if not args.preset and not (args.num_layers and args.hidden_size and args.num_attention_heads):
        p.error("give --preset or --num-layers, --hidden-size and --num-attention-heads")

    precision = bc.resolve_precision(args.precision)
    bc.check_fp8(args.fp8)
    bc.check_recompute(args.recompute)
    info = bc.device_info(args.peak_tflops, args.hbm_bandwidth_tbs)
    device_tag = "cpu" if info["device"] == "cpu" else info["device"].replace(" ", "_").lower()
    total = args.prompt_length + args.max_new_tokens
    ptx_length = args.ptx_length or total
    m = bc.model_config_from_args(args, args.preset, max(total, ptx_length))
    m = dataclasses.replace(m, precision=precision, fp8="hybrid" if args.fp8 else None, transformer_impl=args.transformer_impl,
                            recompute_granularity=None if args.recompute == "none" else args.recompute)
    m.validate()
    label = f"{args.preset or 'custom'} {args.flavour} {'fp8' if args.fp8 else precision} batch={args.batch} new={args.max_new_tokens}"
    spec = dict(label=label, preset=args.preset, model=bc.asdict(m), parallel={}, precision=precision, fp8=args.fp8, batch=args.batch,
                prompt_length=args.prompt_length, max_new_tokens=args.max_new_tokens, ptx_ratio=args.ptx_ratio,
                ptx_length=ptx_length, micro_batch_size=args.micro_batch_size, warmup=args.warmup, seed=args.seed,
                baseline_dtype=args.baseline_dtype, kl_coef=KL_COEF, ptx_coef=PTX_COEF if args.ptx_ratio else 0.0,
                ptx_sequences=None)
    spec["ptx_sequences"] = _ptx_count(spec)
    script = Path(__file__).resolve()
    word = 2 if precision == "bf16" else 4
    ours = bc.run_part(script, "ours", spec, args.timeout)
    if "error" not in ours:
        ours["decode_roofline"] = roofline(ours, m, spec, info, word, word)
    base = None
    if args.baseline:
        base = bc.run_part(script, "baseline", dict(spec, label=label + " [transformers]"), args.timeout)
        if "error" not in base:
            trained = 4 if precision == "fp32" or args.baseline_dtype == "mixed" else 2
            base["decode_roofline"] = roofline(base, m, spec, info, trained, word)
    result = dict(bc.header("ppo_step", info), config=spec, shape=bc.shape_summary(m), ours=ours,
                  tokens_per_s=ours.get("tokens_per_s"), generated_tokens_per_s=ours.get("generated_tokens_per_s"),
                  iteration_s=ours.get("iteration_s"), peak_memory_bytes=ours.get("peak_memory_bytes"),
                  decode_roofline_fraction=(ours.get("decode_roofline") or {}).get("roofline_fraction"),
                  mfu=None, mfu_note="PPO is not reported as MFU: decoding is bandwidth-bound (see decode_roofline)",
                  baseline=base, baseline_kind="transformers" if base is not None else None,
                  trl_note=_trl_note(),
                  baseline_tokens_per_s=(base or {}).get("tokens_per_s"),
                  baseline_generated_tokens_per_s=(base or {}).get("generated_tokens_per_s"),
                  speedup_vs_baseline=bc.ratio((base or {}).get("iteration_s"), ours.get("iteration_s")),
                  generate_speedup_vs_baseline=bc.ratio((base or {}).get("generate_s"), ours.get("generate_s")))
    name = f"ppo_{args.preset or 'custom'}_{args.flavour}_{'fp8' if args.fp8 else precision}_b{args.batch}_n{args.max_new_tokens}_{device_tag}.json"
    bc.write_result(result, args.output, name)
    _print(result)
    return 1 if "error" in ours else 0


def _trl_note() -> str:
    try:
        import trl
    except ImportError:
        return "trl not installed; its current releases (1.x) have no PPO trainer, so the baseline is the transformers loop"
    has = hasattr(trl, "PPOTrainer")
    return (f"trl {trl.__version__} installed" + (" and has PPOTrainer, but its API changes between releases; the baseline is "
            "the transformers loop, which does the same work" if has else " without a PPO trainer; the baseline is the transformers loop"))


def _print(result):
    def line(name, r):
        if r is None:
            return
        if "error" in r:
            print(f"  {name}: ERROR {r['error']}")
            return
        roof = r.get("decode_roofline", {})
        frac = roof.get("roofline_fraction")
        print(f"  {name}: iteration {r['iteration_s']:.2f} s (generate {r['generate_s']:.2f}, score {r['score_s']:.2f}, train {r['train_s']:.2f}); "
              f"{r['generated_tokens_per_s']:.0f} generated tokens/s; decode {roof.get('achieved_bandwidth_gbs', 0):.1f} GB/s"
              + (f" = {100 * frac:.0f}% of roofline" if frac else "") + f"; peak {r['peak_memory_bytes'] / 2**30:.2f} GiB")

    line("ours", result["ours"])
    line("transformers", result["baseline"])
    if result.get("speedup_vs_baseline"):
        print(f"  speed-up (iteration time): {result['speedup_vs_baseline']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
