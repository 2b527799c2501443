"""Hugging Face (``LlamaForCausalLM``, ``GPT2LMHeadModel``) -> our Megatron-Core checkpoint.

The result is a normal megatron-rlhf checkpoint folder (``latest`` + ``iter_0000000/``
with ``meta.json``, ``tokenizer.model`` and the dist checkpoint ``model/``), ready for
``model.init_from`` in SFT. Dist checkpoints store global tensors and reshard on load,
so the folder loads at any TP/PP layout; ``tensor_model_parallel_size`` /
``pipeline_model_parallel_size`` only check that the model can be split that way.

How: read ``config.json`` into our ``ModelConfig``; build our model at TP=PP=1 in this
process; stream HF tensors one at a time from the safetensors files into its parameters
(QKV merged per query group, gate/up fused, Conv1D transposed, vocabulary zero-padded);
save with our ``save_checkpoint``. Peak memory: one fp32 copy of the model plus one layer
(the model is built without initialisation, and the SwiGLU fc1 weights are saved from
their two halves, see :func:`_fc1_from_halves`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional

import torch

from megatron_rlhf.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rlhf.convert.common import ConversionError, arch_of, dtype_name, prepare_out_dir, read_json
from megatron_rlhf.convert.layout import hf_source_names, megatron_tensors
from megatron_rlhf.convert.safetensors_io import SafetensorsError, SafetensorsIndex
from megatron_rlhf.data.jsonl import DataError
from megatron_rlhf.data.tokenizer import Tokenizer

SUPPORTED = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}
EXACT_GELU = ("gelu", "gelu_python")
# tensors some HF checkpoints carry that are recomputed, not learned
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


def _unsupported(arch: str, why: str) -> ConversionError:
    return ConversionError(f"unsupported {arch}: {why}")


def model_config_from_hf(cfg: dict, allow_gelu_approximation: bool = False) -> tuple[ModelConfig, str]:
    """Our ModelConfig for an HF ``config.json`` (dict), or a ConversionError saying why not."""
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        model_type = cfg.get("model_type")
        guess = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}.get(model_type) if not archs else None
        if guess is None:
            raise ConversionError(
                f"unsupported architecture {', '.join(archs) or model_type or '(none given)'}: convert_from_hf reads "
                f"{' and '.join(SUPPORTED)} checkpoints (Llama-style with grouped-query attention, or GPT-2)"
            )
        arch = guess
    flavour = SUPPORTED[arch]
    if flavour == "llama":
        if cfg.get("model_type", "llama") != "llama":
            raise _unsupported(arch, f"model_type {cfg.get('model_type')!r} (expected 'llama')")
        if cfg.get("hidden_act", "silu") != "silu":
            raise _unsupported(arch, f"hidden_act={cfg['hidden_act']!r} (ours is SwiGLU with silu)")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise _unsupported(arch, "attention_bias / mlp_bias (our Llama flavour has no linear biases)")
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim") not in (None, hidden // heads):
            raise _unsupported(arch, f"head_dim={cfg['head_dim']} != hidden_size/num_attention_heads={hidden // heads}")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise _unsupported(arch, f"RoPE scaling {rope_type!r} (only plain RoPE is implemented)")
        if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise _unsupported(arch, "partial rotary embeddings")
        theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
        model = ModelConfig(
            flavour="llama",
            num_layers=cfg["num_hidden_layers"],
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads") or heads,
            ffn_hidden_size=cfg["intermediate_size"],
            seq_length=cfg.get("max_position_embeddings", 2048),
            norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
            rotary_base=float(theta),
            untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
            attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        )
    else:
        act = cfg.get("activation_function", "gelu_new")
        if act not in EXACT_GELU and not allow_gelu_approximation:
            raise _unsupported(
                arch,
                f"activation_function={act!r}: our GPT-2 flavour uses the exact (erf) GELU, so the converted "
                f"model would differ from the original by ~1e-3 per activation. Pass --allow-gelu-approximation "
                f"to convert anyway (fine as a starting point for fine-tuning, not bit-exact)",
            )
        if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
            raise _unsupported(arch, "non-standard attention scaling (scale_attn_weights / scale_attn_by_inverse_layer_idx)")
        if cfg.get("add_cross_attention"):
            raise _unsupported(arch, "cross-attention")
        hidden = cfg.get("n_embd", cfg.get("hidden_size"))
        model = ModelConfig(
            flavour="gpt2",
            num_layers=cfg.get("n_layer", cfg.get("num_hidden_layers")),
            hidden_size=hidden,
            num_attention_heads=cfg.get("n_head", cfg.get("num_attention_heads")),
            ffn_hidden_size=cfg.get("n_inner") or 4 * hidden,
            seq_length=cfg.get("n_positions", cfg.get("max_position_embeddings", 1024)),
            norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
            untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", True),
        )
    try:
        model.validate()
    except ConfigError as exc:
        raise _unsupported(arch, str(exc)) from None
    return model, arch


def load_hf_tokenizer(hf_dir: Path, tokenizer: Optional[str]) -> Tokenizer:
    path = Path(tokenizer) if tokenizer else hf_dir / "tokenizer.model"
    if not path.is_file():
        if tokenizer:
            raise ConversionError(f"--tokenizer {tokenizer}: file not found")
        has = [n for n in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json") if (hf_dir / n).is_file()]
        raise ConversionError(
            f"{hf_dir} has no SentencePiece tokenizer.model"
            + (f" (it has {', '.join(has)}: a Hugging Face tokenizer, e.g. GPT-2's byte-level BPE, which our "
               f"SentencePiece-based pipeline cannot represent)" if has else "")
            + ". Pass --tokenizer PATH with a SentencePiece model whose ids match the model's embedding rows"
        )
    try:
        return Tokenizer.load(path)
    except DataError as exc:
        raise ConversionError(f"tokenizer {path}: {str(exc).splitlines()[0]}") from None


@contextlib.contextmanager
def single_process(model: ModelConfig):
    """torch.distributed + Megatron parallel state for one process at TP=PP=1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_rlhf.parallel import destroy_distributed, init_distributed, launch_env

    if parallel_state.model_parallel_is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("the converter runs as one process; do not launch it with torchrun/srun")
        yield
        return
    if launch_env().world_size != 1:
        raise ConversionError("the converter runs as one process; do not launch it with torchrun/srun")
    init_distributed(ParallelConfig(), model)
    try:
        yield
    finally:
        destroy_distributed()


def check_layout_for(model: ModelConfig, vocab: int, tp: int, pp: int) -> None:
    from megatron_rlhf.models.builder import padded_vocab_size
    from megatron_rlhf.parallel import check_layout

    try:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        check_layout(parallel, model, tp * pp)
        padded_vocab_size(vocab, model, tp)
    except ConfigError as exc:
        raise ConversionError(f"this model cannot run at TP={tp}, PP={pp}: {exc}") from None


class _ShardedStateDict:
    """Stands in for the model in ``save_checkpoint``: a prepared sharded state dict."""

    def __init__(self, sharded: dict):
        self._sharded = sharded

    def sharded_state_dict(self, prefix: str = "") -> dict:
        return self._sharded


def _fc1_from_halves(sharded: dict, halves: dict) -> dict:
    """Point the SwiGLU fc1 shards at separately stored ``(gate, up)`` tensors.

    Megatron checkpoints a fused ``[gate; up]`` weight through a ``ShardedTensorFactory``
    that saves its two halves as chunks of one tensor; its async writer clones any tensor
    that is a view of a larger storage, so saving a built model holds the fc1 weights
    twice. Here the factory is expanded into its two ShardedTensors (same keys, offsets and
    replica ids: the files are those a model save writes) holding the HF gate and up
    tensors themselves, and the fused parameter is never written (``torch.empty``, not
    resident): the model stays one copy.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for name, (gate, up) in halves.items():
        factory = sharded.get(name)
        if not isinstance(factory, ShardedTensorFactory):
            raise ConversionError(f"internal: {name} is not saved through Megatron's SwiGLU factory ({type(factory).__name__})")
        built = factory.build()
        if not (isinstance(built, list) and len(built) == 2 and all(isinstance(t, ShardedTensor) for t in built)):
            raise ConversionError(f"internal: unexpected SwiGLU shards for {name}: {built!r:.200}")
        for shard, half in zip(built, (gate, up)):
            if tuple(shard.data.shape) != tuple(half.shape):
                raise ConversionError(f"internal: {name} half {tuple(half.shape)} vs shard {tuple(shard.data.shape)}")
            shard.data = half
        sharded[name] = built
    return sharded


def convert_from_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    tokenizer: Optional[str] = None,
    allow_gelu_approximation: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Convert; returns a summary (checkpoint path, model config, dtype, tensor count)."""
    from megatron_rlhf.progress import progress as progress_bar

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a folder (give a Hugging Face model folder, as save_pretrained writes it)")
    cfg = read_json(hf_dir / "config.json", "Hugging Face config")
    model, arch_name = model_config_from_hf(cfg, allow_gelu_approximation)
    tok = load_hf_tokenizer(hf_dir, tokenizer)
    try:
        index = SafetensorsIndex(hf_dir)
    except SafetensorsError as exc:
        raise ConversionError(f"partial or unreadable checkpoint: {exc}") from None

    emb_rows = int(cfg.get("vocab_size") or 0)
    prefix = "model." if model.flavour == "llama" else "transformer."
    emb = "embed_tokens.weight" if model.flavour == "llama" else "wte.weight"
    if prefix + emb not in index and emb in index:
        prefix = ""  # e.g. the original GPT-2 checkpoints store the base model without a prefix
    emb_name = prefix + emb
    if emb_name in index:
        emb_rows = index.shape(emb_name)[0]
    if tok.vocab_size != emb_rows or (cfg.get("vocab_size") and cfg["vocab_size"] != emb_rows):
        raise ConversionError(
            f"mismatched vocabulary: the tokenizer {tok.source} has {tok.vocab_size} pieces but the model's embedding "
            f"has {emb_rows} rows (config.json vocab_size={cfg.get('vocab_size')}). Use the tokenizer the model was "
            f"trained with (--tokenizer PATH)"
        )
    for key, ours in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)):
        if isinstance(cfg.get(key), int) and cfg[key] != ours:
            print(f"warning: config.json {key}={cfg[key]} but the tokenizer's is {ours}; megatron-rlhf uses the tokenizer's")
    check_layout_for(model, tok.vocab_size, tensor_model_parallel_size, pipeline_model_parallel_size)

    from megatron_rlhf.models.builder import build_model, padded_vocab_size

    vocab = tok.vocab_size
    arch = arch_of(model, vocab, padded_vocab_size(vocab, model, 1))
    wanted = hf_source_names(arch, prefix)
    missing = [n for n in wanted if n not in index]
    if missing:
        raise ConversionError(
            f"partial checkpoint: {hf_dir} lacks {len(missing)} tensor(s) a {arch_name} with this config.json needs, "
            f"e.g. {', '.join(missing[:4])}"
        )
    allowed = set(wanted) | ({prefix + "lm_head.weight", "lm_head.weight"} if arch.tied else set())
    extra = [n for n in index.names() if n not in allowed and not n.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise ConversionError(f"{hf_dir} has tensors this converter does not know ({', '.join(extra[:4])}...): unsupported {arch_name} variant")
    source_dtype = index.dtype(emb_name)

    build_cfg = dataclasses.replace(model, precision="fp32", transformer_impl="local")
    prepare_out_dir(out_dir, overwrite)
    with single_process(build_cfg):
        from megatron_rlhf.checkpoint import save_checkpoint

        net = build_model(build_cfg, ParallelConfig(), vocab, initialize=False)
        params = dict(net.named_parameters())
        done = set()
        bar = progress_bar(total=len(wanted), desc="convert_from_hf", unit="tensor", enable=progress)
        seen_hf = set()

        def get(name: str) -> torch.Tensor:
            if name not in seen_hf:
                seen_hf.add(name)
                bar.update(1)
            return index.read(name)

        halves = {}  # SwiGLU fc1 name -> (gate, up), kept apart (see _fc1_from_halves)
        with torch.no_grad():
            for name, tensor in megatron_tensors(arch, get, prefix, split_fc1=True):
                param = params.get(name)
                shape = (sum(t.shape[0] for t in tensor), *tensor[0].shape[1:]) if isinstance(tensor, tuple) else tuple(tensor.shape)
                if param is None or tuple(param.shape) != shape:
                    raise ConversionError(
                        f"internal: {name} {shape} does not fit the built model ({None if param is None else tuple(param.shape)})"
                    )
                if isinstance(tensor, tuple):
                    halves[name] = tuple(t.to(param.dtype) for t in tensor)  # as the model would store them
                else:
                    param.copy_(tensor)
                done.add(name)
                del tensor
        bar.close()
        left = sorted(set(params) - done)
        if left:
            raise ConversionError(f"internal: parameters not converted: {left[:5]}")
        meta = dict(
            kind="policy",
            stage="convert_from_hf",
            model=dataclasses.asdict(model),
            vocab_size=vocab,
            tokenizer_fingerprint=tok.fingerprint(),
            hf_source=dict(
                path=str(hf_dir.resolve()),
                architecture=arch_name,
                torch_dtype=dtype_name(source_dtype),
                requested_layout=dict(tensor_model_parallel_size=tensor_model_parallel_size, pipeline_model_parallel_size=pipeline_model_parallel_size),
            ),
        )
        shards = _ShardedStateDict(_fc1_from_halves(net.sharded_state_dict(prefix=""), halves))
        ckpt = save_checkpoint(out_dir, 0, {"model": shards}, meta, tokenizer_bytes=tok.serialized_model())
        del net, params, shards, halves
    return {"checkpoint": str(ckpt), "model": dataclasses.asdict(model), "architecture": arch_name, "vocab_size": vocab, "source_dtype": dtype_name(source_dtype), "tensors": len(wanted)}
