"""Which tensor is which: Hugging Face names and layouts <-> ours (Megatron-Core GPTModel).

Our side, per transformer layer (local spec module names; the dist checkpoint stores the
same tensors under the TE-compatible keys in :data:`DIST_KEYS`, stacked over layers):

=====================================  ==============================================
``self_attention.linear_qkv.weight``   ``[ng * (nh/ng + 2) * d, H]``, per query group g:
                                       ``[q heads of g (nh/ng * d rows) | k_g | v_g]``
``mlp.linear_fc1.weight`` (llama)      ``[2F, H]`` = ``[gate; up]`` (SwiGLU: silu(gate) * up)
``mlp.linear_fc1.weight`` (gpt2)       ``[4H, H]``; biases follow their weights
=====================================  ==============================================

Hugging Face Llama keeps q/k/v/o and gate/up/down separate (``nn.Linear``: ``[out, in]``);
RoPE is rotate-half in both (Megatron ``rotary_interleaved=False``), so q and k rows are
not permuted. GPT-2 uses ``Conv1D`` (``[in, out]``: transposed) and a fused ``c_attn``
``[q | k | v]`` over all heads. Every map below is a pure permutation / transpose / slice,
so HF -> ours -> HF is bitwise exact.

Vocabulary: ours is padded to a multiple of ``make_vocab_size_divisible_by`` (zeros on
import, stripped on export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Tuple

import torch

# dist-checkpoint keys (layers stacked on axis 0) by our local-spec module name
DIST_KEYS = {
    "input_layernorm.weight": "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "decoder.layers.self_attention.linear_qkv.layer_norm_bias",
    "self_attention.linear_qkv.weight": "decoder.layers.self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias": "decoder.layers.self_attention.linear_qkv.bias",
    "self_attention.q_layernorm.weight": "decoder.layers.self_attention.q_layernorm.weight",
    "self_attention.k_layernorm.weight": "decoder.layers.self_attention.k_layernorm.weight",
    "self_attention.linear_proj.weight": "decoder.layers.self_attention.linear_proj.weight",
    "self_attention.linear_proj.bias": "decoder.layers.self_attention.linear_proj.bias",
    "pre_mlp_layernorm.weight": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "decoder.layers.mlp.linear_fc1.layer_norm_bias",
    "mlp.linear_fc1.weight": "decoder.layers.mlp.linear_fc1.weight",
    "mlp.linear_fc1.bias": "decoder.layers.mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight": "decoder.layers.mlp.linear_fc2.weight",
    "mlp.linear_fc2.bias": "decoder.layers.mlp.linear_fc2.bias",
}
WORD_EMB = "embedding.word_embeddings.weight"
POS_EMB = "embedding.position_embeddings.weight"
FINAL_NORM_W = "decoder.final_layernorm.weight"
FINAL_NORM_B = "decoder.final_layernorm.bias"
OUTPUT_W = "output_layer.weight"
OUTPUT_B = "output_layer.bias"


@dataclass(frozen=True)
class Arch:
    """The shape facts both directions need."""

    flavour: str  # "llama" (also Mistral, Qwen2, Qwen3) | "gpt2"
    num_layers: int
    hidden: int
    heads: int
    groups: int
    ffn: int
    vocab: int  # the tokenizer's (HF's) vocabulary
    padded_vocab: int  # our embedding rows
    seq_length: int
    tied: bool  # output layer shares the word embedding (LM head only)
    head: str = "lm"  # "lm" | "score" (reward model / critic: ScalarHead)
    kv_channels: int = 0  # head size; 0: hidden / heads
    qkv_bias: bool = False  # Qwen2: biases on q, k, v
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden // self.heads

    @property
    def llama(self) -> bool:
        return self.flavour == "llama"

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim


# ----------------------------------------------------------------------------- pure maps


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Separate q ``[nh*d, ...]``, k, v ``[ng*d, ...]`` -> Megatron's per-group ``[q_g | k_g | v_g]``."""
    tail = q.shape[1:]
    d = k.shape[0] // groups
    per = heads // groups
    return torch.cat([q.reshape(groups, per * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)], 1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_qkv` (contiguous results)."""
    tail = qkv.shape[1:]
    per = heads // groups
    q, k, v = qkv.reshape(groups, (per + 2) * head_dim, *tail).split([per * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(), v.reshape(-1, *tail).contiguous()


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


# ----------------------------------------------------------------------------- HF names


def hf_prefix(arch: Arch) -> str:
    return "model." if arch.llama else "transformer."


def hf_layer_names(arch: Arch, i: int) -> List[str]:
    p = f"{hf_prefix(arch)}layers.{i}." if arch.llama else f"transformer.h.{i}."
    if arch.llama:
        return [p + n for n in _llama_layer_names(arch)]
    return [p + n for n in (
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
        "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
    )]


def _llama_layer_names(arch: Arch) -> List[str]:
    names = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]
    if arch.qkv_bias:
        names += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if arch.qk_norm:
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    return names + ["self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def _llama_layer_shapes(arch: Arch) -> List[Tuple[int, ...]]:
    H, F, d = arch.hidden, arch.ffn, arch.head_dim
    q, kv = arch.heads * d, arch.groups * d
    shapes = [(H,), (q, H), (kv, H), (kv, H)]
    if arch.qkv_bias:
        shapes += [(q,), (kv,), (kv,)]
    if arch.qk_norm:
        shapes += [(d,), (d,)]
    return shapes + [(H, q), (H,), (F, H), (F, H), (H, F)]


def hf_shapes(arch: Arch) -> List[Tuple[str, Tuple[int, ...]]]:
    """Every tensor of the HF checkpoint, in the order :func:`hf_tensors` yields them."""
    H, F, V = arch.hidden, arch.ffn, arch.vocab
    out: List[Tuple[str, Tuple[int, ...]]] = []
    if arch.llama:
        out.append(("model.embed_tokens.weight", (V, H)))
        for i in range(arch.num_layers):
            out += list(zip(hf_layer_names(arch, i), _llama_layer_shapes(arch)))
        out.append(("model.norm.weight", (H,)))
    else:
        out += [("transformer.wte.weight", (V, H)), ("transformer.wpe.weight", (arch.seq_length, H))]
        for i in range(arch.num_layers):
            shapes = [(H,), (H,), (H, 3 * H), (3 * H,), (H, H), (H,), (H,), (H,), (H, F), (F,), (F, H), (H,)]
            out += list(zip(hf_layer_names(arch, i), shapes))
        out += [("transformer.ln_f.weight", (H,)), ("transformer.ln_f.bias", (H,))]
    if arch.head == "score":
        out.append(("score.weight", (1, H)))
    elif not arch.tied:
        out.append(("lm_head.weight", (V, H)))
    return out


# ----------------------------------------------------------------------------- ours -> HF

Reader = Callable[..., torch.Tensor]  # read(dist_key, layer_index=None) -> tensor


def hf_tensors(arch: Arch, read: Reader, score_bias_into_final_norm: float = 0.0) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` from our dist checkpoint, one layer at a time.

    ``score_bias_into_final_norm`` (GPT-2 reward models): the scalar head's bias ``b`` is
    folded into the final LayerNorm's bias as ``beta + b * w / |w|^2`` (then
    ``w . (y + beta') = w . (y + beta) + b``), because HF's ``score`` layer has no bias.
    """
    V = arch.vocab
    names = iter(name for name, _ in hf_shapes(arch))

    def emit(t):
        return next(names), t

    yield emit(read(WORD_EMB)[:V])
    if not arch.llama:
        yield emit(read(POS_EMB))
    for i in range(arch.num_layers):
        def layer(name):
            return read(DIST_KEYS[name], i)

        if arch.llama:
            yield emit(layer("input_layernorm.weight"))
            q, k, v = split_qkv(layer("self_attention.linear_qkv.weight"), arch.heads, arch.groups, arch.head_dim)
            yield emit(q)
            yield emit(k)
            yield emit(v)
            del q, k, v
            if arch.qkv_bias:
                for b in split_qkv(layer("self_attention.linear_qkv.bias"), arch.heads, arch.groups, arch.head_dim):
                    yield emit(b)
            if arch.qk_norm:
                yield emit(layer("self_attention.q_layernorm.weight"))
                yield emit(layer("self_attention.k_layernorm.weight"))
            yield emit(layer("self_attention.linear_proj.weight"))
            yield emit(layer("pre_mlp_layernorm.weight"))
            gate, up = layer("mlp.linear_fc1.weight").chunk(2, dim=0)
            yield emit(gate)
            yield emit(up)
            del gate, up
            yield emit(layer("mlp.linear_fc2.weight"))
        else:
            yield emit(layer("input_layernorm.weight"))
            yield emit(layer("input_layernorm.bias"))
            w = torch.cat(split_qkv(layer("self_attention.linear_qkv.weight"), arch.heads, arch.groups, arch.head_dim), 0)
            yield emit(w.t().contiguous())
            del w
            yield emit(torch.cat(split_qkv(layer("self_attention.linear_qkv.bias"), arch.heads, arch.groups, arch.head_dim), 0))
            yield emit(layer("self_attention.linear_proj.weight").t().contiguous())
            yield emit(layer("self_attention.linear_proj.bias"))
            yield emit(layer("pre_mlp_layernorm.weight"))
            yield emit(layer("pre_mlp_layernorm.bias"))
            yield emit(layer("mlp.linear_fc1.weight").t().contiguous())
            yield emit(layer("mlp.linear_fc1.bias"))
            yield emit(layer("mlp.linear_fc2.weight").t().contiguous())
            yield emit(layer("mlp.linear_fc2.bias"))
    yield emit(read(FINAL_NORM_W))
    if not arch.llama:
        beta = read(FINAL_NORM_B)
        if score_bias_into_final_norm:
            w = read(OUTPUT_W)[0].to(torch.float64)
            beta = (beta.to(torch.float64) + score_bias_into_final_norm * w / w.dot(w)).to(beta.dtype)
        yield emit(beta)
    if arch.head == "score":
        yield emit(read(OUTPUT_W))
    elif not arch.tied:
        yield emit(read(OUTPUT_W)[:V])


def required_dist_keys(arch: Arch) -> List[str]:
    keys = [WORD_EMB, FINAL_NORM_W] + [DIST_KEYS[n] for n in _layer_params(arch)]
    if not arch.llama:
        keys += [POS_EMB, FINAL_NORM_B]
    if arch.head == "score":
        keys += [OUTPUT_W, OUTPUT_B]
    elif not arch.tied:
        keys.append(OUTPUT_W)
    return keys


def _layer_params(arch: Arch) -> List[str]:
    names = ["input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    if arch.qkv_bias:
        names.append("self_attention.linear_qkv.bias")
    if arch.qk_norm:
        names += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    if not arch.llama:
        names += ["input_layernorm.bias", "self_attention.linear_qkv.bias", "self_attention.linear_proj.bias", "pre_mlp_layernorm.bias", "mlp.linear_fc1.bias", "mlp.linear_fc2.bias"]
    return names


def expected_dist_shapes(arch: Arch) -> dict:
    """Global shapes of our dist-checkpoint tensors (layers stacked on axis 0)."""
    L, H, F, Vp = arch.num_layers, arch.hidden, arch.ffn, arch.padded_vocab
    fc1 = 2 * F if arch.llama else F
    per_layer = {
        "input_layernorm.weight": (H,), "input_layernorm.bias": (H,),
        "self_attention.linear_qkv.weight": (arch.qkv_rows, H), "self_attention.linear_qkv.bias": (arch.qkv_rows,),
        "self_attention.linear_proj.weight": (H, arch.heads * arch.head_dim), "self_attention.linear_proj.bias": (H,),
        "self_attention.q_layernorm.weight": (arch.head_dim,), "self_attention.k_layernorm.weight": (arch.head_dim,),
        "pre_mlp_layernorm.weight": (H,), "pre_mlp_layernorm.bias": (H,),
        "mlp.linear_fc1.weight": (fc1, H), "mlp.linear_fc1.bias": (fc1,),
        "mlp.linear_fc2.weight": (H, F), "mlp.linear_fc2.bias": (H,),
    }
    out = {DIST_KEYS[n]: (L, *per_layer[n]) for n in _layer_params(arch)}
    out.update({WORD_EMB: (Vp, H), FINAL_NORM_W: (H,), POS_EMB: (arch.seq_length, H), FINAL_NORM_B: (H,), OUTPUT_B: (1,)})
    out[OUTPUT_W] = (1, H) if arch.head == "score" else (Vp, H)
    return {k: v for k, v in out.items() if k in required_dist_keys(arch)}


# ----------------------------------------------------------------------------- HF -> ours


def hf_source_names(arch: Arch, prefix: str) -> List[str]:
    """HF tensor names an import reads (``prefix``: '' or the base-model prefix as stored)."""
    names = [n for n, _ in hf_shapes(arch)]
    base = hf_prefix(arch)
    return [prefix + n[len(base):] if n.startswith(base) else n for n in names]


def megatron_tensors(
    arch: Arch, get: Callable[[str], torch.Tensor], prefix: str, split_fc1: bool = False, score_bias: float = 0.0
) -> Iterator[Tuple[str, object]]:
    """Yield ``(our state_dict name, tensor)`` from HF tensors (``get(hf_name)``).

    A ``score`` head (``...ForSequenceClassification``) becomes our ScalarHead, whose bias
    is ``score_bias`` (HF's head has none; a model we exported carries it as
    ``rlhf_score_bias``).

    ``split_fc1`` (Llama): yield ``mlp.linear_fc1.weight`` as the pair ``(gate, up)``
    instead of their concatenation, for a caller that stores the halves separately.
    """
    base = hf_prefix(arch)

    def hf(name: str) -> torch.Tensor:
        return get(prefix + name[len(base):] if name.startswith(base) else name)

    Vp = arch.padded_vocab
    if arch.llama:
        yield WORD_EMB, pad_rows(hf("model.embed_tokens.weight"), Vp)
    else:
        yield WORD_EMB, pad_rows(hf("transformer.wte.weight"), Vp)
        yield POS_EMB, hf("transformer.wpe.weight")
    for i in range(arch.num_layers):
        ours = f"decoder.layers.{i}."
        n = {x.split(".", 3)[-1]: x for x in hf_layer_names(arch, i)}  # short name -> full HF name
        if arch.llama:
            yield ours + "input_layernorm.weight", hf(n["input_layernorm.weight"])
            yield ours + "self_attention.linear_qkv.weight", merge_qkv(
                hf(n["self_attn.q_proj.weight"]), hf(n["self_attn.k_proj.weight"]), hf(n["self_attn.v_proj.weight"]), arch.heads, arch.groups
            )
            if arch.qkv_bias:
                yield ours + "self_attention.linear_qkv.bias", merge_qkv(
                    hf(n["self_attn.q_proj.bias"]), hf(n["self_attn.k_proj.bias"]), hf(n["self_attn.v_proj.bias"]), arch.heads, arch.groups
                )
            if arch.qk_norm:
                yield ours + "self_attention.q_layernorm.weight", hf(n["self_attn.q_norm.weight"])
                yield ours + "self_attention.k_layernorm.weight", hf(n["self_attn.k_norm.weight"])
            yield ours + "self_attention.linear_proj.weight", hf(n["self_attn.o_proj.weight"])
            yield ours + "pre_mlp_layernorm.weight", hf(n["post_attention_layernorm.weight"])
            gate_up = (hf(n["mlp.gate_proj.weight"]), hf(n["mlp.up_proj.weight"]))
            yield ours + "mlp.linear_fc1.weight", gate_up if split_fc1 else torch.cat(gate_up, 0)
            del gate_up
            yield ours + "mlp.linear_fc2.weight", hf(n["mlp.down_proj.weight"])
        else:
            yield ours + "input_layernorm.weight", hf(n["ln_1.weight"])
            yield ours + "input_layernorm.bias", hf(n["ln_1.bias"])
            H = arch.hidden
            w = hf(n["attn.c_attn.weight"]).t()
            yield ours + "self_attention.linear_qkv.weight", merge_qkv(w[:H], w[H : 2 * H], w[2 * H :], arch.heads, arch.groups)
            del w
            b = hf(n["attn.c_attn.bias"])
            yield ours + "self_attention.linear_qkv.bias", merge_qkv(b[:H], b[H : 2 * H], b[2 * H :], arch.heads, arch.groups)
            yield ours + "self_attention.linear_proj.weight", hf(n["attn.c_proj.weight"]).t()
            yield ours + "self_attention.linear_proj.bias", hf(n["attn.c_proj.bias"])
            yield ours + "pre_mlp_layernorm.weight", hf(n["ln_2.weight"])
            yield ours + "pre_mlp_layernorm.bias", hf(n["ln_2.bias"])
            yield ours + "mlp.linear_fc1.weight", hf(n["mlp.c_fc.weight"]).t()
            yield ours + "mlp.linear_fc1.bias", hf(n["mlp.c_fc.bias"])
            yield ours + "mlp.linear_fc2.weight", hf(n["mlp.c_proj.weight"]).t()
            yield ours + "mlp.linear_fc2.bias", hf(n["mlp.c_proj.bias"])
    if arch.llama:
        yield FINAL_NORM_W, hf("model.norm.weight")
    else:
        yield FINAL_NORM_W, hf("transformer.ln_f.weight")
        yield FINAL_NORM_B, hf("transformer.ln_f.bias")
    if arch.head == "score":
        score = hf("score.weight")
        yield OUTPUT_W, score
        yield OUTPUT_B, torch.full((1,), float(score_bias), dtype=score.dtype)
    elif not arch.tied:
        yield OUTPUT_W, pad_rows(hf("lm_head.weight"), Vp)
