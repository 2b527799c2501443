"""model.init_from fills the model section from the checkpoint's meta.json; a key the user
set that disagrees is an error naming both values."""

from __future__ import annotations

import json

import pytest

from megatron_rlhf.config import ARCHITECTURE_FIELDS, ConfigError, ModelConfig, load_config

SAVED = {
    "flavour": "llama", "family": "qwen2", "num_layers": 3, "hidden_size": 96, "num_attention_heads": 6, "num_query_groups": 2,
    "head_dim": None, "ffn_hidden_size": 160, "seq_length": 512, "norm_epsilon": 1e-6, "rotary_base": 1e6,
    "untie_embeddings_and_output_weights": False, "qkv_bias": True, "rope_scaling": None, "precision": "bf16",
    "hidden_dropout": 0.3, "tokenizer": "/elsewhere/tok.model",
}


@pytest.fixture
def ckpt(tmp_path):
    it = tmp_path / "conv" / "iter_0000000"
    it.mkdir(parents=True)
    (it / "meta.json").write_text(json.dumps({"kind": "policy", "model": SAVED, "vocab_size": 448}))
    (tmp_path / "conv" / "latest").write_text("iter_0000000\n")
    return tmp_path / "conv"


def _yaml(tmp_path, text):
    p = tmp_path / "sft.yaml"
    p.write_text(text)
    return str(p)


def test_fills_architecture_sizes_and_tokenizer(ckpt, tmp_path):
    cfg = load_config(None, [f"model.init_from={ckpt}"], stage="sft")
    m = cfg.model
    assert (m.flavour, m.family, m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups) == ("llama", "qwen2", 3, 96, 6, 2)
    assert (m.ffn_hidden_size, m.seq_length, m.norm_epsilon, m.rotary_base, m.qkv_bias) == (160, 512, 1e-6, 1e6, True)
    assert m.untie_embeddings_and_output_weights is False
    assert m.tokenizer == str(ckpt / "iter_0000000")  # the checkpoint carries its tokenizer
    assert (m.precision, m.hidden_dropout) == (ModelConfig().precision, ModelConfig().hidden_dropout)  # training knobs stay the user's
    assert "flavour" in ARCHITECTURE_FIELDS and "precision" not in ARCHITECTURE_FIELDS


def test_agreeing_keys_shorter_context_and_own_tokenizer_are_fine(ckpt, tmp_path):
    path = _yaml(tmp_path, f"model:\n  init_from: {ckpt}\n  num_layers: 3\n  tokenizer: my.model\n")
    cfg = load_config(path, ["model.seq_length=128"], stage="sft")
    assert (cfg.model.num_layers, cfg.model.seq_length, cfg.model.tokenizer) == (3, 128, "my.model")  # RoPE: any context


def test_conflicting_keys_name_both_values(ckpt, tmp_path):
    path = _yaml(tmp_path, f"model:\n  init_from: {ckpt}\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match=r"model.hidden_size=64 \(.*sft.yaml\) but the checkpoint has 96.*Remove these keys"):
        load_config(path, [], stage="sft")
    with pytest.raises(ConfigError, match=r"model.flavour='gpt2' \(command line\) but the checkpoint has 'llama'"):
        load_config(None, [f"model.init_from={ckpt}", "model.flavour=gpt2"], stage="sft")
    with pytest.raises(ConfigError, match=r"model.vocab_size=512 .* but the checkpoint has 448"):
        load_config(None, [f"model.init_from={ckpt}", "model.vocab_size=512"], stage="sft")


def test_gpt2_learned_positions_fix_the_context(tmp_path):
    it = tmp_path / "g"
    it.mkdir()
    (it / "meta.json").write_text(json.dumps({"model": {"flavour": "gpt2", "seq_length": 64}, "vocab_size": 400}))
    assert load_config(None, [f"model.init_from={it}"]).model.seq_length == 64
    with pytest.raises(ConfigError, match=r"model.seq_length=128 \(command line\) but the checkpoint has 64"):
        load_config(None, [f"model.init_from={it}", "model.seq_length=128"])


def test_no_checkpoint_yet_changes_nothing(tmp_path):
    """Example configs name checkpoints of earlier runs; reading them must not need those runs
    (the recipe that loads the checkpoint reports a missing one)."""
    for path in (tmp_path / "nope", tmp_path):
        cfg = load_config(None, [f"model.init_from={path}", "model.num_layers=5"])
        assert (cfg.model.num_layers, cfg.model.flavour, cfg.model.tokenizer) == (5, "gpt2", "")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ConfigError, match="meta.json is not valid JSON"):
        load_config(None, [f"model.init_from={tmp_path}"])
