"""Checkpoint conversion between Hugging Face ``transformers`` and megatron-rlhf.

    from megatron_rlhf.convert import convert_from_hf, convert_to_hf
    convert_from_hf("hf/Qwen2.5-0.5B", "ckpt/qwen")            # -> model.init_from=ckpt/qwen
    convert_from_hf("hf/some-reward-model", "ckpt/rm")         # ...ForSequenceClassification -> ppo.reward_model=ckpt/rm
    convert_to_hf("runs/sft/checkpoints/best", "hf/sft-out")   # -> AutoModelForCausalLM.from_pretrained

Families: Llama (incl. Llama-3.x ``llama3`` RoPE scaling), Mistral, Qwen2/Qwen2.5, Qwen3,
GPT-2; causal LMs as policies, ``...ForSequenceClassification`` (num_labels=1) as reward
models. Tokenizers travel with the model (SentencePiece ``tokenizer.model`` or Hugging Face
``tokenizer.json``, see :mod:`megatron_rlhf.data.tokenizer`).

Command lines: ``tools/convert_from_hf.py`` and ``tools/convert_to_hf.py``. Modules:
:mod:`.layout` (names and tensor layouts), :mod:`.dist_reader` (layer-by-layer reads of our
dist checkpoints), :mod:`.safetensors_io` (streamed safetensors), :mod:`.hf_tokenizer`
(our SentencePiece models -> ``tokenizer.json``), :mod:`.from_hf`, :mod:`.to_hf`.
"""

from megatron_rlhf.convert.common import ConversionError
from megatron_rlhf.convert.from_hf import convert_from_hf, model_config_from_hf
from megatron_rlhf.convert.to_hf import convert_to_hf

__all__ = ["ConversionError", "convert_from_hf", "convert_to_hf", "model_config_from_hf"]
