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
