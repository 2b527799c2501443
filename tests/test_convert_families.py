"""Today's open model families in and out, logit-exact: Llama-3.x (``llama3`` RoPE scaling with
all four parameters, a non-integer rope_theta), Qwen2/2.5 (q/k/v biases, tied embeddings, an
embedding larger than the tokenizer), Mistral (its own head size, a sliding window), Qwen3
(QK-norm) and GPT-2 (byte-level BPE tokenizer.json, tanh GELU), each as a policy and as a
reward model.

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
        # the original GPT-2's tanh GELU (gelu_new); tests/test_convert.py covers the exact one
        return transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, activation_function="gelu_new", **ids)
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
    from megatron_rlhf.rollout import generate
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf import checkpoint as ck

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
    from megatron_rlhf.cli import main as cli

    prompts_file = Path(root) / "gen_prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    for family in FAMILIES:
        args = ["--checkpoint", str(Path(root) / f"ours_{family}"), "--prompts", str(prompts_file), "--max-new-tokens",
                str(GEN_TOKENS), "--temperature", "0", "--output", str(Path(root) / f"generated_{family}.jsonl"), "--no-progress"]
        assert cli(["generate", *args]) == 0
    return out


def _worker_parallel(root):
    """Logits of every converted policy at TP=2, then at PP=2 (on the last stage)."""
    from megatron.core import parallel_state

    from megatron_rlhf.config import ModelConfig, ParallelConfig
    import torch.distributed as dist
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf import checkpoint as ck

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
                positions = torch.arange(ids.shape[1]).expand_as(ids)
                with torch.no_grad():  # the first stage's hidden states to the last stage by hand
                    net.eval()
                    if parallel_state.is_pipeline_first_stage():
                        dist.send(net(ids, positions, None).contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
                        logits = None
                    else:
                        hidden = torch.empty(ids.shape[1], ids.shape[0], net.config.hidden_size)
                        dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                        net.set_input_tensor(hidden)
                        logits = net(ids, positions, None)
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
    # `megatron-rlhf generate --temperature 0` on the converted checkpoint: the same tokens and text
    lines = [json.loads(line) for line in (work["root"] / f"generated_{family}.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == PROMPTS
    for record, ours_seq in zip(lines, ours[family]["generated"]):
        n = len(hf_tok(record["prompt"]).input_ids)
        assert record["tokens"] == ours_seq[n:]
        hf_text = hf_tok.decode([t for t in ours_seq[n:] if t != tok.eos_id], skip_special_tokens=True)
        if isinstance(tok, HFTokenizer):
            assert record["response"] == hf_text


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


def test_llama3_inverse_frequencies_match_transformers():
    """Our llama3 RoPE frequencies equal transformers' bitwise for any parameters, and differ
    from Megatron-Core's built-in scaling (fixed low/high factors 1/4, context 8192) where the
    parameters differ from Llama-3.1's: hence the override in the builder."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_rlhf.models.builder import llama3_inv_freq

    for rope in (LLAMA3_ROPE, dict(LLAMA3_ROPE, rope_theta=500000.0, factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
                                   original_max_position_embeddings=64)):
        cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=4096, rope_parameters=dict(rope))
        ref, scale = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        ours = llama3_inv_freq(16, rope["rope_theta"], rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                               rope["original_max_position_embeddings"])
        assert scale == 1.0 and ours.dtype == torch.float32 and torch.equal(ours, ref)
        plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
        assert (ours < plain).any() and (ours == plain).any()  # both scaled and kept frequencies occur
        builtin = RotaryEmbedding.__new__(RotaryEmbedding)._apply_scaling(plain, factor=rope["factor"])
        assert not torch.equal(builtin, ours)


def test_converted_metadata(work, ours):
    meta = {f: json.loads((work["root"] / f"ours_{f}" / "iter_0000000" / "meta.json").read_text()) for f in FAMILIES}
    llama3 = meta["llama3"]["model"]
    assert (llama3["rope_scaling"], llama3["rope_original_max_position_embeddings"], llama3["rotary_base"]) == ("llama3", 256, 12345.5)
    assert meta["qwen2"]["model"]["qkv_bias"] and not meta["qwen2"]["model"]["untie_embeddings_and_output_weights"]
    assert meta["qwen2"]["vocab_size"] == 448 and Tokenizer.load(work["root"] / "ours_qwen2").num_tokens == 400
    assert (meta["mistral"]["model"]["head_dim"], meta["mistral"]["model"]["sliding_window"]) == (32, 64)
    assert meta["qwen3"]["model"]["qk_layernorm"] and meta["qwen3"]["model"]["head_dim"] == 32
    assert meta["gpt2"]["model"]["gelu_approximation"] == "tanh"
    assert {f: m["model"]["family"] for f, m in meta.items()} == {"llama3": "llama", "qwen2": "qwen2", "mistral": "mistral",
                                                                  "qwen3": "qwen3", "gpt2": "gpt2"}


def test_sliding_window_limits_the_context():
    from megatron_rlhf.config import ConfigError, ModelConfig

    ModelConfig(flavour="llama", seq_length=64, sliding_window=64).validate()
    with pytest.raises(ConfigError, match="model.seq_length=128 exceeds .*sliding_window=64.*Set model.seq_length <= 64"):
        ModelConfig(flavour="llama", seq_length=128, sliding_window=64).validate()
    from megatron_rlhf.convert.from_hf import model_config_from_hf

    cfg = _hf_config("mistral", 512, Tokenizer.load(ROOT / "examples/tiny/tokenizer.model")).to_dict()
    cfg.update(architectures=["MistralForCausalLM"], max_position_embeddings=32768, sliding_window=4096)
    model, _ = model_config_from_hf(cfg)
    assert (model.seq_length, model.sliding_window) == (4096, 4096)  # exact up to the window, so the context stops there


def _edit_config(work, tmp_path, key, name, **changes):
    d = shutil.copytree(work["hf"][key], tmp_path / name)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_bad_inputs(work, tmp_path):
    out = tmp_path / "out"
    d = _edit_config(work, tmp_path, ("qwen2", False), "phi", architectures=["Phi3ForCausalLM"], model_type="phi3")
    with pytest.raises(ConversionError, match="unsupported architecture Phi3ForCausalLM.*Llama.*Mistral.*Qwen2.*Qwen3.*GPT-2"):
        convert_from_hf(d, out, progress=False)
    d = _edit_config(work, tmp_path, ("qwen2", False), "sw", use_sliding_window=True)
    with pytest.raises(ConversionError, match="use_sliding_window=true"):
        convert_from_hf(d, out, progress=False)
    d = _edit_config(work, tmp_path, ("qwen2", True), "labels", num_labels=2, id2label={"0": "a", "1": "b"})
    with pytest.raises(ConversionError, match="2 labels: a reward model has one"):
        convert_from_hf(d, out, progress=False)
    d = _edit_config(work, tmp_path, ("llama3", False), "bias", attention_bias=True)
    with pytest.raises(ConversionError, match="attention_bias"):
        convert_from_hf(d, out, progress=False)
    # a tokenizer with more tokens than the embedding has rows; a config.json that disagrees with the embedding
    with pytest.raises(ConversionError, match="mismatched vocabulary.*has 512 pieces but the model's embedding has 400 rows"):
        convert_from_hf(work["hf"][("gpt2", False)], out, tokenizer=str(ROOT / "examples/tiny/tokenizer.model"), progress=False)
    d = shutil.copytree(work["hf"][("qwen2", False)], tmp_path / "vocab")
    shutil.copy(ROOT / "examples/tiny/tokenizer.model", d / "tokenizer.model")  # SentencePiece, 512 pieces, 448 rows
    with pytest.raises(ConversionError, match="mismatched vocabulary.*512 pieces.*448 rows"):
        convert_from_hf(d, out, progress=False)
    big = write_hf_tokenizer(tmp_path / "big_tok", "qwen2", vocab_size=460)
    with pytest.raises(ConversionError, match="mismatched vocabulary.*460 tokens but the model's embedding has only 448 rows"):
        convert_from_hf(work["hf"][("qwen2", False)], out, tokenizer=str(big), progress=False)
    d = _edit_config(work, tmp_path, ("qwen2", False), "declared", vocab_size=300)
    with pytest.raises(ConversionError, match="mismatched vocabulary.*config.json vocab_size=300 but the embedding has 448 rows"):
        convert_from_hf(d, out, progress=False)


def _cli(*args, timeout=300):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "megatron_rlhf", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_sft_from_a_converted_model_without_a_model_section(work, ours, family, tmp_path):
    """`megatron-rlhf sft model.init_from=<converted>` with no model section: the checkpoint
    sets architecture, sizes and tokenizer; Qwen2 trains on chat lines (its template), Llama-3
    on plain lines; the result exports and loads in transformers."""
    data = tmp_path / "train.jsonl"
    if family == "qwen2":
        records = [{"messages": [{"role": "user", "content": f"List {n} fruits."}, {"role": "assistant", "content": "Apple, pear."}]}
                   for n in range(1, 9)]
    else:
        records = [{"prompt": f"List {n} fruits.", "response": " Apple, pear."} for n in range(1, 9)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "sft"
    r = _cli("sft", f"model.init_from={work['root'] / f'ours_{family}'}", f"data.train_path={data}", "train.max_steps=2",
             "train.global_batch_size=4", "train.micro_batch_size=2", "train.progress_bar=false", "train.tensorboard=false",
             "train.eval_interval=0", f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads(next((out / "checkpoints").glob("iter_*/meta.json")).read_text())
    converted = json.loads((work["root"] / f"ours_{family}" / "iter_0000000" / "meta.json").read_text())
    assert meta["tokenizer_fingerprint"] == converted["tokenizer_fingerprint"]
    assert {k: meta["model"][k] for k in ("family", "num_layers", "qkv_bias", "rope_scaling")} == {
        k: converted["model"][k] for k in ("family", "num_layers", "qkv_bias", "rope_scaling")}
    hf_out = tmp_path / "hf"
    convert_to_hf(out, hf_out, progress=False)
    model = _hf_model(hf_out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_out))
    assert type(model).__name__ == _hf_class(family, False).__name__
    assert hf_tok.chat_template == Tokenizer.load(work["root"] / f"ours_{family}").chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_starts_from_the_imported_model_with_no_model_section(work, ours, family, tmp_path):
    """`model.init_from=<converted>` fills the model section: a config with none trains."""
    import os
    import subprocess
    import sys

    config = tmp_path / "sft.yaml"
    config.write_text(
        "stage: sft\n"
        "train: {lr: 1.0e-3, global_batch_size: 4, micro_batch_size: 2, max_steps: 2, eval_interval: 0, tensorboard: false, progress_bar: false}\n"
        f"data: {{train_path: {ROOT / 'examples/tiny/data/sft_valid.jsonl'}, truncation: prompt_left}}\n"
    )
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "megatron_rlhf", "sft", "--config", str(config), f"model.init_from={work['root'] / f'ours_{family}'}",
                        f"output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2] and all(math.isfinite(row["train/loss"]) for row in rows if "train/loss" in row)
