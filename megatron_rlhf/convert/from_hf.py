"""Hugging Face (Llama incl. Llama-3.x, Mistral, Qwen2/2.5, Qwen3, GPT-2) -> our Megatron-Core checkpoint.

``...ForCausalLM`` / ``GPT2LMHeadModel`` become a policy (``kind: policy``);
``...ForSequenceClassification`` with ``num_labels=1`` becomes a reward model
(``kind: reward``, our scalar head; its bias is ``config.json``'s ``rlhf_score_bias`` when
we exported it, else 0, as HF's ``score`` layer has none).

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
from megatron_rlhf.data.tokenizer import HFTokenizer, Tokenizer

# Hugging Face class -> (our family, head). "score": ...ForSequenceClassification (num_labels=1) -> our RM.
SUPPORTED = {
    f"{name}{cls}": (family, head)
    for name, family in (("Llama", "llama"), ("Mistral", "mistral"), ("Qwen2", "qwen2"), ("Qwen3", "qwen3"))
    for cls, head in (("ForCausalLM", "lm"), ("ForSequenceClassification", "score"))
}
SUPPORTED.update({"GPT2LMHeadModel": ("gpt2", "lm"), "GPT2ForSequenceClassification": ("gpt2", "score")})
CAUSAL_LM = {family: name for name, (family, head) in SUPPORTED.items() if head == "lm"}
EXACT_GELU = ("gelu", "gelu_python")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the original GPT-2's
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# tensors some HF checkpoints carry that are recomputed, not learned
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


def _unsupported(arch: str, why: str) -> ConversionError:
    return ConversionError(f"unsupported {arch}: {why}")


def head_of(arch: str) -> str:
    """"lm" (a policy) or "score" (a reward model) for a supported HF class name."""
    return SUPPORTED[arch][1]


def _rope(cfg: dict, arch: str) -> dict:
    """Our RoPE keys from ``rope_theta`` / ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    if float(cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise _unsupported(arch, "partial rotary embeddings (partial_rotary_factor < 1)")
    if rope_type == "default":
        return dict(rotary_base=theta)
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_ROPE_KEYS if rope.get(k) is None]
        if missing:
            raise _unsupported(arch, f"RoPE scaling 'llama3' without {', '.join(missing)} in config.json")
        return dict(
            rotary_base=theta, rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]), rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    raise _unsupported(arch, f"RoPE scaling {rope_type!r} (implemented: plain RoPE and Llama-3's 'llama3')")


def _llama_like(cfg: dict, arch: str, family: str) -> ModelConfig:
    if cfg.get("model_type", family) != family:
        raise _unsupported(arch, f"model_type {cfg.get('model_type')!r} (expected {family!r})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise _unsupported(arch, f"hidden_act={cfg['hidden_act']!r} (ours is SwiGLU with silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise _unsupported(arch, "attention_bias / mlp_bias (biases on every linear layer are not implemented; Qwen2's q/k/v biases are)")
    if cfg.get("use_sliding_window"):
        raise _unsupported(arch, "use_sliding_window=true (sliding-window attention is not implemented)")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    seq_length = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window") if family == "mistral" else None
    if window:
        # our attention is full causal: exact up to the window, so the context stops there
        seq_length = min(seq_length, int(window))
    return ModelConfig(
        flavour="llama",
        family=family,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim if head_dim not in (None, hidden // heads) or hidden % heads else None,
        ffn_hidden_size=cfg["intermediate_size"],
        seq_length=seq_length,
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        sliding_window=int(window) if window else None,
        **_rope(cfg, arch),
    )


def model_config_from_hf(cfg: dict) -> tuple[ModelConfig, str]:
    """Our ModelConfig for an HF ``config.json`` (dict), or a ConversionError saying why not."""
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        model_type = cfg.get("model_type")
        guess = CAUSAL_LM.get(model_type) if not archs else None
        if guess is None:
            raise ConversionError(
                f"unsupported architecture {', '.join(archs) or model_type or '(none given)'}: convert_from_hf reads "
                f"Llama (incl. Llama-3.x RoPE scaling), Mistral, Qwen2/Qwen2.5, Qwen3 and GPT-2, as ...ForCausalLM "
                f"(GPT2LMHeadModel) or ...ForSequenceClassification with num_labels=1 (a reward model)"
            )
        arch = guess
    family, head = SUPPORTED[arch]
    if head == "score":
        labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2
        if labels != 1:
            raise _unsupported(arch, f"{labels} labels: a reward model has one (num_labels=1)")
    if family != "gpt2":
        model = _llama_like(cfg, arch, family)
    else:
        act = cfg.get("activation_function", "gelu_new")
        if act not in EXACT_GELU + TANH_GELU:
            raise _unsupported(arch, f"activation_function={act!r} (supported: {', '.join(EXACT_GELU + TANH_GELU)})")
        if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
            raise _unsupported(arch, "non-standard attention scaling (scale_attn_weights / scale_attn_by_inverse_layer_idx)")
        if cfg.get("add_cross_attention"):
            raise _unsupported(arch, "cross-attention")
        hidden = cfg.get("n_embd", cfg.get("hidden_size"))
        model = ModelConfig(
            flavour="gpt2",
            family="gpt2",
            num_layers=cfg.get("n_layer", cfg.get("num_hidden_layers")),
            hidden_size=hidden,
            num_attention_heads=cfg.get("n_head", cfg.get("num_attention_heads")),
            ffn_hidden_size=cfg.get("n_inner") or 4 * hidden,
            seq_length=cfg.get("n_positions", cfg.get("max_position_embeddings", 1024)),
            norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
            untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", True),
            gelu_approximation="tanh" if act in TANH_GELU else "none",
        )
    try:
        model.validate()
    except ConfigError as exc:
        raise _unsupported(arch, str(exc)) from None
    return model, arch


def load_hf_tokenizer(hf_dir: Path, tokenizer: Optional[str]) -> Tokenizer:
    """The tokenizer of ``hf_dir`` (``tokenizer.model`` if it has one, else ``tokenizer.json``
    with its configs), or the one ``--tokenizer`` names (a file or folder)."""
    path = Path(tokenizer) if tokenizer else hf_dir
    if tokenizer and not path.exists():
        raise ConversionError(f"--tokenizer {tokenizer}: not found")
    try:
        return Tokenizer.load(path)
    except DataError as exc:
        raise ConversionError(
            f"tokenizer of {path}: {str(exc).splitlines()[0]}. Pass --tokenizer PATH (a SentencePiece .model, a "
            f"tokenizer.json or a folder with one) whose ids match the model's embedding rows"
        ) from None


def match_vocabulary(tok: Tokenizer, emb_rows: int, cfg: dict, source: Path) -> Tokenizer:
    """The tokenizer sized to the model's embedding, or a ConversionError.

    A SentencePiece model must have exactly one piece per row. A Hugging Face tokenizer may
    have fewer tokens than rows (Qwen2.5: 151665 tokens, 151936 rows): the rows past it are
    kept (exported back unchanged), never produced by the tokenizer.
    """
    declared = cfg.get("vocab_size")
    problem = None
    if declared and declared != emb_rows:
        problem = f"config.json vocab_size={declared} but the embedding has {emb_rows} rows"
    elif isinstance(tok, HFTokenizer):
        if tok.num_tokens > emb_rows:
            problem = f"the tokenizer {tok.source} has {tok.num_tokens} tokens but the model's embedding has only {emb_rows} rows"
        elif tok.vocab_size != emb_rows:
            tok = HFTokenizer(tok._json, dict(tok.settings, vocab_size=emb_rows), tok.source)
    elif tok.vocab_size != emb_rows:
        problem = f"the tokenizer {tok.source} has {tok.vocab_size} pieces but the model's embedding has {emb_rows} rows"
    if problem:
        raise ConversionError(
            f"mismatched vocabulary in {source}: {problem} (config.json vocab_size={declared}). Use the tokenizer the "
            f"model was trained with (--tokenizer PATH)"
        )
    return tok


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
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Convert; returns a summary (checkpoint path, model config, dtype, tensor count)."""
    from megatron_rlhf.progress import progress as progress_bar

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a folder (give a Hugging Face model folder, as save_pretrained writes it)")
    cfg = read_json(hf_dir / "config.json", "Hugging Face config")
    model, arch_name = model_config_from_hf(cfg)
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
    tok = match_vocabulary(tok, emb_rows, cfg, hf_dir)
    declared = tok.special_ids() if isinstance(tok, HFTokenizer) else {"bos": tok.bos_id, "eos": tok.eos_id}
    for key in ("bos", "eos"):
        ours = declared.get(key)
        if isinstance(cfg.get(f"{key}_token_id"), int) and ours is not None and cfg[f"{key}_token_id"] != ours:
            print(f"warning: config.json {key}_token_id={cfg[f'{key}_token_id']} but the tokenizer's is {ours}; megatron-rlhf uses the tokenizer's")
    check_layout_for(model, tok.vocab_size, tensor_model_parallel_size, pipeline_model_parallel_size)

    from megatron_rlhf.models.builder import build_model, padded_vocab_size

    vocab = tok.vocab_size
    head = head_of(arch_name)
    arch = arch_of(model, vocab, padded_vocab_size(vocab, model, 1), head=head)
    score_bias = float(cfg.get("rlhf_score_bias") or 0.0)
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

        net = build_model(build_cfg, ParallelConfig(), vocab, scalar_head=head == "score", initialize=False)
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
            for name, tensor in megatron_tensors(arch, get, prefix, split_fc1=True, score_bias=score_bias):
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
            kind="reward" if head == "score" else "policy",
            stage="convert_from_hf",
            model=dataclasses.asdict(model),
            vocab_size=vocab,
            tokenizer_fingerprint=tok.fingerprint(),
            hf_source=dict(
                path=str(hf_dir.resolve()),
                architecture=arch_name,
                score_bias=score_bias if head == "score" else None,
                torch_dtype=dtype_name(source_dtype),
                requested_layout=dict(tensor_model_parallel_size=tensor_model_parallel_size, pipeline_model_parallel_size=pipeline_model_parallel_size),
            ),
        )
        shards = _ShardedStateDict(_fc1_from_halves(net.sharded_state_dict(prefix=""), halves))
        ckpt = save_checkpoint(out_dir, 0, {"model": shards}, meta, tokenizer_bytes=tok.serialized_model())
        del net, params, shards, halves
    return {"checkpoint": str(ckpt), "model": dataclasses.asdict(model), "architecture": arch_name, "vocab_size": vocab, "source_dtype": dtype_name(source_dtype), "tensors": len(wanted)}
