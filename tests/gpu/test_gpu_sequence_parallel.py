"""Sequence parallelism (SP) on GPUs, with Transformer Engine's layer spec.

Megatron-Core splits the sequence over the tensor-parallel ranks, so SP needs TP > 1:
* one GPU (TP=1): ``parallel.sequence_parallel=true`` must be refused before any work with
  a one-line error naming the key and the fix (Megatron's own check raises a bare
  ValueError from inside TransformerConfig);
* two GPUs: TP=2 with SP trains SFT and then the reward model (whose scalar head gathers the
  sequence) to the same losses as TP=1, within 2e-2 relative (BF16, different reduction
  orders), 5 steps each.
"""

from __future__ import annotations

import pytest

from gpu_utils import QUIET, SFT_YAML, all_finite, cli, ok, series, torchrun

pytestmark = pytest.mark.gpu

SHORT = [*QUIET, "train.max_steps=5", "train.eval_interval=0", "data.valid_path=", "model.precision=bf16",
         "model.transformer_impl=transformer_engine", "model.hidden_dropout=0.0"]


def test_sequence_parallel_at_tp1_is_refused_clearly(tmp_path):
    proc = cli("sft", "--config", SFT_YAML, *SHORT, "parallel.sequence_parallel=true", f"output_dir={tmp_path}")
    assert proc.returncode == 2, ok(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert "parallel.sequence_parallel" in last and "tensor_model_parallel_size" in last, last


@pytest.mark.needs_te
@pytest.mark.needs_gpus(2)
def test_sequence_parallel_tp2_matches_tp1(tmp_path):
    losses = {}
    for name, launch, layout in (("tp1", cli, []),
                                 ("tp2_sp", lambda *a: torchrun(2, *a),
                                  ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"])):
        sft = tmp_path / name / "sft"
        proc = launch("sft", "--config", SFT_YAML, *SHORT, *layout, f"output_dir={sft}")
        assert proc.returncode == 0, ok(proc)
        rm = tmp_path / name / "rm"
        proc = launch("rm", "--config", "examples/tiny/rm.yaml", *SHORT, *layout, f"model.init_from={sft}", f"output_dir={rm}")
        assert proc.returncode == 0, ok(proc)
        losses[name] = {"sft": series(sft, "train/loss"), "rm": series(rm, "train/loss")}
    for stage in ("sft", "rm"):
        tp1, sp = losses["tp1"][stage], losses["tp2_sp"][stage]
        assert sorted(sp) == sorted(tp1) == [1, 2, 3, 4, 5] and all_finite(sp.values())
        for step in tp1:
            assert sp[step] == pytest.approx(tp1[step], rel=2e-2), (stage, step, tp1, sp)
