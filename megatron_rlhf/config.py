"""Typed configuration: frozen dataclasses, YAML files and ``key=value`` overrides.

Every default lives here, every field is validated here, and nothing changes a config
after it is built. Names follow Megatron-LM where it has one
(``parallel.tensor_model_parallel_size``, ``train.max_steps``, ``output_dir``).

    cfg = load_config("examples/tiny/sft.yaml", ["train.lr=3e-4"], stage="sft")

An unknown or mistyped key fails with the key, where it came from, and the closest names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml


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
    tokenizer: str = ""  # SentencePiece model file
    init_from: str = ""  # a checkpoint directory to start from (weights only)

    def validate(self) -> None:
        _one_of("model.flavour", self.flavour, ("gpt2", "llama"))
        _one_of("model.precision", self.precision, ("auto", "fp32", "bf16"))
        _one_of("model.fp8", self.fp8, (None, "hybrid", "e4m3"))
        _one_of("model.transformer_impl", self.transformer_impl, ("auto", "local", "transformer_engine"))
        _one_of("model.recompute_granularity", self.recompute_granularity, (None, "selective", "full"))
        _positive("model.num_layers", self.num_layers)
        _positive("model.hidden_size", self.hidden_size)
        _positive("model.num_attention_heads", self.num_attention_heads)
        _positive("model.seq_length", self.seq_length)
        if self.hidden_size % self.num_attention_heads:
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

    def validate(self) -> None:
        _one_of("ppo.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        _positive("ppo.mini_batch_size", self.mini_batch_size)
        _positive("ppo.ppo_epochs", self.ppo_epochs)
        _positive("ppo.max_new_tokens", self.max_new_tokens)
        if self.critic_warmup_steps < 0:
            raise ConfigError(f"ppo.critic_warmup_steps={self.critic_warmup_steps} must be >= 0")
        if self.temperature < 0:
            raise ConfigError(f"ppo.temperature={self.temperature} must be >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"ppo.top_p={self.top_p} must be in (0, 1]")


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

    def validate(self) -> None:
        _one_of("stage", self.stage, ("sft", "rm", "ppo"))
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def load_config(path: Optional[str], overrides: list[str] = (), stage: Optional[str] = None) -> Config:
    """Build a validated Config from a YAML file (optional) and ``key=value`` overrides."""
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    source = path or "defaults"
    cfg = _build(Config, raw, prefix="", source=source)
    for item in overrides:
        cfg = apply_override(cfg, item)
    if stage is not None:
        if path and "stage" in raw and raw["stage"] != stage:
            raise ConfigError(f"{path} is a '{raw['stage']}' config, but the command is '{stage}'")
        cfg = dataclasses.replace(cfg, stage=stage)
    cfg.validate()
    return cfg


def apply_override(cfg: Config, item: str) -> Config:
    """Apply one ``section.key=value`` override (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=3e-4)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    return _set_path(cfg, parts, value, key, source="command line")


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(raw: dict, source: str) -> Config:
    cfg = _build(Config, raw, prefix="", source=source)
    cfg.validate()
    return cfg


def _set_path(obj, parts, value, full_key, source):
    name = parts[0]
    known = {f.name: f for f in fields(obj)}
    if name not in known:
        _unknown_key(full_key, name, known, obj, source)
    current = getattr(obj, name)
    if len(parts) == 1:
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{full_key}' is a section; set one of its keys, e.g. {full_key}.{fields(current)[0].name}=...")
            new = _build(type(current), value, prefix=full_key + ".", source=source, base=current)
        else:
            new = _coerce(value, _field_type(type(obj), name), full_key, source)
        return dataclasses.replace(obj, **{name: new})
    if not dataclasses.is_dataclass(current):
        raise ConfigError(f"{source}: '{'.'.join(parts[:1])}' in '{full_key}' is not a section")
    return dataclasses.replace(obj, **{name: _set_path(current, parts[1:], value, full_key, source)})


def _build(cls, raw: dict, prefix: str, source: str, base=None):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    obj = base if base is not None else cls()
    known = {f.name: f for f in fields(cls)}
    updates = {}
    for key, value in raw.items():
        if key not in known:
            _unknown_key(prefix + str(key), str(key), known, obj, source)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            updates[key] = _build(type(current), value or {}, prefix + key + ".", source, base=current)
        else:
            updates[key] = _coerce(value, _field_type(cls, key), prefix + key, source)
    return dataclasses.replace(obj, **updates)


# Names users bring from other trainers (Hugging Face, NeMo, Megatron-LM flags).
_ALIASES = {
    "learning_rate": "lr", "max_lr": "lr", "train_iters": "max_steps", "max_iters": "max_steps",
    "num_train_epochs": "epochs", "batch_size": "global_batch_size", "grad_clip": "clip_grad",
    "max_grad_norm": "clip_grad", "warmup_steps": "lr_warmup_steps", "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size", "tensor_parallel_size": "tensor_model_parallel_size",
    "pipeline_parallel_size": "pipeline_model_parallel_size", "max_seq_len": "seq_length",
    "max_position_embeddings": "seq_length", "num_heads": "num_attention_heads", "n_layer": "num_layers",
    "dropout": "hidden_dropout", "beta": "kl_coef", "init_kl_coef": "kl_coef", "ptx_loss_coef": "ptx_coef",
}


def _unknown_key(full_key, name, known, obj, source):
    candidates = list(known)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if _ALIASES.get(name) in candidates:
        close = [_ALIASES[name]] + [c for c in close if c != _ALIASES[name]]
    # also look one level down, for a key put in the wrong section (e.g. model.lr)
    elsewhere = []
    for fname in candidates:
        sub = getattr(obj, fname)
        if dataclasses.is_dataclass(sub):
            elsewhere += [f"{fname}.{m}" for m in difflib.get_close_matches(name, [f.name for f in fields(sub)], n=2, cutoff=0.8)]
    section = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
    hints = [section + c for c in close] + elsewhere
    hint = f"; did you mean {', '.join(repr(h) for h in hints)}?" if hints else f"; valid keys here: {', '.join(candidates)}"
    raise ConfigError(f"{source}: unknown config key '{full_key}'{hint}")


def _field_type(cls, name):
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, annotation, key: str, source: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    number = float(value)  # YAML reads 3e-4 (no dot) as a string
                except ValueError:
                    number = None
                if number is not None and math.isfinite(number):
                    return number
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if value is None:
            return None
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return str(value)
    return value


def _one_of(key, value, allowed):
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed if a is not None], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(repr(a) for a in allowed)}{hint}")


def _positive(key, value):
    if value is None or value < 1:
        raise ConfigError(f"{key}={value} must be a positive integer")
