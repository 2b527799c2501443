"""Shared pieces of both conversion directions."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional

from megatron_rlhf.config import ModelConfig
from megatron_rlhf.convert.layout import Arch
from megatron_rlhf.models.builder import ffn_hidden_size
from megatron_rlhf.checkpoint import CheckpointError


class ConversionError(CheckpointError):
    """Input that cannot be converted (unsupported architecture, mismatched vocabulary,
    partial checkpoint...); the message names the problem and the way out."""


def arch_of(model: ModelConfig, vocab: int, padded_vocab: int, head: str = "lm") -> Arch:
    untie = model.untie_embeddings_and_output_weights
    tied = (not untie) if untie is not None else model.flavour == "gpt2"
    return Arch(
        flavour=model.flavour,
        num_layers=model.num_layers,
        hidden=model.hidden_size,
        heads=model.num_attention_heads,
        groups=model.num_query_groups or model.num_attention_heads,
        ffn=ffn_hidden_size(model),
        vocab=vocab,
        padded_vocab=padded_vocab,
        seq_length=model.seq_length,
        tied=tied and head == "lm",
        head=head,
        kv_channels=model.head_dim or 0,
        qkv_bias=model.qkv_bias,
        qk_norm=model.qk_layernorm,
    )


def family_of(model: ModelConfig) -> str:
    """The Hugging Face family a model exports as (``model.family``, else from the flavour)."""
    return model.family or ("gpt2" if model.flavour == "gpt2" else "llama")


def model_config_from_meta(meta: dict) -> ModelConfig:
    saved = dict(meta.get("model") or {})
    if not saved:
        raise ConversionError("meta.json has no 'model' section: not a megatron-rlhf checkpoint, or a very old one")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConversionError(f"output folder {out_dir} is not empty; choose another or pass --overwrite")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def read_json(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what}: {path} not found")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConversionError(f"{what}: {path} is not valid JSON ({exc})") from None


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: Optional[str]):
    import torch

    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ConversionError(f"dtype {name!r}: use float32, bfloat16 or float16")
    return table[name]
