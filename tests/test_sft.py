"""SFT stage: the loss mask, exact resume after a kill, bad inputs, the tiny example."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import run_single

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "train.progress_bar=false", "train.tensorboard=false"]


def cli(*args, cwd=ROOT, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_rlhf", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _mask_losses():
    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.data import SftExample, collate_sft
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.recipes.sft import forward_step

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=32)
    init_distributed(ParallelConfig(), cfg)
    model = build_model(cfg, ParallelConfig(), 64, seed=0).eval()
    example = SftExample([1, 10, 11, 12, 13], [20, 21, 22, 2])  # [bos]+prompt, response+[eos]
    batch = collate_sft([example], pad_id=0)

    def loss(b):
        with torch.no_grad():
            out, fn = forward_step(model, b, vocab_size=64)
            s, n, _ = fn(out)
        return (s / n).item()

    base = loss(batch)
    prompt_target = batch.labels.clone()
    prompt_target[0, 1] = 40  # the target at position 1 is a prompt token
    response_target = batch.labels.clone()
    response_target[0, 5] = 40  # position 5 predicts a response token
    pad_target = batch.labels.clone()
    pad_target[0, 10] = 40  # padding
    return base, loss(batch._replace(labels=prompt_target)), loss(batch._replace(labels=response_target)), loss(batch._replace(labels=pad_target)), batch.loss_mask[0].tolist()


def test_loss_covers_response_tokens_only():
    base, prompt_changed, response_changed, pad_changed, mask = run_single(_mask_losses)
    assert mask[:4] == [False] * 4 and mask[4:8] == [True] * 4 and not any(mask[8:])
    assert prompt_changed == base
    assert pad_changed == base
    assert response_changed != base


def _losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_killed_run_resumes_bitwise(tmp_path):
    common = ["sft", "--config", "examples/tiny/sft.yaml", *TINY, "train.max_steps=8", "train.save_interval=4",
              "train.eval_interval=0", "data.valid_path=", "train.global_batch_size=8", "train.micro_batch_size=4", "model.hidden_dropout=0.1"]
    full = tmp_path / "full"
    r = cli(*common, f"output_dir={full}")
    assert r.returncode == 0, r.stderr[-3000:]
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    # slow the second half so the kill lands after the step-4 checkpoint and before the end
    proc = subprocess.Popen([sys.executable, "-m", "megatron_rlhf", *common, f"output_dir={killed}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() == "iter_0000004"):
        assert proc.poll() is None or latest.exists(), proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "iter_0000004" / "meta.json").exists()
    r = cli(*common, f"output_dir={killed}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    expected, got = _losses(full), _losses(killed)
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bitwise: exact float equality of every step's loss


def test_bad_inputs_have_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    r = cli("sft", "--config", "examples/tiny/sft.yaml", f"data.train_path={bad}", f"output_dir={tmp_path}/o1")
    assert r.returncode == 2 and f"{bad}:2" in r.stderr

    r = cli("sft", "--config", "examples/tiny/sft.yaml", "train.learning_rate=1e-3")
    assert r.returncode == 2 and "unknown config key 'train.learning_rate'" in r.stderr and "train.lr" in r.stderr

    r = cli("sft", "--config", "examples/tiny/sft.yaml", "parallel.tensor_model_parallel_size=3", f"output_dir={tmp_path}/o2")
    assert r.returncode == 2 and "does not divide model.num_attention_heads=4" in r.stderr

    r = cli("sft", "--config", "examples/tiny/sft.yaml", f"model.init_from={tmp_path}/nope", f"output_dir={tmp_path}/o3")
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "nope" in r.stderr

    r = cli("sft", "--config", "examples/tiny/sft.yaml", "model.vocab_size=1000", f"output_dir={tmp_path}/o4")
    assert r.returncode == 2 and "model.vocab_size=1000" in r.stderr and "512" in r.stderr


def test_tokenizer_mismatch_with_init_checkpoint(tmp_path):
    from megatron_rlhf.data import train_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"word{i} other{i % 7} thing" for i in range(300)))
    train_tokenizer([str(text)], 300, str(tmp_path / "other"))
    sft = tmp_path / "sft"
    r = cli("sft", "--config", "examples/tiny/sft.yaml", *TINY, "train.max_steps=1", "data.valid_path=", f"output_dir={sft}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("sft", "--config", "examples/tiny/sft.yaml", *TINY, "train.max_steps=1", "data.valid_path=",
            f"model.init_from={sft}", f"model.tokenizer={tmp_path}/other.model", f"output_dir={tmp_path}/o5")
    assert r.returncode == 2 and "tokenizer mismatch" in r.stderr and "tokenizer.model" in r.stderr


def test_tiny_example_halves_eval_loss(tmp_path):
    start = time.time()
    # the example's first two of six epochs (its whole run is examples/tiny/run.sh's job)
    r = cli("sft", "--config", "examples/tiny/sft.yaml", "train.progress_bar=false", "train.max_steps=124", f"output_dir={tmp_path}")
    elapsed = time.time() - start
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [json.loads(l)["eval/loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval/loss" in l]
    assert evals[-1] <= 0.5 * evals[0], evals
    assert elapsed < 300
    assert (tmp_path / "checkpoints" / "best").read_text().strip().startswith("iter_")
    for key in ("train/loss", "lr", "tokens_per_s"):
        assert key in (tmp_path / "metrics.jsonl").read_text()
    assert (tmp_path / "config.yaml").exists()
