"""FP8 training (Transformer Engine, hybrid recipe: E4M3 forward, E5M2 gradients) stays
finite and tracks BF16: the tiny SFT task, 30 steps each, same seed, same data, both with
TE's layer spec (so FP8 is the only difference).

Close means: the mean training loss of the last 5 steps within 5% (relative) of BF16's.
FP8 rounds GEMM inputs to 3 (E4M3) or 2 (E5M2) mantissa bits with per-tensor scales; on a
2-layer model over 30 steps that moves the loss by about a percent, while a broken scale
(amax history not updated, a wrong recipe) sends it to inf/NaN or leaves it near ln V.
"""

from __future__ import annotations

import statistics

import pytest

from gpu_utils import QUIET, SFT_YAML, all_finite, cli, ok, series

pytestmark = [pytest.mark.gpu, pytest.mark.needs_te, pytest.mark.needs_fp8]

STEPS = 30
COMMON = [*QUIET, f"train.max_steps={STEPS}", "train.eval_interval=0", "data.valid_path=", "train.save_interval=0",
          "model.transformer_impl=transformer_engine", "model.precision=bf16"]


def test_fp8_hybrid_step_is_finite_and_close_to_bf16(tmp_path):
    runs = {}
    for name, extra in (("bf16", []), ("fp8", ["model.fp8=hybrid", "model.fp8_recipe=delayed"])):
        out = tmp_path / name
        proc = cli("sft", "--config", SFT_YAML, *COMMON, *extra, f"output_dir={out}")
        assert proc.returncode == 0, ok(proc)
        runs[name] = series(out, "train/loss")
        assert sorted(runs[name]) == list(range(1, STEPS + 1)), f"{name}: steps logged {sorted(runs[name])}"
        assert all_finite(runs[name].values()), f"{name}: non-finite loss {runs[name]}"
        assert not [r for r in series(out, "grad_norm").values() if r != r], f"{name}: NaN gradient norm"
    bf16, fp8 = (statistics.mean(runs[n][s] for s in range(STEPS - 4, STEPS + 1)) for n in ("bf16", "fp8"))
    assert abs(fp8 - bf16) <= 0.05 * bf16, f"last-5-step mean loss: fp8 {fp8:.4f} vs bf16 {bf16:.4f}"
    assert fp8 < 0.8 * runs["fp8"][1], f"FP8 did not learn: step 1 {runs['fp8'][1]:.3f}, last steps {fp8:.3f}"
