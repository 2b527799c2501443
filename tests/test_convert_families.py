"""Today's open model families in and out, logit-exact: Llama-3.x (``llama3`` RoPE scaling with
all four parameters, a non-integer rope_theta), Qwen2/2.5 (q/k/v biases, tied embeddings, an
embedding larger than the tokenizer), Mistral (its own head size, a sliding window), Qwen3
(QK-norm) and GPT-2 (byte-level BPE tokenizer.json), each as a policy and as a reward model.

Random tiny models built with ``transformers`` (every weight randomised, norms and biases
included), with their own tokenizers (Hugging Face ``tokenizers``; SentencePiece for
Mistral). Our side runs in spawned gloo processes at TP=1, TP=2 and PP=2:

* fp32 logits vs transformers: max |diff| < 1e-5 at every layout;
* HF -> ours -> HF bitwise, for ...ForCausalLM and ...ForSequenceClassification;
* greedy generation gives the text transformers' greedy ``generate`` gives;
* imported reward models score like transformers (< 1e-5).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dist_utils import run_distributed, run_single  # noqa: E402
from hf_fixtures import write_hf_tokenizer  # noqa: E402
from test_convert import _assert_bitwise, _logits, _our_model, _randomise  # noqa: E402

from megatron_rlhf.convert import ConversionError, convert_from_hf, convert_to_hf  # noqa: E402
from megatron_rlhf.convert.hf_tokenizer import write_hf_tokenizer as write_sp_as_hf  # noqa: E402
from megatron_rlhf.data.tokenizer import HFTokenizer, Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ = 48
FAMILIES = ["llama3", "qwen2", "mistral", "qwen3", "gpt2"]
TOKENIZER = {"llama3": "llama3", "qwen2": "qwen2", "qwen3": "qwen2", "gpt2": "gpt2", "mistral": "sentencepiece"}
MODEL_VOCAB = {"qwen2": 448}  # Qwen pads its embedding past the tokenizer (151665 -> 151936)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 12345.5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
PROMPTS = ["List 3 fruits.", "Hi", "Write a short poem about the sea, please."]
GEN_TOKENS = 8
TOL = 1e-5


def _hf_config(family: str, vocab: int, tok: Tokenizer, num_labels=None):
    ids = dict(bos_token_id=tok.bos_id if tok.bos_id is not None else tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if num_labels:
        ids["num_labels"] = num_labels
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, activation_function="gelu", **ids)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=SEQ, rms_norm_eps=1e-5, **ids)
    if family == "llama3":
        return transformers.LlamaConfig(**common, rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**common, head_dim=32, sliding_window=64, tie_word_embeddings=False)
    return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)


def _hf_class(family: str, rm: bool):
    name = {"llama3": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3", "gpt2": "GPT2"}[family]
    if rm:
        return getattr(transformers, f"{name}ForSequenceClassification")
    return transformers.GPT2LMHeadModel if family == "gpt2" else getattr(transformers, f"{name}ForCausalLM")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    toks = {style: write_hf_tokenizer(root / f"tok_{style}", style) for style in ("llama3", "qwen2", "gpt2")}
    sp = root / "tok_sentencepiece"  # tokenizer.model + the tokenizer.json & config a Mistral folder ships
    sp.mkdir()
    write_sp_as_hf(Tokenizer.load(ROOT / "examples/tiny/tokenizer.model"), sp, SEQ)
    toks["sentencepiece"] = sp
    hf = {}
    for i, family in enumerate(FAMILIES):
        tok_dir = toks[TOKENIZER[family]]
        tok = Tokenizer.load(tok_dir)
        vocab = MODEL_VOCAB.get(family, tok.vocab_size)
        for rm in (False, True):
            torch.manual_seed(0)
            model = _hf_class(family, rm)(_hf_config(family, vocab, tok, num_labels=1 if rm else None))
            _randomise(model, seed=20 + i + 10 * rm)
            if getattr(model.config, "tie_word_embeddings", False) and not rm:
                model.tie_weights()
            d = root / f"hf_{family}{'_rm' if rm else ''}"
            model.eval().save_pretrained(d)
            for f in tok_dir.iterdir():
                shutil.copy(f, d / f.name)
            hf[(family, rm)] = d
    return {"root": root, "hf": hf}


def _prompt_ids(tok: Tokenizer):
    return [tok.bos_ids + tok.encode(p) for p in PROMPTS]


def _ids(vocab_tokens: int, seed: int, batch=3, length=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_tokens, (batch, length), generator=g)


def _rm_ids(tok: Tokenizer):
    """Unpadded rows without the pad id: HF's ...ForSequenceClassification then reads the last
    token, where our reward model is read too."""
    ids = _ids(getattr(tok, "num_tokens", tok.vocab_size), 2)
    ids[ids == tok.pad_id] = (tok.pad_id + 1) % tok.vocab_size
    return ids


def _worker_tp1(root, hf_dirs):
    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.models.generation import generate
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.training import checkpoint as ck

    init_distributed(ParallelConfig(), ModelConfig())
    out = {}
    for family in FAMILIES:
        res = {}
        ours = Path(root) / f"ours_{family}"
        convert_from_hf(hf_dirs[(family, False)], ours, progress=False)
        tok = Tokenizer.load(ours)
        net, cfg, meta = _our_model(ours)
        ck.load_weights(net, ck.resolve_checkpoint(ours))
        res["logits"] = _logits(net, _ids(tok.vocab_size, 1))
        gen = generate(net, _prompt_ids(tok), GEN_TOKENS, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0.0)
        res["generated"] = [list(map(int, s)) for s in gen.sequences]
        rm_dir = Path(root) / f"rm_{family}"
        convert_from_hf(hf_dirs[(family, True)], rm_dir, progress=False)
        rm, _, rm_meta = _our_model(rm_dir, scalar_head=True)
        ck.load_weights(rm, ck.resolve_checkpoint(rm_dir))
        ids = _rm_ids(tok)
        with torch.no_grad():
            res["rm_scores"] = rm.eval()(ids, torch.arange(ids.shape[1]).expand_as(ids), None)[:, -1, 0]
        res["rm_kind"] = rm_meta["kind"]
        out[family] = res
    return out


def _worker_parallel(root):
    """Logits of every converted policy at TP=2, then at PP=2 (on the last stage)."""
    from megatron.core import parallel_state

    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.models.generation import _stage_forward
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.training import checkpoint as ck

    init_distributed(ParallelConfig(tensor_model_parallel_size=2), ModelConfig(num_query_groups=2))
    out = {"tp2": {}, "pp2": {}}
    for layout in ("tp2", "pp2"):
        if layout == "pp2":
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2, create_gloo_process_groups=True)
        for family in FAMILIES:
            ours = Path(root) / f"ours_{family}"
            tok = Tokenizer.load(ours)
            net, _, _ = _our_model(ours, tp=2 if layout == "tp2" else 1, pp=2 if layout == "pp2" else 1)
            ck.load_weights(net, ck.resolve_checkpoint(ours))
            ids = _ids(tok.vocab_size, 1)
            if layout == "tp2":
                out[layout][family] = _logits(net, ids)
            else:
                with torch.no_grad():
                    logits = _stage_forward(net.eval(), net, ids, torch.arange(ids.shape[1]).expand_as(ids), None)
                out[layout][family] = None if logits is None else logits[..., : net.rlhf_vocab_size]
    return out


@pytest.fixture(scope="module")
def ours(work):
    return run_single(_worker_tp1, str(work["root"]), work["hf"])


@pytest.fixture(scope="module")
def parallel(work, ours):
    ranks = run_distributed(_worker_parallel, 2, str(work["root"]))
    return {"tp2": ranks[0]["tp2"], "pp2": ranks[1]["pp2"], "tp2_rank1": ranks[1]["tp2"]}


def _hf_model(path, rm=False):
    cls = transformers.AutoModelForSequenceClassification if rm else transformers.AutoModelForCausalLM
    return cls.from_pretrained(str(path), dtype=torch.float32).eval()


DIFFS = {}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_bitwise_round_trip(work, ours, family):
    tok = Tokenizer.load(work["root"] / f"ours_{family}")
    ids = _ids(tok.vocab_size, 1)
    with torch.no_grad():
        ref = _hf_model(work["hf"][(family, False)])(ids).logits
    got = ours[family]["logits"]
    assert got.shape == ref.shape == (3, 20, MODEL_VOCAB.get(family, tok.vocab_size))
    assert ref.abs().max() > 1.0
    diff = (got - ref).abs().max().item()
    print(f"{family}: TP=1 max |logit diff| {diff:.2e}")
    assert diff < TOL
    out = work["root"] / f"back_{family}"
    summary = convert_to_hf(work["root"] / f"ours_{family}", out, progress=False)
    assert summary["architecture"] == _hf_class(family, False).__name__
    _assert_bitwise(work["hf"][(family, False)], out)
    with torch.no_grad():
        assert torch.equal(_hf_model(out)(ids).logits, ref)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("Hello there").input_ids == tok.bos_ids + tok.encode("Hello there")


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_and_pp2_logits(work, parallel, family):
    tok = Tokenizer.load(work["root"] / f"ours_{family}")
    ids = _ids(tok.vocab_size, 1)
    with torch.no_grad():
        ref = _hf_model(work["hf"][(family, False)])(ids).logits
    assert torch.equal(parallel["tp2"][family], parallel["tp2_rank1"][family])
    for layout in ("tp2", "pp2"):
        diff = (parallel[layout][family] - ref).abs().max().item()
        print(f"{family}: {layout} max |logit diff| {diff:.2e}")
        assert diff < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_text_matches_transformers(work, ours, family):
    hf_dir = work["hf"][(family, False)]
    tok = Tokenizer.load(work["root"] / f"ours_{family}")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = _hf_model(hf_dir)
    for prompt, ours_seq in zip(PROMPTS, ours[family]["generated"]):
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN_TOKENS, do_sample=False,
                                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        assert seq[0].tolist() == ours_seq
        if isinstance(tok, HFTokenizer):  # (SentencePiece renders <unk> and broken UTF-8 its own way)
            assert hf_tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True) == tok.decode(ours_seq[ids.shape[1]:])


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_in_and_out(work, ours, family):
    tok = Tokenizer.load(work["root"] / f"rm_{family}")
    ids = _rm_ids(tok)
    hf_dir = work["hf"][(family, True)]
    assert ours[family]["rm_kind"] == "reward"
    with torch.no_grad():
        ref = _hf_model(hf_dir, rm=True)(ids).logits[:, 0]
    got = ours[family]["rm_scores"]
    assert ref.abs().max() > 0.05
    diff = (got - ref).abs().max().item()
    print(f"{family} RM: max |score diff| {diff:.2e}")
    assert diff < TOL
    out = work["root"] / f"rm_back_{family}"
    summary = convert_to_hf(work["root"] / f"rm_{family}", out, progress=False)
    assert summary["architecture"] == _hf_class(family, True).__name__
    _assert_bitwise(hf_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rlhf_score_bias"] == 0.0
