"""Megatron-Core's ``DynamicInferenceEngine`` behind our rollout contract (``ppo.rollout_engine=dynamic``).

    sampler = DynamicRollout(actor, max_requests=64, seed=1234)      # once per recipe (GPU only)
    gen = sampler(actor, prompts, 64, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=1.0,
                  top_k=0, top_p=1.0, seeds=seeds, vocab_size=tok.vocab_size)   # a Generation

It takes and returns what :func:`megatron_rlhf.rollout.rollout` does, so the PPO recipe swaps
one for the other on ``ppo.rollout_engine``. The engine is NVIDIA's own for RL rollouts
(``megatron/rl/inference/megatron.py`` builds it the same way): continuous batching over a
paged KV cache, chunked prefill, in-flight requests of any length. Megatron-Core 0.16.1 runs
it on CUDA only (pinned memory, CUDA events, paged flash attention).

What is built, once (:class:`DynamicRollout`): a ``DynamicInferenceContext`` (the paged KV
cache), a ``GPTInferenceWrapper`` around the actor's own ``GPTModel`` (``unwrap`` of the DDP
wrapper: the same module object, so every rollout runs the weights of the latest update; no
copy and no weight transfer), a ``TextGenerationController`` and the engine. Each rollout
resets the engine, adds one request per prompt and steps until all have finished.

Memory (:func:`kv_buffer_plan`, from the config): ``max_requests`` is ``ppo.rollout_slots``,
or else this rank's episodes per iteration (prompts per step / DP x samples per prompt). The
KV buffer holds ``max_requests x ceil(model.seq_length / 256)`` blocks of 256 tokens (plus
Megatron's one dummy block), each ``2 x layers of this stage x 256 x kv heads per TP rank x
head_dim x 2 bytes``, so no request is ever paused or evicted for lack of blocks. It stays
allocated for the whole run (our engine allocates its cache per rollout): the engine's
``suspend()``/``resume()`` would free it between rollouts, but in 0.16.1 ``resume()``
re-allocates the context's per-request tensors while the controller keeps references to the
old ``termination_id`` tensor (``_init_dynamic_sampling_tensors``), so eos detection would
read stale values. A forward step takes at most ``max_tokens`` tokens: ``max_requests x
seq_length`` capped at 16384 (Megatron's default), rounded up to its 64-token padding;
longer prefills are chunked.

What differs from our engine (``rollout/engine.py``):
- **Random streams.** Ours draws each prompt's tokens from its own seed, so a prompt's
  tokens do not depend on its batch. Megatron samples every request from one generator per
  rank (``torch.multinomial``), seeded here from all of the rollout's seeds: a rollout is
  reproducible for the same prompts, seeds and layout, but a prompt's tokens depend on the
  others, and sampled tokens differ from ours. Greedy decoding (temperature 0) gives the
  same tokens up to near-ties of the logits (the kernels differ; see tests/gpu).
- **Sampling.** Megatron refuses top-k together with top-p (the config check refuses it
  first). Its top-p keeps a token when the tokens ranked above it sum to at most ``top_p``
  (ours: below ``top_p``); equal only up to exact ties. Temperature is applied by our wrapper
  (below), so top-k/top-p see the tempered logits, as in ours.
- **Log-probs.** ``Generation.logprobs`` are the engine's: ``log_softmax`` of the step's
  logits after our wrapper cut the padded vocabulary and divided by the temperature, i.e.
  ours (the tempered distribution before top-k/top-p), but from bf16 logits. PPO does
  not use them: it re-scores every episode with ``sequence_logprobs``.
- **Attention.** With a dynamic context, Megatron's ``Attention.forward`` never calls the
  layer spec's ``core_attention`` (our ``SDPAttention`` on the local spec, TE's on the TE
  spec): it calls ``Attention.flash_decode_and_prefill``, i.e. ``flash_attn_varlen_func``
  / ``flash_attn_with_kvcache`` with a block table (flash-attn >= 2.7.3) or FlashAttention-3.
  So no other layer spec is needed, the training model serves as it is, and the requirement
  is that package and einops (checked before anything is built) and half-precision weights (flash
  attention has no fp32 kernels: ``model.precision=fp32`` is refused). RoPE goes through the
  context (``apply_rotary_emb_query/key``) at each token's own position.
- **Padded vocabulary.** The dynamic sampler never receives the real vocabulary size; our
  wrapper sets the logits of the padding ids to ``-inf``, so they are never sampled (as in ours).
- **CUDA graphs** are off (``model.config.cuda_graph_impl`` stays ``"none"``): they would have
  to be chosen when the model is built, which changes the training forward too (NVIDIA toggles
  them around each rollout). Chunked prefill is on.
- **RoPE cache.** ``RotaryEmbedding.forward`` is an ``lru_cache``; the engine runs under
  ``torch.inference_mode()``, so it caches an inference tensor, which the next training step
  of the same length gets back. Megatron's unfused RoPE only reads it (a CPU test trains right
  after a rollout), but an op that saves it for backward (a fused RoPE kernel) fails with
  "Inference tensors cannot be saved for backward". The cache is cleared before and after
  every rollout, as NVIDIA's ``megatron_rl_inference_mode`` does.
- Not supported with it: FP8 (the wrapper's FP8 preparation re-wraps the model, which must
  stay the module the optimizer updates; our engine refuses FP8 too) and fp32 weights (above).
  Pipeline parallelism goes through the engine's own stage-to-stage path (one batch through
  the stages at a time).

Checked on CPU (tests/test_rollout_dynamic.py): this adapter on Megatron's real engine,
controller and context, their CUDA calls pointed at the CPU and a reference paged attention in
place of flash-attn (greedy tokens equal ours at TP=1, TP=2 and PP=2, log-probs at TP=1; two
PPO steps through the recipe). The flash-attn kernels and BF16 only on a GPU
(tests/gpu/test_gpu_dynamic_rollout.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from megatron_rlhf.config import Config, ConfigError
from megatron_rlhf.data.sampler import mix_seed
from megatron_rlhf.models.builder import unwrap
from megatron_rlhf.rollout.results import Generation
from megatron_rlhf.rollout.sampling import _check_sampling, prompt_seeds
from megatron_rlhf.rollout.stage import _check_can_generate, _checked_prompts

logger = logging.getLogger(__name__)

BLOCK_SIZE_TOKENS = 256  # Megatron's default; flash-attn 2's paged KV cache needs a multiple of 256
MAX_STEP_TOKENS = 16384  # DynamicInferenceContext.DEFAULT_MAX_TOKENS
TOKEN_ROUNDER = 64  # DynamicInferenceContext.TOKEN_ROUNDER: a step's tokens are padded to a multiple of it
FLASH_ATTN_MIN = "2.7.3"  # what Attention.forward asserts for dynamic batching

# ----------------------------------------------------------------------------- checks and pure helpers


def dynamic_engine_unavailable() -> Optional[str]:
    """Why Megatron-Core's dynamic engine cannot run here (None: it can): CUDA, then flash attention."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    from megatron.core.transformer import attention

    if attention.rearrange is None:
        return "einops is not installed (the dynamic context's attention reshapes with einops.rearrange: pip install einops)"
    if attention.HAVE_FA3:
        return None
    if attention.flash_attn_varlen_func is None or attention.flash_attn_with_kvcache is None:
        return (f"flash-attn is not installed (the dynamic context's attention calls flash_attn_varlen_func / "
                f"flash_attn_with_kvcache: pip install 'flash-attn>={FLASH_ATTN_MIN}' --no-build-isolation, or FlashAttention-3)")
    from megatron.core.utils import is_fa_min_version

    if not is_fa_min_version(FLASH_ATTN_MIN):
        return f"flash-attn is older than {FLASH_ATTN_MIN} (pip install -U 'flash-attn>={FLASH_ATTN_MIN}' --no-build-isolation)"
    return None


def check_dynamic_config(cfg: Config) -> None:
    """``ppo.rollout_engine=dynamic``'s checks on the config (and this machine), before anything is built."""
    ppo, model = cfg.ppo, cfg.model
    if ppo.top_k > 0 and ppo.top_p < 1.0:
        raise ConfigError(
            f"ppo.rollout_engine=dynamic cannot sample with ppo.top_k={ppo.top_k} and ppo.top_p={ppo.top_p} together "
            "(Megatron-Core's dynamic sampler refuses both); set one of them off (top_k=0 or top_p=1.0), or ppo.rollout_engine=builtin"
        )
    if model.precision == "fp32":
        raise ConfigError(
            "ppo.rollout_engine=dynamic needs bf16 weights (its paged flash-attention kernels have no fp32 version); "
            "set model.precision=bf16 (or auto), or ppo.rollout_engine=builtin"
        )
    if model.fp8:
        raise ConfigError(
            f"ppo.rollout_engine=dynamic does not support model.fp8={model.fp8} (Megatron's FP8 inference path re-wraps the "
            "model, and the engine must run the very module the optimizer updates); unset model.fp8"
        )
    reason = dynamic_engine_unavailable()
    if reason:
        raise ConfigError(f"ppo.rollout_engine=dynamic needs a CUDA GPU with flash attention ({reason}); "
                          "set ppo.rollout_engine=builtin (the default, any device)")


def sampling_arguments(temperature: float, top_k: int, top_p: float) -> dict:
    """Our sampling settings as Megatron ``SamplingParams`` fields.

    Megatron: ``top_k == 1`` is greedy (argmax), ``top_p == 0.0`` is off, top-k and top-p
    together are refused, temperature divides the logits. Ours: temperature 0 is greedy,
    ``top_p == 1.0`` is off. The temperature itself is applied by :class:`DynamicRollout`'s
    wrapper (so the engine's log-probs are of the tempered distribution): Megatron gets 1.0.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return dict(temperature=1.0, top_k=1, top_p=0.0)
    if top_k > 0 and top_p < 1.0:
        raise ValueError(f"the dynamic engine cannot use top_k={top_k} and top_p={top_p} together; switch one off")
    return dict(temperature=1.0, top_k=int(top_k), top_p=float(top_p) if top_p < 1.0 else 0.0)


def rollout_seed(seeds: Sequence[int]) -> int:
    """One seed for Megatron's single sampling generator, from every prompt's seed (order counts)."""
    return mix_seed(*seeds)


@dataclass(frozen=True)
class KVBufferPlan:
    """The dynamic context's sizes (see the module docstring). ``buffer_size_gb`` is what
    ``DynamicInferenceContext`` takes; it yields exactly ``blocks + 1`` blocks (one dummy)."""

    max_requests: int
    max_tokens: int
    block_size_tokens: int
    blocks: int
    block_bytes: int

    @property
    def buffer_bytes(self) -> int:
        return (self.blocks + 1) * self.block_bytes

    @property
    def buffer_size_gb(self) -> float:
        # half a block of slack: the context takes int(gb * 2**30) // block_bytes blocks
        return (self.blocks + 1.5) * self.block_bytes / 1024**3


def kv_buffer_plan(max_requests: int, max_sequence_length: int, layers: int, kv_heads_per_rank: int, head_dim: int,
                   dtype_bytes: int, tp: int = 1, block_size_tokens: int = BLOCK_SIZE_TOKENS,
                   max_step_tokens: int = MAX_STEP_TOKENS) -> KVBufferPlan:
    """Size the dynamic context so that ``max_requests`` sequences of up to
    ``max_sequence_length`` tokens always fit (no pausing, no eviction)."""
    if max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests}")
    blocks = max_requests * math.ceil(max_sequence_length / block_size_tokens)
    block_bytes = 2 * layers * block_size_tokens * kv_heads_per_rank * head_dim * dtype_bytes
    rounder = math.ceil(TOKEN_ROUNDER / tp) * tp
    tokens = max(max_requests, min(max_step_tokens, max_requests * max_sequence_length))
    return KVBufferPlan(max_requests=max_requests, max_tokens=rounder * math.ceil(tokens / rounder),
                        block_size_tokens=block_size_tokens, blocks=blocks, block_bytes=block_bytes)


# ----------------------------------------------------------------------------- the engine


class _TokenIdsOnly:
    """The tokenizer the controller is given. Rollouts pass and return token ids; the engine
    only detokenizes finished requests to fill their ``generated_text``, which is unused here."""

    bos = None

    def __init__(self, eod: int):
        self.eod = eod

    def detokenize(self, tokens, **_) -> str:
        return ""


def _clear_rotary_cache(model) -> None:
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is not None and hasattr(rotary.forward, "cache_clear"):
        rotary.forward.cache_clear()


class DynamicRollout:
    """Megatron-Core's dynamic engine over ``model`` (our GPTModel, possibly DDP-wrapped), built
    once; call it like :func:`megatron_rlhf.rollout.rollout` (without ``slots``: the engine
    keeps up to ``max_requests`` requests in flight and queues the rest).

    Every rank of the model-parallel group builds it and calls it with the same prompts (as
    with ours). ``max_sequence_length``: default the model's ``seq_length``.
    """

    def __init__(self, model, *, max_requests: int, seed: int = 0, max_sequence_length: Optional[int] = None):
        reason = dynamic_engine_unavailable()
        if reason:
            raise RuntimeError(f"Megatron-Core's dynamic engine cannot run here: {reason}; use the builtin engine")
        _check_can_generate(model)
        from megatron.core import parallel_state
        from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
        from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
        from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController
        from megatron.core.process_groups_config import ProcessGroupCollection

        self.model = unwrap(model)
        config = self.model.config
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.max_sequence_length = int(max_sequence_length or self.model.max_sequence_length)
        layers = len(self.model.decoder.layers)  # this stage's
        dtype_bytes = torch.tensor([], dtype=config.params_dtype).element_size()
        self.plan = kv_buffer_plan(max_requests, self.max_sequence_length, layers, config.num_query_groups // tp,
                                   config.kv_channels, dtype_bytes, tp)
        groups = ProcessGroupCollection.use_mpu_process_groups()
        self.context = DynamicInferenceContext(
            params_dtype=config.params_dtype,
            num_layers=layers,
            kv_channels=config.kv_channels,
            num_attention_heads=config.num_query_groups,  # the KV cache holds the key/value heads
            max_sequence_length=self.max_sequence_length,
            buffer_size_gb=self.plan.buffer_size_gb,
            max_requests=self.plan.max_requests,
            max_tokens=self.plan.max_tokens,
            block_size_tokens=self.plan.block_size_tokens,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            num_cuda_graphs=None,
            materialize_only_last_token_logits=True,
            use_flashinfer_fused_rope=False,
            unified_memory_level=0,
        )
        wrapper_config = InferenceWrapperConfig(
            hidden_size=config.hidden_size,
            params_dtype=config.params_dtype,
            inference_batch_times_seqlen_threshold=-1,  # one [1, tokens] batch per step through the stages
            padded_vocab_size=self.model.vocab_size,
            inference_max_requests=self.plan.max_requests,
            inference_max_seq_length=self.max_sequence_length,
            fp32_residual_connection=config.fp32_residual_connection,
        )
        self.wrapper = _wrapper_class()(self.model, wrapper_config, self.context, pg_collection=groups)
        self.controller = TextGenerationController(self.wrapper, _TokenIdsOnly(-1), pp_group=groups.pp)
        self.engine = DynamicInferenceEngine(self.controller, self.context, random_seed=int(seed) % 2**31,
                                             enable_chunked_prefill=True, pg_collection=groups)
        logger.info("dynamic rollout engine: KV buffer %.3f GiB (%d blocks of %d tokens), max_requests %d, max_tokens %d",
                    self.plan.buffer_bytes / 1024**3, self.plan.blocks, self.plan.block_size_tokens, self.plan.max_requests,
                    self.plan.max_tokens)

    def __call__(
        self,
        model,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        eos_id: Optional[int] = None,
        pad_id: int = 0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seeds: Optional[Sequence[int]] = None,
        generator: Optional[torch.Generator] = None,
        vocab_size: Optional[int] = None,
    ) -> Generation:
        """Sample a response for every prompt (arguments as :func:`megatron_rlhf.rollout.rollout`;
        ``pad_id`` is accepted for the same call and unused: no padded tensors are built)."""
        from megatron.core.inference.inference_request import Status
        from megatron.core.inference.sampling_params import SamplingParams

        if unwrap(model) is not self.model:
            raise ValueError("this DynamicRollout was built for another model; build one per model")
        sampling = sampling_arguments(temperature, top_k, top_p)
        context = self.max_sequence_length
        prompts = _checked_prompts(prompts, max_new_tokens, context)
        lengths = [len(p) for p in prompts]
        b = len(prompts)
        if b == 0 or max_new_tokens == 0:
            return Generation.empty(prompts)
        if vocab_size is None:
            vocab_size = getattr(self.model, "rlhf_vocab_size", None)
        seeds = prompt_seeds(b, seeds, generator)
        self.wrapper.vocab_size = vocab_size
        self.wrapper.temperature = temperature if temperature > 0 else 1.0
        termination = -1 if eos_id is None else int(eos_id)

        was_training = self.model.training
        self.model.eval()
        _clear_rotary_cache(self.model)
        try:
            self.engine.reset()
            self.controller.sampling_rng.manual_seed(rollout_seed(seeds))
            for i, prompt in enumerate(prompts):
                params = SamplingParams(**sampling, return_log_probs=True, skip_prompt_log_probs=True,
                                        num_tokens_to_generate=min(max_new_tokens, context - lengths[i]), termination_id=termination)
                self.engine.add_request(i, prompt, params)
            # every step that runs moves each of its requests on by at least one token
            max_steps = sum(lengths) + sum(min(max_new_tokens, context - n) for n in lengths) + b
            records, steps = [], 0
            while self.engine.has_unfinished_requests():
                if steps == max_steps:
                    raise RuntimeError(f"dynamic engine: {b} requests still unfinished after {steps} steps (no progress); "
                                       f"{len(self.engine.waiting_request_ids)} waiting to be scheduled")
                records.extend(self.engine.step_modern()["finished_request_records"])
                steps += 1
        finally:
            _clear_rotary_cache(self.model)
            self.model.train(was_training)

        done = {record.request_id: record.merge() for record in records}
        failed = [i for i in range(b) if i not in done or done[i].status != Status.COMPLETED]
        if failed:
            i = failed[0]
            status = done[i].status if i in done else "never finished"
            events = [str(e) for e in done[i].events][-3:] if i in done else []
            raise RuntimeError(f"dynamic engine: {len(failed)} of {b} requests did not complete (first: prompt {i}, {status}, {events})")
        responses = [list(done[i].generated_tokens) for i in range(b)]
        logprobs: Optional[List[List[float]]] = [list(done[i].generated_log_probs or []) for i in range(b)]
        if any(len(lp) != len(r) for lp, r in zip(logprobs, responses)):
            logger.warning("dynamic engine: log-probs do not line up with the generated tokens; Generation.logprobs is None")
            logprobs = None
        return Generation(
            sequences=[p + r for p, r in zip(prompts, responses)],
            prompt_lengths=lengths,
            response_lengths=[len(r) for r in responses],
            finished=[eos_id is not None and bool(r) and r[-1] == eos_id for r in responses],
            logprobs=logprobs,
        )


def _wrapper_class():
    """``GPTInferenceWrapper`` whose logits have the padded vocabulary cut (``-inf``) and are
    divided by the rollout's temperature, on the last stage, before the engine samples."""
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    class _RolloutWrapper(GPTInferenceWrapper):
        vocab_size: Optional[int] = None
        temperature: float = 1.0

        def run_one_forward_step(self, inference_input, recv_buffer_seq_len=None):
            logits = super().run_one_forward_step(inference_input, recv_buffer_seq_len)
            if logits is not None:  # [1, requests, padded vocab]; None on earlier pipeline stages
                if self.vocab_size is not None and self.vocab_size < logits.shape[-1]:
                    logits[..., self.vocab_size:] = float("-inf")
                if self.temperature != 1.0:
                    logits.div_(self.temperature)
            return logits

    return _RolloutWrapper
