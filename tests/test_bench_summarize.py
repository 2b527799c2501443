"""bench/summarize.py, which turns the GPU acceptance results (bench/gpu_acceptance.sh) into
README rows, the planner comparison and the target verdicts, checked on CPU: on the committed
CPU smoke results and on GPU results made from them (device, shape, figures replaced), so the
first GPU session finds the summary working. No torch: JSON and the planner only."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import summarize  # noqa: E402

SFT_CPU = ROOT / "bench/results/sft_tiny_llama_fp32_rc-none_cpu.json"
PPO_CPU = ROOT / "bench/results/ppo_tiny_llama_fp32_b4_n8_cpu.json"
GIB = 2**30


def _gpu(result: dict, **model) -> dict:
    """A copy of a CPU result as if measured on an H200 at a 1.3B-like shape."""
    r = copy.deepcopy(result)
    r.update(device="NVIDIA H200", date="2026-12-24", device_info={"device": "NVIDIA H200", "memory_gb": 150.0})
    r["versions"] = {k: v for k, v in r["versions"].items() if k != "transformer-engine"}
    r["config"]["model"].update(num_layers=24, hidden_size=2048, num_attention_heads=16, num_query_groups=None,
                                vocab_size=32000, precision="bf16", **model)
    r["config"].update(precision="bf16", preset="1.3b")
    return r


def _sft(mfu, tokens, fp8=False, peak=None):
    r = _gpu(json.loads(SFT_CPU.read_text()), seq_length=2048)
    r["config"].update(fp8=fp8, micro_batch_size=4)
    r["ours"].update(mfu=mfu, tflops=mfu * 989, tokens_per_s=tokens, peak_memory_bytes=peak or 30 * GIB,
                     peak_memory_reserved_bytes=(peak or 30 * GIB) + GIB)
    if fp8:
        r["baseline"] = None
    return r


def _ppo(speedup, roofline):
    r = _gpu(json.loads(PPO_CPU.read_text()), seq_length=640)
    r["config"].update(batch=64, prompt_length=128, max_new_tokens=512, micro_batch_size=8)
    r["ours"]["decode_roofline"]["roofline_fraction"] = roofline
    r["ours"].update(peak_memory_bytes=60 * GIB, peak_memory_reserved_bytes=64 * GIB)
    r.update(speedup_vs_baseline=speedup, decode_roofline_fraction=roofline)
    return r


def _write(tmp_path, **results):
    paths = []
    for name, result in results.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(result))
        paths.append(str(path))
    return paths


def test_cpu_results_give_smoke_rows_and_no_claims(capsys):
    assert summarize.main([str(SFT_CPU), str(PPO_CPU)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "(CPU smoke)" in line]
    assert len(rows) == 2 and all(row.count("|") == 8 for row in rows)  # the README's 7 columns
    assert rows[0].startswith("| SFT tiny Llama") and rows[1].startswith("| PPO-ptx iteration tiny Llama")
    assert "no GPU results" in out
    assert out.count(": n/a [no GPU result]") == 4


def test_planner_error_is_planned_minus_measured_over_measured(tmp_path):
    sft = _sft(0.4, 20000.0)
    plan = summarize.planned(sft)
    phase = plan.phases[plan.peak_phase]
    parts = phase["total"] - phase["overhead"]  # the planner without its overhead term
    exact = summarize.memory_row(_sft(0.4, 20000.0, peak=int(parts)))
    assert exact["error"] == pytest.approx(0.0, abs=1e-9) and exact["within"]
    low = summarize.memory_row(_sft(0.4, 20000.0, peak=int(parts / 1.2)))
    assert low["error"] == pytest.approx(0.2, rel=1e-6) and not low["within"]
    assert "(> 15%)" in summarize.memory_line(low)
    assert summarize.memory_row(json.loads(SFT_CPU.read_text())) is None  # CPU peaks are resident set sizes
    ppo = summarize.memory_row(_ppo(3.2, 0.6))
    assert ppo["phase"] in ("rollout", "scoring", "train") and ppo["planned"] > 0


def test_targets_met_and_missed(tmp_path, capsys):
    paths = _write(tmp_path, bf16=_sft(0.42, 20000.0), fp8=_sft(0.6, 28000.0, fp8=True), ppo=_ppo(3.5, 0.3))
    assert summarize.main(paths) == 0
    out = capsys.readouterr().out
    assert "- SFT BF16 MFU: 42.0% (target >= 50.0%): MISSED [NVIDIA H200, 2026-12-24]" in out
    assert "- SFT FP8 / BF16 tokens/s: 1.40 (target >= 1.35): met" in out
    assert "- PPO iteration speed-up vs transformers: 3.50 (target >= 3.00): met" in out
    assert "- PPO decoding, fraction of HBM roofline: 30.0% (target >= 50.0%): MISSED" in out
    assert "| SFT 1.3B Llama" in out and "FP8 (TE hybrid)" in out and "decode 30% of HBM roofline" in out


def _table(lines: list) -> tuple:
    """(index of the header row, index after the last row) of the table under '## Performance'."""
    start = lines.index("## Performance")
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    end = next(i for i in range(header, len(lines)) if not lines[i].startswith("|"))
    return header, end


def test_readme_table_is_rewritten_in_place(tmp_path):
    readme = tmp_path / "README.md"
    original = (ROOT / "README.md").read_text().splitlines()
    readme.write_text("\n".join(original) + "\n")
    paths = _write(tmp_path, bf16=_sft(0.42, 20000.0), ppo=_ppo(3.5, 0.3)) + [str(SFT_CPU)]
    assert summarize.main(["--readme", str(readme), *paths]) == 0
    new = readme.read_text().splitlines()
    header, end = _table(new)
    rows = new[header + 2 : end]
    assert len(rows) == 4, rows
    assert rows[0].startswith("| SFT 1.3B Llama") and "NVIDIA H200" in rows[0]
    assert rows[1].startswith("| PPO-ptx iteration 1.3B Llama") and "NVIDIA H200" in rows[1]
    assert "not measured yet (Transformer Engine was not installed: NVIDIA H200, 2026-12-24)" in rows[2]
    assert rows[2].startswith("| SFT 1.3B Llama, FP8 (TE hybrid)")
    assert "(CPU smoke)" in rows[3]
    old_header, old_end = _table(original)
    assert new[:header] == original[:old_header] and new[end:] == original[old_end:]  # the rest is untouched


def test_the_documented_command_reads_every_committed_result(capsys):
    """`python bench/summarize.py bench/results/*.json` (bench/README.md): the rollout and packing
    results, which have their own rows, are skipped with a note instead of stopping it."""
    files = sorted(str(p) for p in (ROOT / "bench" / "results").glob("*.json"))
    assert summarize.main(files) == 0
    out, err = capsys.readouterr()
    assert "| SFT tiny Llama" in out and "a 'rollout' result, not part of these tables; skipped" in err
