"""Tiny Hugging Face tokenizer folders for tests, built with ``tokenizers`` (nothing downloaded).

    folder = write_hf_tokenizer(tmp_path / "tok", "qwen2")   # tokenizer.json + tokenizer_config.json

Styles, after the real families' conventions:

* ``gpt2``: byte-level BPE, ``<|endoftext|>`` is bos = eos = unk, no bos added, no template;
* ``llama3``: byte-level BPE whose post-processor adds ``<|begin_of_text|>``, eos ``<|eot_id|>``,
  a Llama-3-style chat template (it writes the bos itself);
* ``qwen2``: byte-level BPE, no bos, eos ``<|im_end|>``, pad ``<|endoftext|>``, ChatML template.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = {
    "gpt2": ["<|endoftext|>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def corpus(lines: int = 400):
    texts = []
    for line in (ROOT / "examples/tiny/data/sft_train.jsonl").read_text().splitlines()[:lines]:
        texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    return texts


def build_backend(style: str, vocab_size: int = 400):
    """A trained ``tokenizers.Tokenizer`` of the given style (specials first: ids 0..)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    if style == "qwen2":  # as Qwen's tokenizer.json (and transformers' Qwen2Tokenizer): NFC, one digit per token
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS[style], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(corpus(), trainer)
    if style == "llama3":
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                          special_tokens=[("<|begin_of_text|>", 0)]),
        ])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def write_hf_tokenizer(folder, style: str, vocab_size: int = 400) -> Path:
    """``save_pretrained`` of a ``PreTrainedTokenizerFast`` around :func:`build_backend`."""
    from transformers import PreTrainedTokenizerFast

    special = {
        "gpt2": dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
        "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE),
        "qwen2": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE),
    }[style]
    tok = PreTrainedTokenizerFast(tokenizer_object=build_backend(style, vocab_size), **special)
    folder = Path(folder)
    tok.save_pretrained(str(folder))
    return folder
