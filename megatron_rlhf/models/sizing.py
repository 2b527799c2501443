"""The model's sizing rules, in one place and free of torch: the builder builds with them,
the memory planner (``memory_plan.py``) and the converters count with them."""

from __future__ import annotations

import math

from megatron_rlhf.config import ConfigError, ModelConfig


def padded_vocab_size(vocab_size: int, model: ModelConfig, tp: int = 1) -> int:
    """Pad the vocabulary to a multiple of ``make_vocab_size_divisible_by``.

    Unlike Megatron-LM we do not multiply by TP: the padded size then does not depend on
    the layout, so a checkpoint saved at TP=2 loads at TP=1 (and vice versa) unchanged.
    """
    multiple = model.make_vocab_size_divisible_by
    if multiple % tp:
        raise ConfigError(
            f"model.make_vocab_size_divisible_by={multiple} must be a multiple of "
            f"parallel.tensor_model_parallel_size={tp}"
        )
    return int(math.ceil(vocab_size / multiple) * multiple)


def ffn_hidden_size(model: ModelConfig) -> int:
    """``model.ffn_hidden_size``, else 4 x hidden (GPT-2) or Llama's 8/3 x hidden rounded up to 64."""
    if model.ffn_hidden_size:
        return model.ffn_hidden_size
    if model.flavour == "llama":
        return int(math.ceil(8 * model.hidden_size / 3 / 64) * 64)
    return 4 * model.hidden_size


def tied_embeddings(model: ModelConfig) -> bool:
    """Whether the output layer shares the word embedding: the config's choice, else GPT-2 ties
    and Llama does not."""
    untie = model.untie_embeddings_and_output_weights
    return (not untie) if untie is not None else model.flavour == "gpt2"
