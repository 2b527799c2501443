"""The one reader of checkpoint metadata: what a checkpoint is, and how to load it.

``meta.json`` (written by :func:`checkpoint_meta` + ``io.save_checkpoint``) records the
checkpoint's ``kind`` (``policy``: an SFT or PPO actor; ``reward``: a reward model; PPO
checkpoints also hold the ``critic`` network), the model section it was trained with, the
tokenizer's vocabulary size and fingerprint, the layout and the networks it holds.
Every consumer goes through here: recipes check what they start from
(:func:`check_compatible`, :func:`check_kind`), commands and PPO build models from it
(:func:`load_policy`, :func:`load_reward_model`, :func:`model_config_from_meta`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from megatron_rlhf.checkpoint.io import KINDS, CheckpointError, check_kind, load_weights, read_meta, resolve_checkpoint
from megatron_rlhf.config import ARCHITECTURE_FIELDS, Config, ModelConfig, ParallelConfig
from megatron_rlhf.data import Tokenizer

TOKENIZER_FILE = "tokenizer.model"


def checkpoint_meta(cfg: Config, tokenizer: Tokenizer, kind: str, **extra) -> dict:
    """The ``meta.json`` of a checkpoint a recipe writes (``save_checkpoint`` adds iteration,
    layout and networks)."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind {kind!r} is not one of {KINDS}")
    return dict(
        kind=kind,
        stage=cfg.stage,
        model=dataclasses.asdict(cfg.model),
        vocab_size=tokenizer.vocab_size,
        tokenizer_fingerprint=tokenizer.fingerprint(),
        **extra,
    )


def policy_network(meta: dict) -> str:
    """The network holding the policy: ``actor`` in a PPO checkpoint, else ``model``."""
    return "actor" if "actor" in meta.get("networks", []) else "model"


def check_compatible(ckpt: Path, cfg: Config, tokenizer: Tokenizer, what: str = "model.init_from", model: Optional[ModelConfig] = None) -> dict:
    """Refuse a checkpoint of another tokenizer or architecture, naming the fix; return its meta."""
    meta = read_meta(ckpt)
    if meta.get("tokenizer_fingerprint") and meta["tokenizer_fingerprint"] != tokenizer.fingerprint():
        raise CheckpointError(
            f"tokenizer mismatch: {what}={ckpt} was trained with tokenizer {meta['tokenizer_fingerprint']} "
            f"(vocab {meta.get('vocab_size')}), this run uses {tokenizer.fingerprint()} (vocab {tokenizer.vocab_size}); "
            f"use the checkpoint's own tokenizer: model.tokenizer={ckpt / TOKENIZER_FILE}"
        )
    saved = meta.get("model", {})
    ours = dataclasses.asdict(model or cfg.model)
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {ours.get(k)!r}" for k in ARCHITECTURE_FIELDS if k in saved and saved.get(k) != ours.get(k)]
    if diffs:
        raise CheckpointError(f"{what}={ckpt} has another architecture: " + "; ".join(diffs) + ". Make the config's model section match the checkpoint")
    return meta


def model_config_from_meta(meta: dict, tokenizer_path: str = "", **overrides) -> ModelConfig:
    """The model section a checkpoint was trained with, for inference (no dropout, no init_from)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = {k: v for k, v in meta.get("model", {}).items() if k in known}
    fields = dict(tokenizer=tokenizer_path, init_from="", vocab_size=None, hidden_dropout=0.0, attention_dropout=0.0)
    fields.update(overrides)
    return dataclasses.replace(ModelConfig(**saved), **fields)


def with_architecture(model: ModelConfig, meta: dict) -> ModelConfig:
    """``model`` with the network shape (``ARCHITECTURE_FIELDS``) of the checkpoint ``meta`` describes:
    a critic built from a reward model of another size than the actor."""
    saved = meta.get("model", {})
    return dataclasses.replace(model, **{k: saved[k] for k in ARCHITECTURE_FIELDS if k in saved})


def load_tokenizer(ckpt: Path) -> Tokenizer:
    """The tokenizer a checkpoint carries."""
    path = Path(ckpt) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no {TOKENIZER_FILE}; it is not a complete checkpoint")
    return Tokenizer.load(path)


def _load(checkpoint, expected: str, what: str, parallel: ParallelConfig, model_cfg: Optional[ModelConfig], start_distributed: bool):
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed

    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    check_kind(ckpt, meta, expected, what)
    tokenizer = load_tokenizer(ckpt)
    model_cfg = model_cfg or model_config_from_meta(meta, str(ckpt / TOKENIZER_FILE))
    if start_distributed:
        init_distributed(parallel, model_cfg)
    model = build_model(model_cfg, parallel, tokenizer.vocab_size, scalar_head=expected == "reward", seed=0)
    load_weights(model, ckpt, policy_network(meta) if expected == "policy" else "model")
    return model, tokenizer, meta, ckpt


def load_policy(checkpoint, parallel: ParallelConfig = ParallelConfig(), what: str = "--checkpoint", model_cfg: Optional[ModelConfig] = None, start_distributed: bool = True):
    """``(model, tokenizer, meta, ckpt)`` for a policy checkpoint (SFT run or PPO actor) at this
    job's layout; ``model_cfg`` defaults to the checkpoint's own model section."""
    return _load(checkpoint, "policy", what, parallel, model_cfg, start_distributed)


def load_reward_model(checkpoint, parallel: ParallelConfig = ParallelConfig(), what: str = "--checkpoint", model_cfg: Optional[ModelConfig] = None, start_distributed: bool = True):
    """``(model, tokenizer, meta, ckpt)`` for a reward model at this job's layout."""
    return _load(checkpoint, "reward", what, parallel, model_cfg, start_distributed)
