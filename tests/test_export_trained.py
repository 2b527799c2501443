"""Export what training writes: the tiny pipeline's real SFT, RM and PPO checkpoints (with
their optimizer state) convert to Hugging Face folders whose outputs match ours.

One module fixture runs `megatron-rlhf sft`, then `rm` from it, then `ppo` from both, each
for a step or two on a small model, and exports the SFT policy, the reward model, the PPO
actor (a causal LM) and the PPO critic (a ...ForSequenceClassification) through
tools/convert_to_hf.py. Then a damaged checkpoint fails in one line, naming the file, and
no export ever leaves a partial output folder.
"""

from __future__ import annotations

import dataclasses
import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dist_utils import run_single  # noqa: E402
from test_ppo import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=32", "model.seq_length=40", "train.progress_bar=false", "train.tensorboard=false"]
# (export name, run, --network, scalar head, HF class, kinds recorded in meta.json)
EXPORTS = [
    ("sft", "sft", None, False, "GPT2LMHeadModel", {"model": "policy"}),
    ("rm", "rm", None, True, "GPT2ForSequenceClassification", {"model": "reward"}),
    ("actor", "ppo", None, False, "GPT2LMHeadModel", {"actor": "policy", "critic": "critic"}),
    ("critic", "ppo", "critic", True, "GPT2ForSequenceClassification", {"actor": "policy", "critic": "critic"}),
]


def _to_hf(*argv) -> int:
    return runpy.run_path(str(ROOT / "tools/convert_to_hf.py"))["main"]([str(a) for a in argv])


def _our_outputs(root, ids):
    """Our model's full-vocabulary logits (policies) or last-token values (scalar heads)."""
    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.convert.common import model_config_from_meta
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed
    from megatron_rlhf.checkpoint import io as ck

    init_distributed(ParallelConfig(), ModelConfig())
    out = {}
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    for name, run, network, scalar, _, _ in EXPORTS:
        ckpt = ck.resolve_checkpoint(Path(root) / run)
        meta = ck.read_meta(ckpt)
        cfg = dataclasses.replace(model_config_from_meta(meta), precision="fp32", transformer_impl="local")
        net = build_model(cfg, ParallelConfig(), meta["vocab_size"], scalar_head=scalar, seed=3)
        ck.load_weights(net, ckpt, name=network or ck.check_kind(ckpt, meta, ("policy", "reward")))
        with torch.no_grad():
            y = net.eval()(ids, pos, None)
        out[name] = y[:, -1, 0] if scalar else y[..., : meta["vocab_size"]]
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    steps = [
        ["sft", "--config", "examples/tiny/sft.yaml", *SMALL, "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=8",
         "data.valid_path=", f"output_dir={root / 'sft'}"],
        ["rm", "--config", "examples/tiny/rm.yaml", *SMALL, f"model.init_from={root / 'sft'}", "train.max_steps=2", "train.global_batch_size=4",
         "train.micro_batch_size=4", "data.valid_path=", "rm.demonstrations_path=examples/tiny/data/sft_valid.jsonl", f"output_dir={root / 'rm'}"],
        ["ppo", "--config", "examples/tiny/ppo.yaml", *SMALL, f"model.init_from={root / 'sft'}", f"ppo.reward_model={root / 'rm'}",
         "train.max_steps=1", "train.global_batch_size=8", "train.micro_batch_size=8", "ppo.mini_batch_size=8", "ppo.max_new_tokens=8",
         "ppo.critic_warmup_steps=0", f"output_dir={root / 'ppo'}"],
    ]
    for args in steps:
        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    codes = {}
    for name, run, network, *_ in EXPORTS:
        codes[name] = _to_hf(root / run, root / f"hf_{name}", "--no-progress", *(["--network", network] if network else []))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 300, (3, 24), generator=g)  # no pad id (0): HF scores the last position
    ids[:, 0] = 1
    return {"root": root, "codes": codes, "ids": ids, "ours": run_single(_our_outputs, str(root), ids)}


@pytest.mark.parametrize("name", [e[0] for e in EXPORTS])
def test_trained_checkpoint_exports_and_matches(pipeline, name):
    _, run, network, scalar, cls, kinds = next(e for e in EXPORTS if e[0] == name)
    root = pipeline["root"]
    from megatron_rlhf.checkpoint import io as ck

    ckpt = ck.resolve_checkpoint(root / run)
    meta = ck.read_meta(ckpt)
    assert meta["network_kinds"] == kinds
    from megatron_rlhf.convert.dist_reader import DistCheckpointReader

    reader = DistCheckpointReader(ckpt / (network or ("actor" if run == "ppo" else "model")))
    assert any(k.startswith("optimizer.") for k in reader.tensors), "training checkpoints hold optimizer state: the case under test"
    assert pipeline["codes"][name] == 0
    out = root / f"hf_{name}"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [cls]
    assert config["megatron_rlhf"]["kind"] == kinds[network or next(iter(kinds))]
    ids = pipeline["ids"]
    auto = transformers.AutoModelForSequenceClassification if scalar else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(ids).logits
    ours = pipeline["ours"][name]
    theirs = theirs[:, 0] + config.get("rlhf_score_bias", 0.0) if scalar else theirs
    diff = (theirs - ours).abs().max().item()
    print(f"{name}: exported {cls} vs ours, max |diff| {diff:.2e} (scale {ours.abs().max().item():.2f})")
    assert ours.abs().max().item() > 1e-2
    assert diff < 1e-5


def test_damaged_shard_fails_in_one_line_and_leaves_no_folder(pipeline, tmp_path, capsys):
    run = shutil.copytree(pipeline["root"] / "sft", tmp_path / "sft")
    ckpt = next((run / "checkpoints").glob("iter_*"))
    shard = sorted((ckpt / "model").glob("*.distcp"))[0]
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 3)
    out = tmp_path / "out"
    capsys.readouterr()
    assert _to_hf(ckpt, out, "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(shard) in err[0] and "truncated" in err[0] and "copy the checkpoint again" in err[0], err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sft"]
    # the run folder (whose `latest` names the damaged checkpoint): the same line
    assert _to_hf(run, out, "--no-progress") == 2
    assert capsys.readouterr().err.strip().splitlines() == err
    # without `latest` the run folder has no complete checkpoint left, said as such
    (run / "checkpoints" / "latest").unlink()
    assert _to_hf(run, out, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "none is complete" in err and str(shard) in err
    # a garbled .metadata
    (ckpt / "model" / ".metadata").write_bytes(b"\x80\x04garbage")
    assert _to_hf(ckpt, out, "--no-progress") == 2
    assert ".metadata is unreadable" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


def test_failure_mid_export_keeps_the_previous_folder(pipeline, tmp_path, monkeypatch, capsys):
    """A failure while writing (here: the third tensor) leaves neither a partial folder nor a
    damaged previous export (--overwrite replaces it only once the new one is complete)."""
    from megatron_rlhf.convert import to_hf

    out = tmp_path / "out"
    shutil.copytree(pipeline["root"] / "hf_sft", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = to_hf.hf_tensors

    def failing(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise OSError(28, "No space left on device")
            yield item

    monkeypatch.setattr(to_hf, "hf_tensors", failing)
    with pytest.raises(OSError, match="No space"):
        to_hf.convert_to_hf(pipeline["root"] / "sft", out, overwrite=True, progress=False)
    with pytest.raises(OSError, match="No space"):
        to_hf.convert_to_hf(pipeline["root"] / "sft", tmp_path / "new", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    capsys.readouterr()
    assert _to_hf(pipeline["root"] / "sft", out, "--overwrite", "--no-progress") == 2  # the command line: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and f"{out} was left as it was" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(to_hf, "hf_tensors", real)
    to_hf.convert_to_hf(pipeline["root"] / "sft", out, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "model.safetensors").read_bytes() == before["model.safetensors"]
