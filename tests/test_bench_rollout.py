"""bench/rollout.py runs end to end on a tiny model (all three parts, PP=2 on gloo) and writes
its keys; continuous batching and static batches produce the same tokens. No speed is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rollout_bench_smoke(tmp_path):
    out = tmp_path / "rollout.json"
    cmd = [sys.executable, str(ROOT / "bench" / "rollout.py"), "--preset", "tiny", "--seq-length", "48", "--batch", "4",
           "--prompt-mean", "8", "--max-new-tokens", "6", "--eos-prompts", "6", "--slots", "2", "--eos-mean", "3",
           "--repeats", "1", "--skip-before", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for part in ("pp1", "eos", "pp2"):
        assert "error" not in result[part], result[part]
    for shape in ("equal", "varied"):
        assert result["pp1"][shape]["ours"]["tokens"] == 4 * 6 == result["pp1"][shape]["transformers"]["tokens"]
    assert result["eos"]["same_tokens"] is True
    assert result["eos"]["refill"]["tokens"] == sum(result["eos"]["response_lengths"])
    for shape in ("equal", "varied"):
        assert result["pp2"][shape]["ours"]["tokens"] == result["pp2"][shape]["ours_one_group"]["tokens"] == 4 * 6
    assert "| continuous batching" in proc.stdout


def test_dynamic_part_rows(tmp_path):
    """The GPU-only ``dynamic`` part's README rows, from a result of the shape ``child_dynamic``
    writes (made up here: the part itself needs CUDA and flash-attn)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import rollout as bench_rollout

    def timed(times, tokens):
        return {"times_s": times, "tokens": tokens, "best_s": min(times), "tokens_per_s": tokens / min(times)}

    shape = {"builtin": timed([2.0, 2.2], 1024), "dynamic": timed([1.0, 1.0], 1024)}
    result = {"device": "NVIDIA H200", "shape": {"num_layers": 4, "hidden_size": 256, "flavour": "llama", "vocab_size": 32000},
              "config": {"batch": 16, "prompt_mean": 96, "max_new_tokens": 64, "eos_prompts": 64, "slots": 16},
              "dynamic": {"precision": "bf16", "kv_buffer_gib": 0.01, "equal": shape, "varied": shape, "eos": shape}}
    rows = bench_rollout.rows(result)
    assert len(rows) == 3
    assert rows[0] == ("| rollout on NVIDIA H200, bf16, 16 prompts equal (mean 96), 64 new, 4x256 llama, V=32000 | builtin 512 tok/s, "
                       "dynamic 1024 tok/s | dynamic / builtin **2.00x** (paired median 2.20x) |")
    assert "64 prompts, 16 in flight, eos-varied responses" in rows[2]
