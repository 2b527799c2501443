"""Hugging Face <-> megatron-rlhf conversion (tools/convert_from_hf.py, tools/convert_to_hf.py).

Tiny random transformers models (Llama with GQA, tied and untied; GPT-2), every weight
randomised (biases and norms included, so a layout slip cannot hide behind zeros), with a
330-piece SentencePiece tokenizer (not a multiple of 128: the padded vocabulary is
exercised). Our side runs in spawned gloo processes; transformers runs here.

* logit parity (fp32, max |diff| < 1e-4) of our model vs transformers, at TP=1 and TP=2;
  a bfloat16 HF checkpoint imports into fp32 and exports back to the same bfloat16 bits;
* HF -> ours -> HF is bitwise identical, also through checkpoints re-saved at TP=2 and PP=2;
* an exported reward model scores like ours and like `megatron-rlhf score` (< 1e-4), bias included;
* an exported policy generates greedily the same tokens as `megatron-rlhf generate --temperature 0`;
* the exported tokenizer tokenises like ours; bad inputs fail with clear errors.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from dist_utils import run_distributed, run_single  # noqa: E402

from megatron_rlhf.convert import ConversionError, convert_from_hf, convert_to_hf  # noqa: E402
from megatron_rlhf.convert.dist_reader import DistCheckpointReader  # noqa: E402
from megatron_rlhf.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 330
SEQ = 48
RM_BIAS = 0.37
FLAVOURS = ["llama_untied", "llama_tied", "gpt2"]
IMPORTS = FLAVOURS + ["llama_bf16"]  # llama_bf16: llama_untied's shapes, stored in bfloat16 on the HF side


def _randomise(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def _hf_model(flavour: str, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if flavour.startswith("llama"):
        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=SEQ, rope_theta=5000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=flavour == "llama_tied", bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, activation_function="gelu",
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
    _randomise(model, seed)
    if flavour == "llama_tied" or flavour == "gpt2":
        model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    texts = []
    for line in (ROOT / "examples/tiny/data/sft_train.jsonl").read_text().splitlines()[:400]:
        texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    (root / "text.txt").write_text("\n".join(t.replace("\n", " ") for t in texts))
    tok = train_tokenizer([root / "text.txt"], VOCAB, root / "spm", "bpe")
    hf = {}
    for i, flavour in enumerate(IMPORTS):
        d = root / f"hf_{flavour}"
        model = _hf_model(flavour, seed=10 + i)
        (model.to(torch.bfloat16) if flavour.endswith("bf16") else model).save_pretrained(d)
        shutil.copy(root / "spm.model", d / "tokenizer.model")
        hf[flavour] = d
    return {"root": root, "tok": tok, "hf": hf}


def _tokens(batch=3, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=g)
    ids[:, 0] = 1
    return ids


def _load_hf(path, cls=None):
    cls = cls or transformers.AutoModelForCausalLM
    return cls.from_pretrained(str(path), dtype=torch.float32).eval()


def _hf_logits(path, ids):
    with torch.no_grad():
        return _load_hf(path)(ids).logits


def _safetensors(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_bitwise(a_dir, b_dir):
    a, b = _safetensors(a_dir), _safetensors(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- our side (spawned)


def _our_model(ckpt, tp=1, scalar_head=False, pp=1):
    from megatron_rlhf.config import ParallelConfig
    from megatron_rlhf.convert.common import model_config_from_meta
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf import checkpoint as ck

    meta = ck.read_meta(ck.resolve_checkpoint(ckpt))
    cfg = dataclasses.replace(model_config_from_meta(meta), precision="fp32", transformer_impl="local")
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    net = build_model(cfg, parallel, meta["vocab_size"], scalar_head=scalar_head, seed=3)
    return net, cfg, meta


def _logits(net, ids):
    """Full-vocabulary logits (gathered over TP), padding rows stripped."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        local = net.eval()(ids, pos, None)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        local = torch.cat(parts, -1)
    return local[..., : net.rlhf_vocab_size]


def _rm_batch():
    """Right-padded sequences ending in eos (2), padded with 0; and the last-token index."""
    g = torch.Generator().manual_seed(5)
    lengths = [12, 7, 16]
    ids = torch.zeros(3, 16, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, VOCAB, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 1, 2
    return ids, torch.tensor(lengths) - 1


def _worker_tp1(work_root, hf_dirs, ids, prompts):
    """Import every HF model, compute our logits, build and save reward models, then run
    ``megatron-rlhf generate --temperature 0`` on the policies and ``megatron-rlhf score``
    on the reward models (their JSONL outputs land in ``work_root``)."""
    import importlib.util

    from megatron_rlhf.cli import main as cli
    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf import checkpoint as ck

    init_distributed(ParallelConfig(), ModelConfig())
    root = Path(work_root)
    tok = Tokenizer.load(Path(hf_dirs["gpt2"]) / "tokenizer.model")
    out = {}
    for flavour, hf_dir in hf_dirs.items():
        ours = root / f"ours_{flavour}"
        convert_from_hf(hf_dir, ours, progress=False)
        net, cfg, meta = _our_model(ours)
        ck.load_weights(net, ck.resolve_checkpoint(ours))
        res = {"logits": _logits(net, ids)}
        from megatron_rlhf.rollout import generate

        gen = generate(net, prompts, 10, eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=0.0)
        res["generated"] = [list(map(int, s)) for s in gen.sequences]
        if flavour in RM_FLAVOURS:
            rm, _, _ = _our_model(ours, scalar_head=True)
            ck.load_weights(rm, ck.resolve_checkpoint(ours), skip_output_layer=True)
            with torch.no_grad():
                rm.output_layer.bias.fill_(RM_BIAS)
            rm_ids, last = _rm_batch()
            pos = torch.arange(rm_ids.shape[1]).expand_as(rm_ids)
            with torch.no_grad():
                values = rm.eval()(rm_ids, pos, None)[..., 0]
            res["rm_scores"] = values[torch.arange(len(last)), last]
            rm_meta = dict(meta, kind="reward", stage="rm")
            for k in ("iteration", "layout", "networks", "network_kinds"):
                rm_meta.pop(k, None)
            ck.save_checkpoint(root / f"rm_{flavour}", 0, {"model": rm}, rm_meta, tokenizer_bytes=tok.serialized_model())
        out[flavour] = res
    prompts_file = root / "gen_prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in GEN_PROMPTS))
    for flavour in FLAVOURS:
        args = ["--checkpoint", str(root / f"ours_{flavour}"), "--prompts", str(prompts_file), "--max-new-tokens", str(GEN_TOKENS),
                "--temperature", "0", "--output", str(root / f"generated_{flavour}.jsonl")]
        assert cli(["generate", *args]) == 0
    pairs = root / "score_input.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in SCORE_PAIRS))
    if importlib.util.find_spec("megatron_rlhf.commands.score") is not None:
        for flavour in RM_FLAVOURS:  # `score` ends torch.distributed on exit; the next call starts it again
            args = ["--checkpoint", str(root / f"rm_{flavour}"), "--input", str(pairs), "--output", str(root / f"scored_{flavour}.jsonl")]
            assert cli(["score", *args, "--batch-size", "2"]) == 0
    return out


def _worker_tp2(ours_dirs, out_root, ids):
    """Load converted checkpoints at TP=2, compute logits, re-save them at TP=2; then
    switch the two processes to PP=2 and re-save them at PP=2 as well."""
    from megatron.core import parallel_state

    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf import checkpoint as ck

    init_distributed(ParallelConfig(tensor_model_parallel_size=2), ModelConfig(num_query_groups=2))
    out = {}
    for layout in ("tp2", "pp2"):
        if layout == "pp2":
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2, create_gloo_process_groups=True)
        for flavour, ours in ours_dirs.items():
            ckpt = ck.resolve_checkpoint(ours)
            net, _, meta = _our_model(ours, tp=2 if layout == "tp2" else 1, pp=2 if layout == "pp2" else 1)
            ck.load_weights(net, ckpt)
            if layout == "tp2":
                out[flavour] = _logits(net, ids)
            meta = {k: v for k, v in meta.items() if k not in ("iteration", "layout", "networks")}
            tok_bytes = (ckpt / "tokenizer.model").read_bytes()
            ck.save_checkpoint(Path(out_root) / f"{layout}_{flavour}", 0, {"model": net}, meta, tokenizer_bytes=tok_bytes)
    return out


PROMPTS = [[1, 40, 41, 42], [1, 77], [1, 100, 101, 102, 103, 104, 105]]
GEN_PROMPTS = ["List 3 fruits.", "Hi", "Write a short poem about the sea, please."]
GEN_TOKENS = 10
RM_FLAVOURS = ["llama_untied", "gpt2"]
SCORE_PAIRS = [("List 3 fruits.", "Apple, pear and plum."), ("Hi", "Hello!"), ("Name a colour.", "Blue is one colour; red is another.")]


@pytest.fixture(scope="module")
def ours(work):
    ids = _tokens()
    hf_dirs = {k: str(v) for k, v in work["hf"].items()}
    results = run_single(_worker_tp1, str(work["root"]), hf_dirs, ids, PROMPTS)
    return {"ids": ids, "results": results}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("flavour", IMPORTS)
def test_logit_parity_and_bitwise_round_trip(work, ours, flavour):
    ids = ours["ids"]
    ref = _hf_logits(work["hf"][flavour], ids)
    got = ours["results"][flavour]["logits"]
    assert got.shape == ref.shape
    assert ref.abs().max() > 1.0  # a real signal, not near-zero logits
    print(f"{flavour}: ours vs transformers, max |logit diff| {(got - ref).abs().max().item():.2e}")
    assert (got - ref).abs().max().item() < 1e-4

    ckpt = work["root"] / f"ours_{flavour}"
    meta = json.loads((ckpt / "iter_0000000" / "meta.json").read_text())
    assert meta["kind"] == "policy" and meta["vocab_size"] == VOCAB
    assert meta["model"]["untie_embeddings_and_output_weights"] == (flavour in ("llama_untied", "llama_bf16"))
    reader = DistCheckpointReader(ckpt / "iter_0000000" / "model")
    assert {reader.dtype(k) for k in reader.tensors} == {torch.float32}  # our checkpoints hold fp32, whatever the source

    out = work["root"] / f"back_{flavour}"
    summary = convert_to_hf(ckpt, out, progress=False)
    assert summary["architecture"] == ("GPT2LMHeadModel" if flavour == "gpt2" else "LlamaForCausalLM")
    assert summary["dtype"] == ("bfloat16" if flavour.endswith("bf16") else "float32")  # the source's, by default
    _assert_bitwise(work["hf"][flavour], out)
    assert (_hf_logits(out, ids) - ref).abs().max().item() == 0.0


def test_tp2_pp2_checkpoint_parity_and_export(work, ours, tmp_path):
    ids = ours["ids"]
    ours_dirs = {f: str(work["root"] / f"ours_{f}") for f in ("llama_untied", "gpt2")}
    ranks = run_distributed(_worker_tp2, 2, ours_dirs, str(tmp_path), ids)
    for flavour in ours_dirs:
        ref = _hf_logits(work["hf"][flavour], ids)
        assert torch.equal(ranks[0][flavour], ranks[1][flavour])
        print(f"{flavour}: ours at TP=2 vs transformers, max |logit diff| {(ranks[0][flavour] - ref).abs().max().item():.2e}")
        assert (ranks[0][flavour] - ref).abs().max().item() < 1e-4
        for layout, key in (("tp2", "tensor_model_parallel_size"), ("pp2", "pipeline_model_parallel_size")):
            saved = tmp_path / f"{layout}_{flavour}"
            meta = json.loads((saved / "iter_0000000" / "meta.json").read_text())
            assert meta["layout"][key] == 2
            out = tmp_path / f"hf_from_{layout}_{flavour}"
            convert_to_hf(saved, out, progress=False)
            _assert_bitwise(work["hf"][flavour], out)
            assert (_hf_logits(out, ids) - ref).abs().max().item() < 1e-4


def _hf_rewards(out, sequences):
    """HF ``...ForSequenceClassification`` rewards of right-padded ``sequences`` (+ rlhf_score_bias)."""
    cfg = json.loads((out / "config.json").read_text())
    model = _load_hf(out, transformers.AutoModelForSequenceClassification)
    pad = cfg["pad_token_id"]
    ids = torch.full((len(sequences), max(map(len, sequences))), pad, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        logits = model(ids, attention_mask=(ids != pad).long()).logits[:, 0]
    return logits, logits + cfg["rlhf_score_bias"], cfg


@pytest.mark.parametrize("flavour", RM_FLAVOURS)
def test_reward_model_export_scores_match(work, ours, flavour):
    out = work["root"] / f"rm_hf_{flavour}"
    summary = convert_to_hf(work["root"] / f"rm_{flavour}", out, progress=False)
    assert summary["architecture"].endswith("ForSequenceClassification")
    assert abs(summary["score_bias"] - RM_BIAS) < 1e-6
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_labels"] == 1 if "num_labels" in cfg else len(cfg["id2label"]) == 1
    assert cfg["pad_token_id"] == 0
    rm_ids, last = _rm_batch()
    logits, reward, cfg = _hf_rewards(out, [row[: n + 1].tolist() for row, n in zip(rm_ids, last)])
    expected = ours["results"][flavour]["rm_scores"]
    assert expected.abs().max() > 0.1
    print(f"{flavour} RM: exported vs ours, max |reward diff| {(reward - expected).abs().max().item():.2e}")
    assert (reward - expected).abs().max().item() < 1e-4
    if flavour == "gpt2":
        assert cfg["rlhf_score_bias"] == 0.0  # folded into ln_f.bias: the plain logits are the reward
        assert (logits - expected).abs().max().item() < 1e-4
    else:
        assert cfg["rlhf_score_bias"] == pytest.approx(RM_BIAS)  # RMSNorm: nothing to fold into

    # `megatron-rlhf score` on {"prompt", "response"} lines vs the exported model and tokenizer
    scored_file = work["root"] / f"scored_{flavour}.jsonl"
    if not scored_file.exists():
        pytest.skip("the `megatron-rlhf score` command (megatron_rlhf.commands.score) is not available")
    scored = [json.loads(line) for line in scored_file.read_text().splitlines()]
    assert [(r["prompt"], r["response"]) for r in scored] == SCORE_PAIRS
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    sequences = [
        [hf_tok.bos_token_id] + hf_tok(p, add_special_tokens=False).input_ids + hf_tok(r, add_special_tokens=False).input_ids
        + [hf_tok.eos_token_id]
        for p, r in SCORE_PAIRS
    ]
    _, reward, _ = _hf_rewards(out, sequences)
    cli_rewards = torch.tensor([r["reward"] for r in scored])
    print(f"{flavour} RM: exported vs `megatron-rlhf score`, max |reward diff| {(reward - cli_rewards).abs().max().item():.2e}")
    assert (reward - cli_rewards).abs().max().item() < 1e-4


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_greedy_generation_matches_transformers(work, ours, flavour):
    """The exported policy, greedy in transformers, continues every prompt with the tokens
    that `megatron-rlhf generate --temperature 0` wrote for the same checkpoint."""
    out = work["root"] / f"back_{flavour}"
    if not out.exists():
        convert_to_hf(work["root"] / f"ours_{flavour}", out, progress=False)
    model = _load_hf(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    lines = [json.loads(line) for line in (work["root"] / f"generated_{flavour}.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == GEN_PROMPTS
    assert any(len(r["tokens"]) == GEN_TOKENS for r in lines)  # not every sample stopped at once
    for record in lines:
        prompt = hf_tok(record["prompt"], return_tensors="pt").input_ids  # bos + prompt, as `generate` builds it
        with torch.no_grad():
            seq = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GEN_TOKENS, do_sample=False,
                                 eos_token_id=2, pad_token_id=0)
        assert seq[0, prompt.shape[1] :].tolist() == record["tokens"], record["prompt"]

    # the library call on token ids as well (generation.generate, the command's engine)
    for prompt, expected in zip(PROMPTS, ours["results"][flavour]["generated"]):
        with torch.no_grad():
            seq = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)
        assert seq[0].tolist() == expected


def test_exported_tokenizer_matches_ours(work, ours):
    out = work["root"] / "back_gpt2"
    if not out.exists():
        convert_to_hf(work["root"] / "ours_gpt2", out, progress=False)
    tok: Tokenizer = work["tok"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (1, 2, 0, 3)
    texts = ["List 3 fruits.", "  two  spaces\nand a tab\t!", "naïve café 日本語 🎉", ""]
    texts += [json.loads(line)["prompt"] for line in (ROOT / "examples/tiny/data/sft_valid.jsonl").read_text().splitlines()[:50]]
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False).input_ids == ids
        assert hf_tok(text).input_ids == [1] + ids
        assert hf_tok.decode(ids) == tok.decode(ids)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)


# ----------------------------------------------------------------------------- bad inputs


def _copy_hf(work, flavour, dest):
    shutil.copytree(work["hf"][flavour], dest)
    return dest


def test_unsupported_architecture(work, tmp_path):
    d = _copy_hf(work, "llama_untied", tmp_path / "bert")
    (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert", "vocab_size": VOCAB}))
    with pytest.raises(ConversionError, match="unsupported architecture BertModel"):
        convert_from_hf(d, tmp_path / "out", progress=False)
    cfg = json.loads((work["hf"]["llama_untied"] / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0}
    cfg["rope_scaling"] = cfg["rope_parameters"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="RoPE scaling 'yarn'.*'llama3'"):
        convert_from_hf(d, tmp_path / "out", progress=False)
    cfg["rope_parameters"] = cfg["rope_scaling"] = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="'llama3' without low_freq_factor, high_freq_factor, original_max_position_embeddings"):
        convert_from_hf(d, tmp_path / "out", progress=False)


def test_gpt2_unknown_activation(work, tmp_path):
    d = _copy_hf(work, "gpt2", tmp_path / "g")
    cfg = json.loads((d / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="activation_function='relu' \\(supported: gelu, gelu_python, gelu_new"):
        convert_from_hf(d, tmp_path / "out", progress=False)


def test_mismatched_vocab(work, tmp_path):
    d = _copy_hf(work, "llama_untied", tmp_path / "v")
    shutil.copy(ROOT / "examples/tiny/tokenizer.model", d / "tokenizer.model")  # 512 pieces vs 330 rows
    with pytest.raises(ConversionError, match="mismatched vocabulary.*512 pieces.*330 rows"):
        convert_from_hf(d, tmp_path / "out", progress=False)


def test_broken_or_missing_tokenizer(work, tmp_path):
    d = _copy_hf(work, "gpt2", tmp_path / "t")
    (d / "tokenizer.model").unlink()
    with pytest.raises(ConversionError, match="holds no tokenizer.*--tokenizer PATH"):
        convert_from_hf(d, tmp_path / "out", progress=False)
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(ConversionError, match="not a valid tokenizer.json.*--tokenizer PATH"):
        convert_from_hf(d, tmp_path / "out", progress=False)


def test_partial_hf_checkpoint(work, tmp_path):
    d = tmp_path / "sharded"
    _hf_model("llama_untied", seed=10).save_pretrained(d, max_shard_size="100KB")
    shutil.copy(work["root"] / "spm.model", d / "tokenizer.model")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(ConversionError, match="incomplete.*missing"):
        convert_from_hf(d, tmp_path / "out", progress=False)
    d2 = _copy_hf(work, "llama_untied", tmp_path / "nosafe")
    (d2 / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="no model.safetensors"):
        convert_from_hf(d2, tmp_path / "out", progress=False)


def test_partial_our_checkpoint(work, ours, tmp_path):
    src = work["root"] / "ours_llama_untied"
    ck = shutil.copytree(src, tmp_path / "ck")
    it = ck / "iter_0000000"
    meta = json.loads((it / "meta.json").read_text())
    meta["networks"] = ["actor", "critic"]
    (it / "model").rename(it / "actor")
    (it / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match="partial checkpoint.*critic is missing"):
        convert_to_hf(ck, tmp_path / "o1", network="critic", progress=False)
    with pytest.raises(ConversionError, match="no network 'reward'"):
        convert_to_hf(ck, tmp_path / "o2", network="reward", progress=False)
    convert_to_hf(ck, tmp_path / "o3", progress=False)  # defaults to the actor
    _assert_bitwise(work["hf"]["llama_untied"], tmp_path / "o3")
    next(iter(sorted((it / "actor").glob("*.distcp")))).unlink()
    with pytest.raises(ConversionError, match="lacks data file"):
        convert_to_hf(ck, tmp_path / "o4", progress=False)


def test_cli_exit_codes_and_sharded_export(work, ours, tmp_path, capsys):
    import runpy

    from_hf = runpy.run_path(str(ROOT / "tools/convert_from_hf.py"))["main"]
    to_hf = runpy.run_path(str(ROOT / "tools/convert_to_hf.py"))["main"]
    assert from_hf([str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert to_hf([str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    out = tmp_path / "sharded"
    assert to_hf([str(work["root"] / "ours_llama_untied"), str(out), "--max-shard-size", "150KB", "--no-progress"]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    _assert_bitwise(work["hf"]["llama_untied"], out)
    assert to_hf([str(work["root"] / "ours_llama_untied"), str(out), "--no-progress"]) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err
    assert to_hf([str(work["root"] / "ours_llama_untied"), str(out), "--overwrite", "--dtype", "bfloat16", "--no-progress"]) == 0
    exported = _safetensors(out)
    original = _safetensors(work["hf"]["llama_untied"])
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, original[k].to(torch.bfloat16)) for k, t in exported.items())
