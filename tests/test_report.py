"""Tests for `megatron-rlhf report` (megatron_rlhf.report) on a synthetic three-stage run."""
import json
import math
import os
import re
import struct
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

pytest.importorskip("matplotlib")
from megatron_rlhf.commands.report import KNOWN_METRICS, main, make_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _value(key, step):
    """Deterministic, curve-like values with enough digits to test formatting."""
    x = step / 100
    if "accuracy" in key:
        return 0.5 + 0.4 * (1 - math.exp(-x))
    if key == "eval/loss":  # overfits: the best value is not the last one
        return 1.0 + (x - 0.4) ** 2
    if "loss" in key:
        return 2.0 * math.exp(-x) + 0.3 + 0.01 * math.sin(step)
    if key == "lr":
        return 3e-5 * min(1.0, step / 20)
    return 10 * math.sin(x) + len(key)


def write_stage(root, stage, steps=120, eval_every=20, extra=None):
    d = root / stage
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            row = {"step": step}
            for key in KNOWN_METRICS[stage]:
                if key.startswith("eval/") and step % eval_every:
                    continue  # eval lines only every eval_every steps
                row[key] = _value(key, step)
            if step % eval_every and stage == "rm":
                row["eval/loss"] = None  # some loggers write null for "not this step"
            if extra and step % 10 == 0:
                row.update(extra(step))
            f.write(json.dumps(row) + "\n")
    (d / "config.yaml").write_text(f"stage: {stage}\nmodel:\n  hidden_size: 64\n  num_layers: 2\nlr: 3.0e-5\n")
    return d


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "run1"
    write_stage(root, "sft")
    write_stage(root, "rm", steps=60, eval_every=15)
    write_stage(root, "ppo", steps=40, extra=lambda s: {"custom/foo": s * 0.5, "note": "text"})
    return root


def last_values(path):
    last = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    last[k] = (row["step"], v)
    return last


def parse_summary(text):
    """{STAGE: {metric: (final, step, best)}} from the tables in summary.md."""
    out, stage = {}, None
    for line in text.splitlines():
        m = re.match(r"## (\w+) ", line)
        if m:
            stage = out.setdefault(m.group(1).lower(), {})
        m = re.match(r"\| `([^`]+)` \| ([^|]+) \| ([^|]+) \| ([^|]*) \|", line)
        if m:
            stage[m.group(1)] = (float(m.group(2)), float(m.group(3)), m.group(4).strip())
    return out


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_report_three_stages(run_dir, capsys):
    assert main([str(run_dir)]) == 0
    out = run_dir / "report"
    for stage in ("sft", "rm", "ppo"):
        png = out / f"{stage}.png"
        assert png.exists() and png.stat().st_size > 20_000
        w, h = png_size(png)
        assert w >= 800 and h >= 300
    summary = (out / "summary.md").read_text()
    tables = parse_summary(summary)
    assert list(tables) == ["sft", "rm", "ppo"]
    for stage in ("sft", "rm", "ppo"):
        expected = last_values(run_dir / stage / "metrics.jsonl")
        assert set(tables[stage]) == set(expected), stage
        for key, (step, val) in expected.items():
            final, at_step, _ = tables[stage][key]
            assert final == pytest.approx(val, rel=1e-5, abs=1e-12), (stage, key)
            assert at_step == step
        assert f"![{stage} metrics]({stage}.png)" in summary
        assert f"stage: {stage}\nmodel:\n  hidden_size: 64" in summary  # config embedded verbatim
    # best eval values: min loss, max accuracy, over eval steps only
    rm_rows = [json.loads(line) for line in open(run_dir / "rm" / "metrics.jsonl")]
    best_loss = min(r["eval/loss"] for r in rm_rows if r.get("eval/loss") is not None)
    best_acc = max(r["eval/accuracy"] for r in rm_rows if "eval/accuracy" in r)
    assert tables["rm"]["eval/loss"][2] == "min 1.0025 @ step 45"
    assert float(tables["rm"]["eval/loss"][2].split()[1]) == pytest.approx(best_loss, rel=1e-5)
    assert tables["sft"]["eval/loss"][2] == "min 1 @ step 40" and tables["sft"]["eval/loss"][0] > 1.5
    assert tables["rm"]["eval/accuracy"][2].startswith("max ")
    assert float(tables["rm"]["eval/accuracy"][2].split()[1]) == pytest.approx(best_acc, rel=1e-5)
    assert tables["rm"]["train/loss"][2] == ""
    assert "- steps: 60 distinct (1 to 60)" in summary
    assert "`custom/foo`" in summary and "Non-numeric keys (not plotted): `note`" in summary
    assert "summary.md" in capsys.readouterr().out


def test_single_stage_dir_and_missing_stages(tmp_path):
    root = tmp_path / "run2"
    write_stage(root, "rm", steps=10, eval_every=5)
    summary, pngs = make_report(str(root / "rm"), str(tmp_path / "out"))
    assert [os.path.basename(p) for p in pngs] == ["rm.png"]
    assert "## RM" in open(summary).read()
    summary, pngs = make_report(str(root))  # only rm/ present
    assert len(pngs) == 1 and "## SFT" not in open(summary).read()


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    d = write_stage(tmp_path / "run3", "sft", steps=5)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/loss": 1.0\n')
    assert main([str(tmp_path / "run3")]) == 2
    err = capsys.readouterr().err
    assert f"{d / 'metrics.jsonl'}:6: not valid JSON" in err
    (d / "metrics.jsonl").write_text('{"train/loss": 1.0}\n')
    assert main([str(tmp_path / "run3")]) == 2
    assert ':1: missing or non-numeric "step"' in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_related_curves_share_a_panel_and_one_offs_are_not_plotted(tmp_path):
    from megatron_rlhf.commands.report import find_stages, line_label

    root = tmp_path / "run4"
    d = write_stage(root, "rm", steps=30, eval_every=10,
                    extra=lambda s: {"train/chosen_reward": s * 0.1, "train/rejected_reward": -s * 0.1, "train/margin": s * 0.2,
                                     "train/foo": 1.0, "eval/foo": 2.0})
    with open(d / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 30, "rm/bias": -0.25}) + "\n")  # a one-off, as the RM logs its normalisation
    (stage,) = find_stages(str(root))
    panels = {p.title: p.keys for p in stage.panels()}
    assert panels["loss: training vs held-out"] == ["train/loss", "eval/loss"]
    assert panels["pair accuracy: training vs held-out"] == ["train/accuracy", "eval/accuracy"]
    assert panels["reward of chosen vs rejected"] == ["train/chosen_reward", "train/rejected_reward",
                                                      "eval/chosen_reward", "eval/rejected_reward"]
    assert panels["chosen - rejected reward (margin)"] == ["train/margin", "eval/margin"]
    assert panels["foo: training vs held-out"] == ["train/foo", "eval/foo"]
    plotted = [k for keys in panels.values() for k in keys]
    assert len(plotted) == len(set(plotted)) and "rm/bias" not in plotted
    assert set(plotted) | {"rm/bias"} == stage.keys()  # every metric is plotted once, or is the one-off
    assert [line_label(k, panels["reward of chosen vs rejected"]) for k in panels["reward of chosen vs rejected"]] == [
        "chosen (training)", "rejected (training)", "chosen (held-out)", "rejected (held-out)"]
    assert line_label("eval/loss", ["train/loss", "eval/loss"]) == "held-out"

    summary, pngs = make_report(str(root))
    text = open(summary).read()
    assert "| `rm/bias` | -0.25 | 30 |  |" in text
    assert "Logged at one step only (in the table, not plotted): `rm/bias`" in text
    assert png_size(pngs[0])[0] >= 800
