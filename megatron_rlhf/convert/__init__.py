"""Checkpoint conversion between Hugging Face ``transformers`` and megatron-rlhf.

    from megatron_rlhf.convert import convert_from_hf, convert_to_hf
    convert_from_hf("hf/llama-7b", "ckpt/llama-7b")          # -> model.init_from=ckpt/llama-7b
    convert_to_hf("runs/sft/checkpoints/best", "hf/sft-out")   # -> AutoModelForCausalLM.from_pretrained

Command lines: ``tools/convert_from_hf.py`` and ``tools/convert_to_hf.py``. Modules:
:mod:`.layout` (names and tensor layouts), :mod:`.dist_reader` (layer-by-layer reads of our
dist checkpoints), :mod:`.safetensors_io` (streamed safetensors), :mod:`.hf_tokenizer`
(SentencePiece -> ``tokenizer.json``), :mod:`.from_hf`, :mod:`.to_hf`.
"""

from megatron_rlhf.convert.common import ConversionError
from megatron_rlhf.convert.from_hf import convert_from_hf, model_config_from_hf
from megatron_rlhf.convert.to_hf import convert_to_hf

__all__ = ["ConversionError", "convert_from_hf", "convert_to_hf", "model_config_from_hf"]
