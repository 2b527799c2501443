"""Our checkpoint (any TP/PP layout it was saved at) -> a Hugging Face model folder.

* a policy (language-model head) -> ``LlamaForCausalLM`` / ``GPT2LMHeadModel``;
* a reward model or critic (:class:`~megatron_rlhf.models.builder.ScalarHead`) ->
  ``LlamaForSequenceClassification`` / ``GPT2ForSequenceClassification``, ``num_labels=1``.

The scalar head's bias: HF's ``score`` layer has none. For GPT-2 the final LayerNorm has a
bias that feeds only the head, so the RM bias ``b`` is folded into it exactly
(``beta' = beta + b * w / |w|^2``; the scores match, the backbone's last hidden state moves
along ``w``). Llama's final RMSNorm has no bias and its output has no constant direction,
so no bias-free linear head can add a constant: the bias is written to ``config.json`` as
``rlhf_score_bias`` and the reward is ``logits + rlhf_score_bias``. That key is present for
both flavours (0.0 for GPT-2, where it is already folded), so consumers can always add it.

Weights are read from the dist checkpoint one layer at a time (see
:mod:`~megatron_rlhf.convert.dist_reader`) and streamed into safetensors shards (see
:mod:`~megatron_rlhf.convert.safetensors_io`): peak memory is a layer and a shard writer's
buffer, not the model. The vocabulary padding is stripped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_rlhf.convert.common import ConversionError, arch_of, dtype_name, family_of, model_config_from_meta, parse_dtype, prepare_out_dir
from megatron_rlhf.convert.dist_reader import DistCheckpointReader
from megatron_rlhf.convert.hf_tokenizer import special_ids, write_hf_tokenizer
from megatron_rlhf.convert.layout import OUTPUT_B, OUTPUT_W, WORD_EMB, Arch, expected_dist_shapes, hf_shapes, hf_tensors
from megatron_rlhf.convert.safetensors_io import INDEX_NAME, SINGLE_NAME, SafetensorsWriter, nbytes, parse_size
from megatron_rlhf.data.jsonl import DataError
from megatron_rlhf.data.tokenizer import HFTokenizer, Tokenizer
from megatron_rlhf.checkpoint import io as ckpt_lib


def default_network(meta: dict, ckpt: Path) -> str:
    networks = meta.get("networks") or sorted(p.name for p in ckpt.iterdir() if (p / ".metadata").is_file())
    for name in ("model", "actor"):
        if name in networks:
            return name
    if networks:
        return networks[0]
    raise ConversionError(f"{ckpt} has no network to export (meta.json lists none)")


def open_network(ckpt: Path, meta: dict, network: str) -> DistCheckpointReader:
    listed = meta.get("networks") or []
    path = ckpt / network
    if listed and network not in listed:
        raise ConversionError(f"{ckpt} has no network '{network}' (it has: {', '.join(listed)}); choose one with --network")
    if not path.is_dir() or not (path / ".metadata").is_file():
        state = "is missing" if not path.is_dir() else "has no .metadata"
        raise ConversionError(
            f"partial checkpoint: {path} {state} although meta.json lists networks {listed or '?'} "
            f"(an interrupted copy?); use a complete checkpoint"
        )
    try:
        reader = DistCheckpointReader(path)
    except Exception as exc:  # a truncated or garbled .metadata: any unpickling error
        raise ConversionError(f"damaged checkpoint: {path / '.metadata'} is unreadable ({type(exc).__name__}); {_DAMAGED_FIX}") from None
    files = {info.relative_path for info in reader.metadata.storage_data.values()}
    lost = sorted(f for f in files if not (path / f).is_file())
    if lost:
        raise ConversionError(f"partial checkpoint: {path} lacks data file(s) {', '.join(lost[:4])} named in its .metadata")
    problem = ckpt_lib.dist_checkpoint_problem(path, keep=lambda key: not key.startswith(OPTIMIZER_PREFIX), need_common=False)
    if problem:
        raise ConversionError(f"damaged checkpoint: {problem}; {_DAMAGED_FIX}")
    return reader


_DAMAGED_FIX = "copy the checkpoint again, or export an earlier one (an iter_N folder under checkpoints/)"


# Training saves each network as {"model": weights, "optimizer": state}; Megatron keys the
# optimizer's tensors (Adam moments, fp32 master copies, distributed-optimizer buffers) under
# this prefix, and export reads only the weights.
OPTIMIZER_PREFIX = "optimizer."


def weight_keys(reader: DistCheckpointReader) -> list:
    return [k for k in reader.tensors if not k.startswith(OPTIMIZER_PREFIX)]


def checkpoint_arch(reader: DistCheckpointReader, meta: dict) -> Arch:
    model = model_config_from_meta(meta)
    vocab = meta.get("vocab_size")
    if not vocab:
        raise ConversionError("meta.json has no vocab_size")
    if WORD_EMB not in reader.tensors:
        raise ConversionError(f"partial checkpoint: {reader.path} has no {WORD_EMB}")
    padded = reader.shape(WORD_EMB)[0]
    scalar = OUTPUT_B in reader.tensors and OUTPUT_W in reader.tensors and reader.shape(OUTPUT_W)[0] == 1
    arch = arch_of(model, int(vocab), padded, head="score" if scalar else "lm")
    if padded < arch.vocab:
        raise ConversionError(f"mismatched vocabulary: meta.json vocab_size={arch.vocab} but the embedding has only {padded} rows")
    expected = expected_dist_shapes(arch)
    missing = [k for k in expected if k not in reader.tensors]
    if missing:
        raise ConversionError(
            f"partial checkpoint: {reader.path} lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
            f"(meta.json describes a {model.flavour} model with {model.num_layers} layers"
            f"{', untied output layer' if not arch.tied and arch.head == 'lm' else ''})"
        )
    wrong = [f"{k}: {reader.shape(k)} vs {v}" for k, v in expected.items() if reader.shape(k) != tuple(v)]
    if wrong:
        raise ConversionError(f"{reader.path} does not match the model config in meta.json: {'; '.join(wrong[:4])}")
    unknown = [k for k in weight_keys(reader) if k not in expected]
    if unknown:
        raise ConversionError(f"{reader.path} has tensors this converter does not know: {', '.join(unknown[:4])}")
    return arch


def checkpoint_tokenizer(ckpt: Path, meta: dict, tokenizer: Optional[str]) -> Tokenizer:
    path = Path(tokenizer) if tokenizer else ckpt
    try:
        tok = Tokenizer.load(path)
    except DataError as exc:
        raise ConversionError(f"tokenizer {path}: {str(exc).splitlines()[0]} (pass --tokenizer PATH)") from None
    if isinstance(tok, HFTokenizer) and tok.num_tokens <= (meta.get("vocab_size") or 0) and tok.vocab_size != meta.get("vocab_size"):
        tok = HFTokenizer(tok._json, dict(tok.settings, vocab_size=meta["vocab_size"]), tok.source)
    if tok.vocab_size != meta.get("vocab_size"):
        raise ConversionError(f"mismatched vocabulary: tokenizer {path} has {tok.vocab_size} pieces, the checkpoint's vocab_size is {meta.get('vocab_size')}")
    fp = meta.get("tokenizer_fingerprint")
    if fp and fp != tok.fingerprint():
        raise ConversionError(f"tokenizer {path} (fingerprint {tok.fingerprint()}) is not the one the checkpoint was trained with ({fp})")
    return tok


HF_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def _rope_parameters(model) -> dict:
    rope = {"rope_type": "default", "rope_theta": float(model.rotary_base)}
    if model.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3", factor=model.rope_scaling_factor, low_freq_factor=model.rope_low_freq_factor,
            high_freq_factor=model.rope_high_freq_factor, original_max_position_embeddings=model.rope_original_max_position_embeddings,
        )
    return rope


def hf_config(arch: Arch, meta: dict, ids: dict, dtype: torch.dtype, score_bias: Optional[float], extra: dict):
    try:
        import transformers
    except ImportError:
        raise ConversionError("exporting needs transformers: pip install 'megatron-rlhf[hf]'") from None
    model = model_config_from_meta(meta)
    family = family_of(model)
    common = dict(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], tie_word_embeddings=arch.tied)
    if arch.llama:
        if family == "llama" and arch.qkv_bias:
            raise ConversionError("a Llama model with q/k/v biases only has no transformers class; set model.family=qwen2")
        if (arch.qkv_bias and family != "qwen2") or (arch.qk_norm and family != "qwen3"):
            raise ConversionError(f"model.family={family!r} has no {'q/k/v biases' if arch.qkv_bias else 'QK-norm'} in transformers")
        if model.sliding_window and family != "mistral":
            raise ConversionError(f"model.sliding_window is a Mistral setting; model.family is {family!r}")
        kwargs = dict(
            vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.ffn, num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.heads, num_key_value_heads=arch.groups, max_position_embeddings=arch.seq_length,
            rms_norm_eps=model.norm_epsilon, hidden_act="silu", attention_dropout=model.attention_dropout, **common,
        )
        if family in ("llama", "mistral", "qwen3"):
            kwargs["head_dim"] = arch.head_dim
        elif arch.head_dim != arch.hidden // arch.heads:
            raise ConversionError(f"Qwen2 has no head_dim setting; this model's head size {arch.head_dim} != hidden/heads")
        if family == "llama":
            kwargs.update(attention_bias=False, mlp_bias=False)
        if family == "mistral":
            kwargs["sliding_window"] = model.sliding_window
        if family in ("qwen2", "qwen3"):
            kwargs.update(use_sliding_window=False, sliding_window=None)
        if family == "qwen3":
            kwargs["attention_bias"] = False
        config_cls = getattr(transformers, f"{HF_CLASSES[family]}Config")
        rope = _rope_parameters(model)
        if int(transformers.__version__.split(".")[0]) >= 5:
            kwargs["rope_parameters"] = rope
        else:
            kwargs["rope_theta"] = rope.pop("rope_theta")
            kwargs["rope_scaling"] = None if rope["rope_type"] == "default" else rope
        cfg = config_cls(**kwargs)
        cls = HF_CLASSES[family] + ("ForSequenceClassification" if arch.head == "score" else "ForCausalLM")
    else:
        cfg = transformers.GPT2Config(
            vocab_size=arch.vocab, n_positions=arch.seq_length, n_embd=arch.hidden, n_layer=arch.num_layers, n_head=arch.heads,
            n_inner=arch.ffn, activation_function="gelu" if model.gelu_approximation == "none" else "gelu_new", layer_norm_epsilon=model.norm_epsilon,
            resid_pdrop=model.hidden_dropout, embd_pdrop=model.hidden_dropout, attn_pdrop=model.attention_dropout, **common,
        )
        cls = "GPT2ForSequenceClassification" if arch.head == "score" else "GPT2LMHeadModel"
    cfg.architectures = [cls]
    if arch.head == "score":
        cfg.num_labels = 1
        cfg.rlhf_score_bias = float(score_bias or 0.0)
    # transformers 5 renamed torch_dtype to dtype (4.x reads torch_dtype)
    setattr(cfg, "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype", dtype)
    cfg.megatron_rlhf = extra
    return cfg


def plan_shards(entries, max_bytes: int):
    shards, current, size = [], [], 0
    for entry in entries:
        b = nbytes(entry[1], entry[2])
        if current and size + b > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += b
    if current:
        shards.append(current)
    return shards


def convert_to_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    network: Optional[str] = None,
    dtype: Optional[str] = None,
    max_shard_size: str = "2GB",
    tokenizer: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Export; returns a summary (class, dtype, files, RM bias handling, tokenizer check)."""
    ckpt = ckpt_lib.resolve_checkpoint(ckpt)
    meta = ckpt_lib.read_meta(ckpt)
    network = network or default_network(meta, ckpt)
    reader = open_network(ckpt, meta, network)
    arch = checkpoint_arch(reader, meta)
    tok = checkpoint_tokenizer(ckpt, meta, tokenizer)
    out_dtype = parse_dtype(dtype) or parse_dtype((meta.get("hf_source") or {}).get("torch_dtype")) or reader.dtype(WORD_EMB)

    score_bias = float(_read_weight(reader)(OUTPUT_B).reshape(-1)[0]) if arch.head == "score" else None
    fold = score_bias if (arch.head == "score" and not arch.llama) else 0.0
    ids = tok.special_ids() if isinstance(tok, HFTokenizer) else special_ids(tok)
    if ids.get("pad") is None:
        ids = dict(ids, pad=tok.pad_id)
    extra = {"source_checkpoint": str(ckpt.resolve()), "network": network, "kind": ckpt_lib.network_kind(meta, network), "iteration": meta.get("iteration")}
    cfg = hf_config(arch, meta, ids, out_dtype, None if score_bias is None else (0.0 if fold else score_bias), extra)
    if fold:
        extra["score_bias_folded_into"] = "transformer.ln_f.bias"
        extra["score_bias"] = score_bias

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"output {out_dir} is a file; give a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConversionError(f"output folder {out_dir} is not empty; choose another or pass --overwrite")
    # Written beside the target and renamed in at the end: a failure leaves no partial folder.
    final_dir, out_dir = out_dir, out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    prepare_out_dir(out_dir, overwrite=True)
    try:
        summary = _write_hf_folder(out_dir, reader, arch, meta, tok, cfg, ids, out_dtype, score_bias, fold, max_shard_size, progress)
        _replace_dir(out_dir, final_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return dict(summary, out_dir=str(final_dir))


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is removed only once ``new`` is in place."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _read_weight(reader: DistCheckpointReader):
    def read(key, index=None):
        try:
            return reader.read(key, index)
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"damaged checkpoint: reading {key} from {reader.path} failed ({type(exc).__name__}: {str(exc)[:100]}); {_DAMAGED_FIX}") from None

    return read


def _write_hf_folder(out_dir, reader, arch, meta, tok, cfg, ids, out_dtype, score_bias, fold, max_shard_size, progress) -> dict:
    from megatron_rlhf.progress import progress as progress_bar

    entries = [(name, shape, out_dtype) for name, shape in hf_shapes(arch)]
    shards = plan_shards(entries, parse_size(max_shard_size))
    names = [SINGLE_NAME] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    where = {e[0]: s for s, shard in enumerate(shards) for e in shard}
    writers = {}
    bar = progress_bar(total=len(entries), desc="convert_to_hf", unit="tensor", enable=progress)
    for name, tensor in hf_tensors(arch, _read_weight(reader), score_bias_into_final_norm=fold):
        s = where[name]
        if s not in writers:
            for done in [k for k in writers if k < s]:
                writers.pop(done).close()
            writers[s] = SafetensorsWriter(out_dir / names[s], shards[s])
        writers[s].write(name, tensor.to(out_dtype))
        del tensor
        bar.update(1)
    for w in writers.values():
        w.close()
    bar.close()
    total = sum(nbytes(e[1], e[2]) for e in entries)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {e[0]: names[where[e[0]]] for e in entries}}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    cfg.save_pretrained(str(out_dir))
    if arch.head == "lm":
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]).save_pretrained(str(out_dir))
    if isinstance(tok, HFTokenizer):
        tok.save(out_dir, model_max_length=arch.seq_length)
        tok_report = {"mismatches": [], "fast": True}
    else:
        tok_report = write_hf_tokenizer(tok, out_dir, arch.seq_length)
    return {
        "out_dir": str(out_dir),
        "architecture": cfg.architectures[0],
        "dtype": dtype_name(out_dtype),
        "files": names,
        "bytes": total,
        "score_bias": score_bias,
        "score_bias_handling": None if score_bias is None else ("folded into transformer.ln_f.bias" if fold else "config.json rlhf_score_bias (add it to the logits)"),
        "tokenizer_mismatches": tok_report["mismatches"],
        "tokenizer_json": tok_report["fast"],
        "special_ids": ids,
    }
