"""The config's sections: frozen dataclasses holding every default and validating themselves.

Names follow Megatron-LM where it has one (``parallel.tensor_model_parallel_size``,
``train.max_steps``, ``output_dir``). Reading YAML and overrides is ``loading.py``'s.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from typing import Optional


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    flavour: str = "gpt2"  # "gpt2": LayerNorm, GELU, learned positions; "llama": RMSNorm, SwiGLU, RoPE, GQA
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # grouped-query attention (llama); None = one group per head
    ffn_hidden_size: Optional[int] = None  # None: 4*hidden (gpt2), or Llama's 8/3*hidden rounded up to 64
    seq_length: int = 256  # context length (max position embeddings)
    vocab_size: Optional[int] = None  # None: take it from the tokenizer
    make_vocab_size_divisible_by: int = 128  # the embedding is padded to a multiple of this times TP
    hidden_dropout: float = 0.0  # residual dropout (InstructGPT SFT used 0.2)
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    untie_embeddings_and_output_weights: Optional[bool] = None  # None: tied for gpt2, untied for llama
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    fp8: Optional[str] = None  # None | "hybrid" (E4M3 forward, E5M2 backward) | "e4m3"; needs Transformer Engine
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    transformer_impl: str = "auto"  # auto (TE on GPU when installed) | local | transformer_engine
    recompute_granularity: Optional[str] = None  # None | selective | full
    recompute_num_layers: int = 1  # with full recompute: layers per checkpointed chunk
    tokenizer: str = ""  # SentencePiece .model, Hugging Face tokenizer.json or a folder holding either (or a checkpoint)
    init_from: str = ""  # a checkpoint to start from (weights); its meta.json fills the architecture keys and tokenizer
    # Architecture details of imported open models (tools/convert_from_hf.py sets them):
    family: str = ""  # Hugging Face family for export: "" (from flavour) | llama | mistral | qwen2 | qwen3 | gpt2
    head_dim: Optional[int] = None  # attention head size; None: hidden_size / num_attention_heads
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    qk_layernorm: bool = False  # RMSNorm on each head's q and k before RoPE (Qwen3)
    rope_scaling: Optional[str] = None  # None | "llama3" (Llama-3.1+ frequency-dependent RoPE scaling)
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    sliding_window: Optional[int] = None  # Mistral: the model's attention window; seq_length may not exceed it
    gelu_approximation: str = "none"  # GPT-2: "none" (exact erf GELU) | "tanh" (HF gelu_new, the original GPT-2's)

    def validate(self) -> None:
        _one_of("model.flavour", self.flavour, ("gpt2", "llama"))
        _one_of("model.precision", self.precision, ("auto", "fp32", "bf16"))
        _one_of("model.fp8", self.fp8, (None, "hybrid", "e4m3"))
        _one_of("model.transformer_impl", self.transformer_impl, ("auto", "local", "transformer_engine"))
        _one_of("model.recompute_granularity", self.recompute_granularity, (None, "selective", "full"))
        _one_of("model.family", self.family, ("", "llama", "mistral", "qwen2", "qwen3", "gpt2"))
        _one_of("model.rope_scaling", self.rope_scaling, (None, "llama3"))
        _one_of("model.gelu_approximation", self.gelu_approximation, ("none", "tanh"))
        if self.gelu_approximation != "none" and self.flavour != "gpt2":
            raise ConfigError("model.gelu_approximation applies to model.flavour=gpt2 (Llama-style models use SwiGLU)")
        llama_only = [k for k in ("qkv_bias", "qk_layernorm", "rope_scaling", "sliding_window") if getattr(self, k)]
        if self.flavour != "llama" and llama_only:
            raise ConfigError(f"model.{llama_only[0]} needs model.flavour=llama (RoPE, RMSNorm); this model is {self.flavour!r}")
        if self.family and (self.family == "gpt2") != (self.flavour == "gpt2"):
            raise ConfigError(f"model.family={self.family!r} does not fit model.flavour={self.flavour!r}")
        if self.head_dim is not None:
            _positive("model.head_dim", self.head_dim)
        if self.rope_scaling == "llama3":
            if self.rope_scaling_factor <= 0 or self.rope_high_freq_factor <= self.rope_low_freq_factor or self.rope_low_freq_factor <= 0:
                raise ConfigError(
                    f"model.rope_scaling=llama3 needs rope_scaling_factor > 0 and 0 < rope_low_freq_factor "
                    f"({self.rope_low_freq_factor}) < rope_high_freq_factor ({self.rope_high_freq_factor})"
                )
            _positive("model.rope_original_max_position_embeddings", self.rope_original_max_position_embeddings)
        if self.sliding_window is not None and self.seq_length > self.sliding_window:
            raise ConfigError(
                f"model.seq_length={self.seq_length} exceeds this model's sliding attention window "
                f"model.sliding_window={self.sliding_window}: our attention is full causal, which equals the "
                f"sliding window only up to {self.sliding_window} tokens. Set model.seq_length <= {self.sliding_window}"
            )
        _positive("model.num_layers", self.num_layers)
        _positive("model.hidden_size", self.hidden_size)
        _positive("model.num_attention_heads", self.num_attention_heads)
        _positive("model.seq_length", self.seq_length)
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={groups}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name}={value} must be in [0, 1)")


# The model keys that describe the network's shape: a checkpoint fixes them (meta.json "model").
ARCHITECTURE_FIELDS = (
    "flavour", "family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
    "ffn_hidden_size", "norm_epsilon", "rotary_base", "untie_embeddings_and_output_weights", "make_vocab_size_divisible_by",
    "qkv_bias", "qk_layernorm", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
    "rope_original_max_position_embeddings", "sliding_window", "gelu_approximation",
)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False  # GPU + Transformer Engine only
    use_distributed_optimizer: bool = False  # GPU only: shards optimizer state over data-parallel ranks
    overlap_grad_reduce: bool = False  # GPU only: overlap the data-parallel all-reduce with backward
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo

    def validate(self) -> None:
        _positive("parallel.tensor_model_parallel_size", self.tensor_model_parallel_size)
        _positive("parallel.pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        _one_of("parallel.backend", self.backend, ("auto", "nccl", "gloo"))


@dataclass(frozen=True)
class TrainConfig:
    """The optimizer, its schedule and the step loop."""

    lr: float = 1e-4
    min_lr: float = 0.0  # cosine decay ends here
    lr_warmup_steps: int = 0
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip; 0 disables
    global_batch_size: int = 8  # sequences (SFT), prompts (RM) or episodes (PPO) per optimizer step
    micro_batch_size: int = 2  # per data-parallel rank per forward
    epochs: int = 1
    max_steps: Optional[int] = None  # the run's length in steps for every recipe (data repeats as needed); None: epochs x steps per epoch
    eval_interval: int = 50  # steps between evaluations (0: only at the end)
    eval_max_batches: Optional[int] = None  # evaluate the first N x micro_batch_size examples (any layout); None: all
    save_interval: int = 0  # steps between checkpoints (0: only at the end)
    # model selection: checkpoint each evaluation that improves the validation metric and
    # point checkpoints/best at it (later stages can start from <run>/checkpoints/best)
    select_best: bool = True
    keep_last: int = 0  # keep only this many newest checkpoints (0: all); "best" is always kept
    # Start from step 0 although output_dir holds checkpoints (they are set aside, not
    # deleted). Without it a run resumes from the newest complete checkpoint, and refuses to
    # start over on top of checkpoint folders none of which is usable.
    restart: bool = False
    log_interval: int = 1
    seed: int = 1234
    tensorboard: bool = True
    progress_bar: bool = True
    # the divergence guard: this many consecutive steps with non-finite loss or gradients
    # stop the run (exit 3) without saving
    max_nonfinite_steps: int = 3

    def validate(self) -> None:
        _positive("train.max_nonfinite_steps", self.max_nonfinite_steps)
        _positive("train.log_interval", self.log_interval)
        if self.eval_interval < 0 or self.save_interval < 0 or self.keep_last < 0:
            raise ConfigError("train.eval_interval, train.save_interval and train.keep_last must be >= 0 (0: at the end only / keep all)")
        _one_of("train.lr_decay_style", self.lr_decay_style, ("cosine", "linear", "constant"))
        _positive("train.global_batch_size", self.global_batch_size)
        _positive("train.micro_batch_size", self.micro_batch_size)
        _positive("train.epochs", self.epochs)
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps={self.max_steps} must be >= 1 (or null)")
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= train.min_lr ({self.min_lr}) <= train.lr ({self.lr})")


@dataclass(frozen=True)
class DataConfig:
    train_path: str = ""
    valid_path: str = ""  # empty: hold out data.valid_fraction of train_path
    valid_fraction: float = 0.0
    # What to do with an example longer than model.seq_length:
    #   prompt_left: drop the oldest prompt tokens (then the response's tail if it alone is too long)
    #   drop: skip the example (counted and reported); error: stop with the file and line
    truncation: str = "prompt_left"
    shuffle: bool = True
    # Pack several examples into each micro-batch (SFT, RM, PPO's pretraining batches): no
    # compute on padding between them; attention stays inside each sequence (data/packing.py).
    # train.micro_batch_size then sets a micro-batch's token budget (x model.seq_length).
    packing: bool = False

    def validate(self) -> None:
        _one_of("data.truncation", self.truncation, ("prompt_left", "drop", "error"))
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"data.valid_fraction={self.valid_fraction} must be in [0, 1)")


@dataclass(frozen=True)
class RMConfig:
    demonstrations_path: str = ""  # SFT demonstrations whose mean reward the bias sets to 0
    normalize: bool = True
    # Reward centering (Eisenstein et al., 2023; TRL's center_rewards_coefficient): adds
    # center_coef * mean over a prompt's responses of r^2 to its loss. Eq. 1 sees only
    # differences within a prompt, so each prompt's reward level drifts freely; a small
    # coefficient keeps levels comparable across prompts (less noise for PPO's critic).
    # 0 is the paper's loss.
    center_coef: float = 0.0

    def validate(self) -> None:
        if self.center_coef < 0:
            raise ConfigError(f"rm.center_coef={self.center_coef} must be >= 0 (0 = InstructGPT's eq. 1 alone)")


@dataclass(frozen=True)
class PPOConfig:
    """PPO-ptx (InstructGPT eq. 2). Defaults are the paper's where it gives one."""

    prompts_path: str = ""
    pretrain_path: str = ""  # pretraining text (JSONL {"text": ...}) for the ptx term
    reward_model: str = ""  # RM checkpoint; the critic starts from it too
    kl_coef: float = 0.02  # beta
    kl_estimator: str = "k1"  # k1 | k2 | k3
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    ptx_coef: float = 27.8  # gamma
    ptx_ratio: float = 8.0  # pretraining sequences per episode
    entropy_coef: float = 0.0
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    gamma: float = 1.0  # discount; the paper uses none
    lam: float = 0.95
    whiten_advantages: bool = True
    mini_batch_size: int = 64  # episodes per optimizer step inside a rollout batch
    ppo_epochs: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    critic_lr: float = 9e-6
    # Iterations at the start in which only the critic trains: it starts from the RM, whose
    # values mid-response are not yet value estimates, and its early errors would steer the
    # actor through the advantages (NeMo-Aligner's critic_warmup_steps). 0 = the paper.
    critic_warmup_steps: int = 0
    offload_frozen: bool = False  # move reference and RM to CPU memory outside the scoring phase
    # continuous batching: rows generated at once; a finished response's slot takes the next
    # prompt (0: all of this rank's prompts at once)
    rollout_slots: int = 0
    # slot groups in flight through the pipeline stages during a rollout (0: one per stage when
    # a rank has >= 512 slots, where a decode step is bound by compute, else 1: the batch walks
    # through the stages in turn; measured on CPU at PP=2, 16 slots: 1 group 1.78x the old
    # engine, 2 groups 1.33x, as every group re-reads each stage's weights)
    rollout_micro_batches: int = 0
    # builtin: our engine (rollout/engine.py; any device). dynamic: Megatron-Core's
    # DynamicInferenceEngine (rollout/dynamic.py; CUDA, flash-attn and bf16 weights only)
    rollout_engine: str = "builtin"  # builtin | dynamic
    # Critic-free RL. gae: PPO's critic (InstructGPT). grpo: group-normalised rewards of the
    # samples_per_prompt responses to a prompt (Shao et al. 2024); rloo: leave-one-out baseline
    # (Ahmadian et al. 2024). Neither builds, trains or saves a critic.
    advantage_estimator: str = "gae"  # gae | grpo | rloo
    samples_per_prompt: int = 1  # responses sampled per prompt in a rollout (>= 2 for grpo/rloo)
    grpo_scale_by_std: bool = True  # grpo: divide by the group's std (false: Dr. GRPO, centring only)
    # Where the KL to the reference goes: true, -kl_coef x KL in the reward (InstructGPT eq. 2);
    # false, +kl_coef x KL as a loss term of the policy update (GRPO; needs kl_estimator k3 or k2).
    kl_in_reward: bool = True
    # A rule-based reward "path/to/file.py:function", called as function(prompt, response, record)
    # -> float with the prompt's JSONL line as record; instead of, or added to, ppo.reward_model.
    reward_fn: str = ""

    def validate(self) -> None:
        _one_of("ppo.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        _one_of("ppo.advantage_estimator", self.advantage_estimator, ("gae", "grpo", "rloo"))
        _one_of("ppo.rollout_engine", self.rollout_engine, ("builtin", "dynamic"))
        _positive("ppo.samples_per_prompt", self.samples_per_prompt)
        if self.advantage_estimator != "gae" and self.samples_per_prompt < 2:
            raise ConfigError(
                f"ppo.advantage_estimator={self.advantage_estimator} compares the responses to the same prompt, "
                f"but ppo.samples_per_prompt={self.samples_per_prompt}; set ppo.samples_per_prompt to 2 or more "
                "(GRPO uses 4-64), or ppo.advantage_estimator=gae"
            )
        if self.advantage_estimator != "gae" and self.critic_warmup_steps:
            raise ConfigError(
                f"ppo.critic_warmup_steps={self.critic_warmup_steps} warms up a critic, but "
                f"ppo.advantage_estimator={self.advantage_estimator} has none; set ppo.critic_warmup_steps=0"
            )
        if not self.kl_in_reward and self.kl_estimator == "k1":
            raise ConfigError(
                "ppo.kl_in_reward=false makes the KL a loss term, where the k1 estimator's gradient is zero in "
                "expectation; set ppo.kl_estimator=k3 (GRPO's choice) or k2, or ppo.kl_in_reward=true"
            )
        if self.reward_fn:
            path, sep, name = self.reward_fn.rpartition(":")
            if not sep or not path or not name.isidentifier():
                raise ConfigError(
                    f"ppo.reward_fn={self.reward_fn!r} must be 'path/to/file.py:function_name', "
                    "e.g. examples/tiny/reward_fn.py:reward"
                )
        _positive("ppo.mini_batch_size", self.mini_batch_size)
        if self.rollout_micro_batches < 0:
            raise ConfigError(f"ppo.rollout_micro_batches={self.rollout_micro_batches} must be >= 0 (0: one group per pipeline stage from 512 slots, else 1)")
        if self.rollout_slots < 0:
            raise ConfigError(f"ppo.rollout_slots={self.rollout_slots} must be >= 0 (0: every prompt of the rank at once)")
        _positive("ppo.ppo_epochs", self.ppo_epochs)
        _positive("ppo.max_new_tokens", self.max_new_tokens)
        if self.critic_warmup_steps < 0:
            raise ConfigError(f"ppo.critic_warmup_steps={self.critic_warmup_steps} must be >= 0")
        if self.temperature < 0:
            raise ConfigError(f"ppo.temperature={self.temperature} must be >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"ppo.top_p={self.top_p} must be in (0, 1]")


@dataclass(frozen=True)
class DPOConfig:
    """DPO (Rafailov et al., 2023) on the RM's comparison data, against a frozen copy of the SFT policy."""

    beta: float = 0.1  # the implicit reward's scale: beta * log(pi / pi_ref)
    # pairwise: every untied pair of a K-way ranking, each prompt's pairs averaged (InstructGPT's
    # weighting); plackett_luce: the likelihood of the whole ranking (DPO appendix A.3)
    loss: str = "pairwise"
    # The pretraining mix (InstructGPT's ptx term, as in PPO): the step adds ptx_coef x the mean
    # next-token NLL of pretraining sequences, so the policy keeps its language modelling while
    # it learns the rankings.
    pretrain_path: str = ""  # pretraining text (JSONL {"text": ...}); empty: no mix
    ptx_coef: float = 0.0  # gamma; 0 = off (with a pretrain_path the NLL is still measured and logged)
    # Pretraining sequences per PROMPT of the global batch. 1.0: a DPO prompt already costs K
    # forwards of the policy (K >= 2 responses) plus the reference's, so one pretraining sequence
    # per prompt adds at most about half of the step's compute; ptx_coef sets the weight. PPO's 8
    # per episode (ppo.ptx_ratio, InstructGPT) is cheap beside PPO's rollouts, not beside DPO's step.
    ptx_ratio: float = 1.0

    def validate(self) -> None:
        _one_of("dpo.loss", self.loss, ("pairwise", "plackett_luce"))
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta={self.beta} must be > 0 (the DPO paper uses 0.1; a larger beta keeps the policy closer to the reference)")
        if not self.ptx_coef >= 0:
            raise ConfigError(f"dpo.ptx_coef={self.ptx_coef} must be >= 0 (0 = no pretraining term)")
        if not self.ptx_ratio >= 0:
            raise ConfigError(f"dpo.ptx_ratio={self.ptx_ratio} must be >= 0 (pretraining sequences per prompt of the global batch)")
        if self.ptx_coef > 0 and not self.pretrain_path:
            raise ConfigError(
                f"dpo.ptx_coef={self.ptx_coef} needs pretraining text, but dpo.pretrain_path is empty: set "
                "dpo.pretrain_path=<JSONL of {\"text\": ...}> (e.g. examples/tiny/data/pretrain.jsonl), or dpo.ptx_coef=0"
            )
        if self.pretrain_path and self.ptx_ratio == 0:
            raise ConfigError(
                f"dpo.pretrain_path={self.pretrain_path} is set but dpo.ptx_ratio=0 mixes none of it into a step: set "
                "dpo.ptx_ratio > 0 (e.g. 1.0, one pretraining sequence per prompt), or dpo.pretrain_path= to train without it"
            )


@dataclass(frozen=True)
class Config:
    stage: str = "sft"
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def validate(self) -> None:
        _one_of("stage", self.stage, ("sft", "rm", "ppo", "dpo"))
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _one_of(key, value, allowed):
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed if a is not None], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(repr(a) for a in allowed)}{hint}")


def _positive(key, value):
    if value is None or value < 1:
        raise ConfigError(f"{key}={value} must be a positive integer")
