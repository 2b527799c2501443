"""One builder for every model of the pipeline: policy, reference, reward model, critic.

A Megatron-Core ``GPTModel`` in two flavours (GPT-2: LayerNorm, GELU, learned positions,
tied embeddings; Llama: RMSNorm, SwiGLU, RoPE, grouped-query attention, untied; with the
options of Llama-3.x, Mistral, Qwen2 and Qwen3: Llama-3 RoPE scaling, any head size, q/k/v
biases, QK-norm, tied embeddings), with
either Transformer Engine's layer spec (GPU; BF16 and FP8) or Megatron's local spec with
our SDPA core attention (any device). The reward model and critic are the same network
with the unembedding replaced by a scalar head (:class:`ScalarHead`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rlhf.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rlhf.models.attention import SDPAttention
from megatron_rlhf.models.sizing import ffn_hidden_size, padded_vocab_size, tied_embeddings  # noqa: F401 (the builder's sizing rules)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation: GPT-2's (Hugging Face ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


def head_dim(model: ModelConfig) -> int:
    return model.head_dim or model.hidden_size // model.num_attention_heads


def llama3_inv_freq(dim: int, base: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3.1's scaling (``rope_type: llama3``), fp32 ``[dim/2]``.

    Plain RoPE has ``f_i = base^(-2i/dim)``, wavelength ``w_i = 2 pi / f_i``. With
    ``L = original_max_position_embeddings``: ``w_i < L/high_freq_factor`` keeps ``f_i``;
    ``w_i > L/low_freq_factor`` uses ``f_i/factor``; in between it interpolates with
    ``s = (L/w_i - low_freq_factor) / (high_freq_factor - low_freq_factor)``:
    ``(1 - s) f_i/factor + s f_i`` (transformers' ``_compute_llama3_parameters``, in the
    same float32 operations so the frequencies are bitwise equal). Megatron-Core's own
    ``rope_scaling`` fixes ``low/high_freq_factor`` = 1/4 and ``L`` = 8192.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def use_transformer_engine(model: ModelConfig) -> bool:
    if model.transformer_impl == "local":
        return False
    try:
        import transformer_engine  # noqa: F401

        have_te = torch.cuda.is_available()
    except ImportError:
        have_te = False
    if model.transformer_impl == "transformer_engine" and not have_te:
        raise ConfigError(
            "model.transformer_impl=transformer_engine needs a GPU and Transformer Engine "
            "(pip install --no-build-isolation 'transformer_engine[pytorch]'); use 'local' or 'auto'"
        )
    return have_te


def resolve_precision(model: ModelConfig) -> str:
    if model.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if model.precision == "bf16" and not torch.cuda.is_available():
        raise ConfigError("model.precision=bf16 needs a GPU (Megatron's BF16 optimizer is CUDA-only); use fp32 or auto on CPU")
    return model.precision


def transformer_config(model: ModelConfig, parallel: ParallelConfig, initialize: bool = True) -> TransformerConfig:
    llama = model.flavour == "llama"
    precision = resolve_precision(model)
    te = use_transformer_engine(model)
    if model.fp8 and not te:
        # Megatron silently ignores fp8 without Transformer Engine; we refuse instead.
        raise ConfigError("model.fp8 needs Transformer Engine on a GPU (H100 or newer); unset it or install TE")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        ffn_hidden_size=ffn_hidden_size(model),
        kv_channels=head_dim(model),
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        layernorm_epsilon=model.norm_epsilon,
        normalization="RMSNorm" if llama else "LayerNorm",
        gated_linear_unit=llama,
        activation_func=F.silu if llama else (F.gelu if model.gelu_approximation == "none" else _gelu_tanh),
        add_bias_linear=not llama,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        # Initialise the full tensor on CPU, then slice: every TP layout gets the same model.
        use_cpu_initialization=True,
        perform_initialization=initialize,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        # Fusions that need Apex/TE/CUDA kernels are switched on only where they exist.
        bias_activation_fusion=te and not llama and model.gelu_approximation == "none",
        bias_dropout_fusion=te,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=torch.cuda.is_available(),
    )
    if model.fp8:
        kwargs.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe)
    if model.recompute_granularity == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=model.recompute_num_layers)
    elif model.recompute_granularity == "selective":
        kwargs.update(recompute_granularity="selective")
    return TransformerConfig(**kwargs)


def layer_spec(model: ModelConfig):
    if use_transformer_engine(model):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm" if model.flavour == "llama" else "LayerNorm", qk_layernorm=model.qk_layernorm)
    # Swap Megatron's DotProductAttention (CUDA RNG tracker, materialised scores) for SDPA.
    attention = spec.submodules.self_attention.submodules
    spec.submodules.self_attention.submodules = dataclasses.replace(attention, core_attention=SDPAttention)
    return spec


class ScalarHead(torch.nn.Module):
    """The reward/value head: one replicated ``Linear(hidden, 1)`` on the final hidden state.

    It stands in for GPTModel's ``output_layer`` and keeps its call contract
    (``(output, bias)``), so GPTModel returns ``[b, s, 1]`` values instead of logits.

    Under sequence parallelism the final hidden state reaches the head split along the
    sequence (``[s/tp, b, h]`` on each TP rank); the head all-gathers it first, so every TP
    rank returns the values of every position. The head is replicated, so each rank's
    gradient with respect to the gathered state is already the full one: the backward only
    keeps this rank's slice (``tensor_parallel_output_grad=False``), where a reduce-scatter
    would sum TP identical copies.
    """

    def __init__(self, hidden_size: int, init_std: float, sequence_parallel: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(1))
        torch.nn.init.normal_(self.weight, std=init_std)
        # Replicated on every TP rank: Megatron's grad-norm and DDP read this attribute.
        self.weight.tensor_model_parallel = False
        self.bias.tensor_model_parallel = False
        # Read (and, for inference, switched) by GPTModel like ColumnParallelLinear's.
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return F.linear(hidden.float(), self.weight.float(), self.bias.float()), None


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    vocab_size: int,
    scalar_head: bool = False,
    seed: Optional[int] = None,
    initialize: bool = True,
) -> GPTModel:
    """Build this rank's pipeline stage of the model (call after ``init_distributed``).

    ``vocab_size`` is the tokenizer's; the embedding is padded (see ``padded_vocab_size``).
    ``scalar_head=True`` gives the reward-model/critic network. ``initialize=False``
    leaves the weights uninitialised (``torch.empty``: no memory is touched until they are
    written), for callers that overwrite every one, such as the checkpoint converter.
    """
    if seed is not None:
        torch.manual_seed(seed)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = transformer_config(model, parallel, initialize)
    tied = tied_embeddings(model)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model),
        vocab_size=padded_vocab_size(vocab_size, model, tp),
        max_sequence_length=model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=tied and not scalar_head,
        position_embedding_type="rope" if model.flavour == "llama" else "learned_absolute",
        rotary_base=model.rotary_base,
    )
    if model.rope_scaling == "llama3" and getattr(gpt, "rotary_pos_emb", None) is not None:
        # set before any forward (RotaryEmbedding caches its output per length)
        gpt.rotary_pos_emb.inv_freq = llama3_inv_freq(
            head_dim(model), model.rotary_base, model.rope_scaling_factor, model.rope_low_freq_factor,
            model.rope_high_freq_factor, model.rope_original_max_position_embeddings,
        ).to(gpt.rotary_pos_emb.inv_freq.device)
    if scalar_head and gpt.post_process:
        gpt.output_layer = ScalarHead(model.hidden_size, model.init_method_std, sequence_parallel=config.sequence_parallel)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    gpt.rlhf_vocab_size = vocab_size  # the unpadded size, for log-probs and export
    gpt.rlhf_scalar_head = scalar_head
    return gpt


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (their forward passes through)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model
