"""tools/plan_memory.py (megatron_rlhf.memory_plan): parameter counts against real
Megatron models, optimizer bytes against a real Megatron optimizer, and the plans."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from megatron_rlhf.config import ModelConfig  # noqa: E402
from megatron_rlhf.commands.plan_memory import main  # noqa: E402
from megatron_rlhf.memory_plan import (  # noqa: E402
    GIB,
    count_params,
    plan_memory,
    preset,
    search_nodes,
    stage_params,
)

V = 1000  # pads to 1024
TINY = {
    # tied embeddings, LayerNorm, biases, learned positions
    "gpt2": ModelConfig(flavour="gpt2", num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                        vocab_size=V, precision="fp32", transformer_impl="local"),
    # untied, RMSNorm, SwiGLU (ffn rounded to 192), GQA with 2 groups
    "llama": ModelConfig(flavour="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                         seq_length=32, vocab_size=V, precision="fp32", transformer_impl="local"),
    # gpt2 with untied embeddings and an explicit ffn size
    "gpt2_untied": ModelConfig(flavour="gpt2", num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                               ffn_hidden_size=96, vocab_size=V, precision="fp32", transformer_impl="local",
                               untie_embeddings_and_output_weights=True),
}


@pytest.fixture(scope="module")
def megatron_single():
    """One-process Megatron state; torn down only if this module set it up."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from megatron.core import parallel_state

    from megatron_rlhf.config import ParallelConfig
    from megatron_rlhf.parallel import destroy_distributed, init_distributed

    mine = not parallel_state.model_parallel_is_initialized()
    init_distributed(ParallelConfig(), TINY["gpt2"])
    yield torch
    if mine:
        destroy_distributed()


def _numel(model):
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_param_count_matches_build_model(megatron_single, name, head):
    from megatron_rlhf.config import ParallelConfig
    from megatron_rlhf.memory_plan import padded_vocab
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.models.sizing import ffn_hidden_size

    m = TINY[name]
    model = build_model(m, ParallelConfig(), vocab_size=V, scalar_head=head == "scalar")
    # the planner's sizes are the built model's (one set of sizing rules, models/sizing.py)
    assert model.embedding.word_embeddings.weight.shape[0] == padded_vocab(m)
    fc1_rows = model.decoder.layers[0].mlp.linear_fc1.weight.shape[0]
    assert fc1_rows == ffn_hidden_size(m) * (2 if m.flavour == "llama" else 1)
    assert count_params(m, head) == _numel(model)
    assert stage_params(m, head=head).total == _numel(model)


def test_fp32_optimizer_bytes_match_megatron(megatron_single):
    """fp32: 4 B weights, 4 B grads (DDP buffer), 8 B Adam (exp_avg + exp_avg_sq)."""
    torch = megatron_single
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rlhf.config import ParallelConfig
    from megatron_rlhf.models.builder import build_model

    m = TINY["llama"]
    model = build_model(m, ParallelConfig(), vocab_size=V, seed=0)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, params_dtype=torch.float32), [ddp])
    ids = torch.randint(0, V, (2, m.seq_length))
    pos = torch.arange(m.seq_length).expand(2, -1)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    ddp(ids, pos, None, labels=ids).float().mean().backward()
    ddp.finish_grad_sync()
    assert opt.step()[0]  # one real step, so Adam's state exists
    inner = [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]
    adam = sum(t.numel() * t.element_size() for o in inner for st in o.state.values()
               for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    plan = plan_memory(m, stage="sft", precision="fp32", distributed_optimizer=False)
    train = plan.phases["train"]
    assert adam > 0 and train["optimizer states"] == adam
    assert train["gradients"] == grads
    assert train["weights"] == weights


_WORKER = r"""
import json, sys
from megatron.core import parallel_state
from megatron_rlhf.config import ModelConfig, ParallelConfig
from megatron_rlhf.parallel import init_distributed
from megatron_rlhf.models.builder import build_model
models = {k: ModelConfig(**v) for k, v in json.loads(sys.argv[1]).items()}
out = []
for tp, pp in ((2, 1), (1, 2)):
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_distributed(par, models["gpt2"])
    for name, m in models.items():
        for head in ("lm", "scalar"):
            model = build_model(m, par, vocab_size=m.vocab_size, scalar_head=head == "scalar")
            n = sum(p.numel() for p in model.parameters())
            out.append([name, head, tp, pp, parallel_state.get_pipeline_model_parallel_rank(), n])
    parallel_state.destroy_model_parallel()
print("COUNTS " + json.dumps(out))
"""


def test_param_counts_per_rank_tp2_and_pp2(tmp_path):
    """Two processes (gloo): TP=2 (each rank holds its shard; replicated params whole), then
    PP=2 (embedding on stage 0; final norm and output layer, a tied copy for gpt2, on stage 1)."""
    pytest.importorskip("megatron.core")
    import dataclasses
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = json.dumps({k: dataclasses.asdict(m) for k, m in TINY.items()})
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, models], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    rows = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
        rows += json.loads(out.split("COUNTS ", 1)[1].splitlines()[0])
    assert len(rows) == 2 * 2 * len(TINY) * 2
    for name, head, tp, pp, pp_rank, n in rows:
        assert stage_params(TINY[name], tp, pp, pp_rank, head).total == n, (name, head, tp, pp, pp_rank)


def test_gpt3_175b_count():
    assert 174.5e9 < count_params(preset("175b")) < 174.7e9  # "175B": 174.6B with the padded vocabulary


def _ppo_175b(**kw):
    args = dict(model=preset("175b"), stage="ppo", precision="fp8", tp=8, pp=16, micro_batch_size=1,
                recompute="selective", sequence_parallel=True, distributed_optimizer=True)
    args.update(kw)
    return args


def test_175b_ppo_fits_on_the_nodes_found():
    plan = search_nodes(**_ppo_175b())
    assert plan is not None and plan.fits
    assert plan.peak_bytes < 80e9  # under 80 GB, with the overhead allowance included
    assert plan.nodes == 16 and plan.world == plan.nodes * 8
    names = [m.role for m in plan.models]
    assert names == ["actor", "critic", "reference", "reward"]
    assert plan.models[1].params_total < 7e9  # the paper's 6B critic/RM by default
    assert set(plan.phases) == {"rollout", "scoring", "train"}
    assert plan.phases["rollout"]["KV cache"] > 0
    # a shorter pipeline needs more data parallelism to shard the optimizer: more nodes
    assert search_nodes(**_ppo_175b(pp=4)).nodes > plan.nodes
    # the recommended layout: pp=8 x dp=2 on the same 16 nodes, with headroom
    rec = plan_memory(**_ppo_175b(pp=8, dp=2))
    assert rec.fits and rec.nodes == 16 and rec.peak_bytes < 70 * GIB
    nocache = plan_memory(**_ppo_175b(pp=8, dp=2, fp8_weight_cache=False))
    assert nocache.phases["train"]["fp8 weight cache"] == 0 and nocache.peak_bytes < rec.peak_bytes


def test_monotonic():
    m = preset("1.3b")
    by_tp = [plan_memory(m, tp=t, sequence_parallel=True).peak_bytes for t in (1, 2, 4, 8)]
    assert by_tp == sorted(by_tp, reverse=True) and len(set(by_tp)) == 4
    by_dp = [plan_memory(m, dp=d).phases["train"]["optimizer states"] for d in (1, 2, 4)]
    assert by_dp[0] == 2 * by_dp[1] == 4 * by_dp[2]
    assert plan_memory(m, dp=4, distributed_optimizer=False).phases["train"]["optimizer states"] == by_dp[0]
    on, off = plan_memory(**_ppo_175b()), plan_memory(**_ppo_175b(offload_frozen=True))
    assert off.peak_bytes < on.peak_bytes and on.frozen_bytes > 0
    assert off.phases["train"]["frozen models"] == 0 and off.phases["scoring"]["frozen models"] > 0
    recompute = [plan_memory(m, recompute=r, attention="unfused").phases["train"]["activations"]
                 for r in ("none", "selective", "full")]
    assert recompute == sorted(recompute, reverse=True)
    assert plan_memory(m, precision="fp8").phases["train"]["activations"] < plan_memory(m).phases["train"]["activations"]


def test_korthikanti_numbers():
    """34 + 5as/h bytes per token per layer; /t with TP+SP; selective drops 5as/h."""
    m = preset("1.3b")
    s, h, a, L = 2048, 2048, 16, 24

    def acts(**kw):
        p = plan_memory(m, attention="unfused", micro_batch_size=1, **kw)
        return p.phases["train"]["activations"] - 2 * s * h * 2 / (kw.get("tp", 1) if kw.get("sequence_parallel") else 1)

    assert acts() == pytest.approx(L * s * h * (34 + 5 * a * s / h))
    assert acts(tp=8, sequence_parallel=True) == pytest.approx(L * s * h * (34 + 5 * a * s / h) / 8)
    assert acts(tp=8) == pytest.approx(L * s * h * (10 + 24 / 8 + 5 * a * s / h / 8))
    sel = acts(recompute="selective")
    assert sel == pytest.approx(L * s * h * 34 + s * h * 5 * a * s / h)  # + one layer's recomputed scores
    # flash attention: the selective figure without recompute (plus a 4a-byte fp32 LSE per token)
    flash = plan_memory(m, micro_batch_size=1).phases["train"]["activations"] - 2 * s * h * 2
    assert flash == pytest.approx(L * s * (34 * h + 4 * a))


def test_cli_last_line_and_json(capsys):
    argv = ["--preset", "175b", "--stage", "ppo", "--precision", "fp8", "--tp", "8", "--pp", "16",
            "--micro-batch-size", "1", "--recompute", "selective", "--sequence-parallel", "--distributed-optimizer",
            "--search"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("plan: peak_gib_per_gpu=") and out[-1].endswith(" nodes=16")
    peak = float(out[-1].split("=")[1].split()[0])
    assert main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out.rsplit("\n", 2)[0])
    assert data["nodes"] == 16 and round(data["peak_gib"], 1) == peak
    assert data["peak_bytes"] / GIB == pytest.approx(data["peak_gib"])


def test_cli_does_not_fit(capsys):
    assert main(["--preset", "175b", "--stage", "sft", "--tp", "8", "--pp", "1", "--search", "--max-nodes", "64"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].endswith(" nodes=0") and "pp must grow" in out[-2]


def test_cli_config_and_nodes(tmp_path, capsys):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("stage: sft\nmodel:\n  num_layers: 24\n  hidden_size: 2048\n  num_attention_heads: 16\n"
                   "  seq_length: 2048\n  vocab_size: 50257\nparallel:\n  tensor_model_parallel_size: 2\n"
                   "train:\n  micro_batch_size: 4\n")
    assert main(["--config", str(cfg), "--nodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "tp=2 pp=1 dp=4" in out and "micro_batch=4" in out
    assert out.strip().splitlines()[-1].endswith(" nodes=1")
    # flags override the file
    assert main(["--config", str(cfg), "--tp", "4", "--dp", "2"]) == 0
    assert "tp=4 pp=1 dp=2" in capsys.readouterr().out


def test_rm_stage_counts_k_responses():
    m = preset("6b")
    p4, p9 = (plan_memory(m, stage="rm", rm_responses=k) for k in (4, 9))
    assert p9.phases["train"]["activations"] == pytest.approx(p4.phases["train"]["activations"] * 9 / 4)
    assert p4.phases["train"]["logits"] == 0  # scalar head, no vocabulary logits
    assert p4.models[0].params_total == count_params(m, "scalar")
