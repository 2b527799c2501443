"""Nothing lost: every fault is injected and the rerun observed.

* resume discovery: a missing or dangling ``latest``, a newest checkpoint without meta.json
  or with a truncated shard fall back to the previous complete one with a warning naming
  both; folders none of which is usable refuse a silent restart;
* atomic saves: a failure at every step of a save or re-save (the reward model re-saves its
  final iteration), and SIGKILLs at random moments of a save loop (several seeds), never
  leave a good checkpoint missing, ``best`` never dangles, and the rerun resumes bitwise;
* checkpoint kinds are recorded and checked with a fix in the message;
* ``metrics.jsonl``: a torn last line and the steps past the resumed one are moved aside,
  not lost; the file is cut, never rewritten;
* no checkpoint-writer process outlives a trainer killed with SIGKILL mid-save.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import free_port, run_single

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- helpers (spawned)


def _tiny_model():
    from megatron_rlhf.config import ModelConfig, ParallelConfig
    from megatron_rlhf.models.builder import build_model
    from megatron_rlhf.parallel import init_distributed

    cfg = ModelConfig(flavour="gpt2", num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, hidden_dropout=0.0, attention_dropout=0.0)
    init_distributed(ParallelConfig(), cfg)
    return build_model(cfg, ParallelConfig(), 64, seed=1)


def _fill(model, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _value(model) -> float:
    values = {float(v) for p in model.parameters() for v in p.detach().flatten().unique()}
    assert len(values) == 1, values
    return values.pop()


def _save(ck, root, model, iteration, value, kind="policy"):
    _fill(model, value)
    return ck.save_checkpoint(root, iteration, {"model": model}, {"kind": kind, "value": value}, state={"value": value})


class _FailAt:
    """Stands in for ``os`` / ``shutil`` inside the checkpoint module: the ``n``-th call of a
    file operation raises, as if the job were killed there (the call does nothing)."""

    def __init__(self, module, names, counter):
        self._module, self._names, self._counter = module, names, counter

    def __getattr__(self, name):
        real = getattr(self._module, name)
        if name not in self._names:
            return real

        def call(*args, **kwargs):
            self._counter["calls"] += 1
            if self._counter["calls"] == self._counter["fail_at"]:
                self._counter["killed_at"] = f"{name} {Path(args[0]).name}"
                raise KeyboardInterrupt(self._counter["killed_at"])
            return real(*args, **kwargs)

        return call


def _worker_discovery_and_failures(root):
    """Resume discovery on damaged folders, then a failure injected at every file operation
    of a new save and of a re-save of the newest iteration; returns what was observed."""
    import os as real_os
    import shutil as real_shutil

    from megatron_rlhf.checkpoint import io as ck

    root = Path(root)
    model = _tiny_model()
    seen = {}

    # --- discovery
    d = root / "discovery"
    for it in (1, 2, 3):
        _save(ck, d, model, it, float(it))
    ck.mark_best(d, d / "iter_0000002")
    warnings = []
    seen["intact"] = ck.find_resume_checkpoint(d, warnings.append).name
    seen["intact_warnings"] = list(warnings)
    (d / "latest").unlink()
    warnings.clear()
    seen["no_latest"] = (ck.find_resume_checkpoint(d, warnings.append).name, list(warnings))
    (d / "latest").write_text("iter_0000009\n")
    warnings.clear()
    seen["dangling_latest"] = (ck.find_resume_checkpoint(d, warnings.append).name, list(warnings))
    (d / "latest").write_text("iter_0000003\n")
    meta3 = (d / "iter_0000003" / "meta.json").read_bytes()
    (d / "iter_0000003" / "meta.json").unlink()
    warnings.clear()
    seen["no_meta"] = (ck.find_resume_checkpoint(d, warnings.append).name, list(warnings))
    (d / "iter_0000003" / "meta.json").write_bytes(meta3)
    shard = sorted((d / "iter_0000003" / "model").glob("*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    warnings.clear()
    seen["truncated"] = (ck.find_resume_checkpoint(d, warnings.append).name, list(warnings))
    shard.write_bytes(data)
    (d / "iter_0000002" / "state.pt").write_bytes(b"garbage")
    (d / "iter_0000003" / "meta.json").write_text("{not json")
    warnings.clear()
    seen["two_damaged"] = (ck.find_resume_checkpoint(d, warnings.append).name, list(warnings))
    (d / "iter_0000001" / "model" / ".metadata").unlink()
    try:
        ck.find_resume_checkpoint(d, warnings.append)
        seen["none_usable"] = None
    except ck.CheckpointError as exc:
        seen["none_usable"] = str(exc)
    moved = ck.start_over(d)
    seen["start_over"] = (moved is not None and (moved / "iter_0000003").is_dir(), ck.find_resume_checkpoint(d), sorted(p.name for p in d.iterdir()))

    # --- a failure at every file operation of a save (new iteration) and a re-save
    results = []
    for case in ("new", "resave"):
        for fail_at in range(1, 40):
            f = root / f"{case}_{fail_at}"
            _save(ck, f, model, 1, 1.0)
            _save(ck, f, model, 2, 2.0)
            ck.mark_best(f, f / "iter_0000002")
            counter = {"calls": 0, "fail_at": fail_at}
            ck.os = _FailAt(real_os, {"replace", "rename"}, counter)
            ck.shutil = _FailAt(real_shutil, {"rmtree", "move"}, counter)
            failed = False
            try:
                if case == "new":
                    _save(ck, f, model, 3, 3.0)
                else:
                    _save(ck, f, model, 2, 2.5)
            except KeyboardInterrupt:
                failed = True
            finally:
                ck.os, ck.shutil = real_os, real_shutil
            if not failed:
                break  # fail_at is past the last file operation: every step has been covered
            # the rerun: what resume and `best` find, and their weights
            found = ck.find_resume_checkpoint(f, lambda _: None)
            best = ck.resolve_checkpoint(f / "best")
            row = {"case": case, "killed_at": counter["killed_at"], "found": found.name, "best": best.name}
            for what, path in (("found", found), ("best", best)):
                ck.load_checkpoint(path, {"model": model})
                row[f"{what}_value"] = _value(model)
                row[f"{what}_meta_value"] = ck.read_meta(path)["value"]
            row["iter_1_complete"] = ck.checkpoint_problem(f / "iter_0000001") is None
            # the next save repairs what the interrupted one left
            _save(ck, f, model, 4, 4.0)
            row["after_next_save"] = sorted(p.name for p in f.iterdir())
            results.append(row)
    seen["failures"] = results
    return seen


def test_resume_discovery_and_a_failure_at_every_step_of_a_save(tmp_path):
    seen = run_single(_worker_discovery_and_failures, str(tmp_path))
    assert seen["intact"] == "iter_0000003" and seen["intact_warnings"] == []
    name, warnings = seen["no_latest"]
    assert name == "iter_0000003" and "latest is missing" in warnings[0]
    name, warnings = seen["dangling_latest"]
    assert name == "iter_0000003" and "names iter_0000009" in warnings[0]
    name, warnings = seen["no_meta"]
    assert name == "iter_0000002" and "iter_0000003" in warnings[0] and "meta.json is missing" in warnings[0] and "iter_0000002" in warnings[0]
    name, warnings = seen["truncated"]
    assert name == "iter_0000002" and ".distcp is truncated" in warnings[0]
    name, warnings = seen["two_damaged"]
    assert name == "iter_0000001" and "state.pt is unreadable" in warnings[0] and "iter_0000003 (" in warnings[0]
    assert "none is complete" in seen["none_usable"] and "train.restart=true" in seen["none_usable"] and "new output_dir" in seen["none_usable"]
    assert seen["start_over"] == (True, None, [])

    rows = seen["failures"]
    # every file operation of the commit was interrupted once
    assert [r["killed_at"] for r in rows if r["case"] == "new"] == ["replace iter_0000003.tmp", "replace latest.tmp"]
    assert [r["killed_at"] for r in rows if r["case"] == "resave"] == [
        "replace iter_0000002", "replace iter_0000002.tmp", "replace latest.tmp", "rmtree iter_0000002.old"]
    for r in rows:
        assert r["iter_1_complete"], r
        # weights and metadata agree (a resume is bitwise what was saved)
        assert r["found_value"] == r["found_meta_value"] and r["best_value"] == r["best_meta_value"], r
        if r["case"] == "new":
            assert r["found"] in ("iter_0000002", "iter_0000003") and r["best"] == "iter_0000002" and r["best_value"] == 2.0, r
        else:  # the re-save of iter_2: either copy, never none
            assert r["found"].startswith("iter_0000002") and r["found_value"] in (2.0, 2.5), r
            assert r["best"].startswith("iter_0000002") and r["best_value"] in (2.0, 2.5), r
        assert not [n for n in r["after_next_save"] if n.endswith((".old", ".tmp"))], r
        assert "iter_0000004" in r["after_next_save"], r


# ----------------------------------------------------------------------------- SIGKILL at random moments


def _saver_loop(root, log):
    """Save iteration n, point best at it, re-save it (as the RM folds its bias), forever;
    append "n version seconds" to ``log`` after each save returns."""
    from megatron_rlhf.checkpoint import io as ck

    model = _tiny_model()
    with open(log, "a") as fh:
        fh.write("ready\n")
        fh.flush()
        for n in range(1, 10_000):
            for version in (1, 2):
                t0 = time.perf_counter()
                path = _save(ck, root, model, n, n * 10.0 + version)
                if version == 1:
                    ck.mark_best(root, path)
                fh.write(f"{n} {version} {time.perf_counter() - t0:.3f}\n")
                fh.flush()
                os.fsync(fh.fileno())


def _rerun(roots):
    """What a rerun finds in each killed folder: resume point, its weights, best's, and the
    state after one more save."""
    from megatron_rlhf.checkpoint import io as ck

    model = _tiny_model()
    out = []
    for root in roots:
        root = Path(root)
        found = ck.find_resume_checkpoint(root, lambda _: None)
        row = {"found": None if found is None else found.name}
        if found is not None:
            state = ck.load_checkpoint(found, {"model": model})
            row.update(value=_value(model), meta_value=ck.read_meta(found)["value"], state_value=state["value"])
            row["complete"] = {p.name: ck.checkpoint_problem(p) for p in root.glob("iter_*") if not p.name.endswith(".tmp")}
            if (root / "best").is_file():
                best = ck.resolve_checkpoint(root / "best")
                ck.load_checkpoint(best, {"model": model})
                row.update(best=best.name, best_value=_value(model), best_meta_value=ck.read_meta(best)["value"])
            _save(ck, root, model, 9999, 1.0)
            row["after"] = sorted(p.name for p in root.iterdir())
        out.append(row)
    return out


def _zygote():
    """Import once, then fork one process per line of stdin: "save ROOT LOG" runs
    :func:`_saver_loop` (the test SIGKILLs it), "rerun OUT ROOT..." runs :func:`_rerun` and
    writes its result to OUT. Prints each child's pid. (Forking from one warm interpreter
    keeps the test to one Python start-up instead of one per seed.)"""
    from megatron_rlhf import checkpoint  # noqa: F401  (the slow imports, once)
    from megatron_rlhf.models import builder  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    for line in sys.stdin:
        cmd, *args = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.environ["MASTER_PORT"] = str(free_port())
                if cmd == "save":
                    _saver_loop(*args)
                else:
                    torch.save(_rerun(args[1:]), args[0] + ".tmp")
                    os.replace(args[0] + ".tmp", args[0])
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        print(pid, flush=True)


@pytest.mark.parametrize("seeds", [(1, 5, 7)])  # the kill after save 1, 3, 2 (see the loop)
def test_sigkill_at_random_moments_of_saves(tmp_path, seeds):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    zygote = subprocess.Popen([sys.executable, "-c", "from test_reliability_checkpoint import _zygote; _zygote()"], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def fork(*words) -> int:
        zygote.stdin.write(" ".join(map(str, words)) + "\n")
        zygote.stdin.flush()
        return int(zygote.stdout.readline())

    roots = []
    try:
        for seed in seeds:
            root, log = tmp_path / f"seed{seed}", tmp_path / f"seed{seed}.log"
            pid = fork("save", root, log)
            # the kill lands at a random moment of the save after the k-th (k random in 1..3)
            rng = random.Random(seed)
            saves_before = rng.randint(1, 3)
            deadline = time.time() + 120
            while not (log.is_file() and len(log.read_text().splitlines()) > saves_before):
                assert time.time() < deadline, "the saver did not save"
                time.sleep(0.01)
            last_save_s = float(log.read_text().splitlines()[-1].split()[2])
            time.sleep(rng.uniform(0.0, 1.2) * last_save_s)
            os.kill(pid, signal.SIGKILL)
            done = [tuple(map(int, line.split()[:2])) for line in log.read_text().splitlines()[1:]]
            roots.append((root, done))
        result = tmp_path / "rerun.pt"
        fork("rerun", result, *[r for r, _ in roots])
        deadline = time.time() + 120
        while not result.is_file():
            assert time.time() < deadline, "the rerun did not finish"
            time.sleep(0.05)
        rows = torch.load(result, weights_only=False)
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
    print()
    for (root, done), row in zip(roots, rows):
        last_n, last_v = done[-1]
        print(f"{root.name}: {len(done)} saves returned before the kill; resume from {row['found']} (value {row['value']})")
        # every save that returned is still there, complete; the resume point is the newest
        assert all(problem is None for problem in row["complete"].values()), row["complete"]
        for n, _ in done:
            assert f"iter_{n:07d}" in row["complete"] or f"iter_{n:07d}.old" in row["complete"], (n, row)
        found_n = int(row["found"].split("_")[1].split(".")[0])
        assert found_n in (last_n, last_n + 1), (done[-1], row)
        assert row["value"] == row["meta_value"] == row["state_value"], row  # bitwise what was saved
        if found_n == last_n:
            assert row["value"] >= last_n * 10 + last_v, row
        assert row["best_value"] == row["best_meta_value"], row
        assert not [n for n in row["after"] if n.endswith((".old", ".tmp"))], row["after"]


# ----------------------------------------------------------------------------- kinds


def test_checkpoint_kinds_are_checked_with_a_fix():
    from megatron_rlhf.checkpoint import CheckpointError, check_kind, network_kind

    sft = {"kind": "policy", "stage": "sft", "networks": ["model"], "network_kinds": {"model": "policy"}}
    rm = {"kind": "reward", "stage": "rm", "networks": ["model"], "network_kinds": {"model": "reward"}}
    ppo = {"kind": "policy", "stage": "ppo", "networks": ["actor", "critic"], "network_kinds": {"actor": "policy", "critic": "critic"}}
    old_ppo = {"kind": "policy", "stage": "ppo", "networks": ["actor", "critic"]}  # written before network_kinds
    assert check_kind(Path("runs/sft"), sft, "policy") == "model"
    assert check_kind(Path("runs/ppo"), ppo, "policy") == "actor"
    assert check_kind(Path("runs/ppo"), old_ppo, "critic", network="critic") == "critic"
    assert network_kind(old_ppo, "critic") == "critic" and network_kind(old_ppo, "actor") == "policy"
    assert check_kind(Path("runs/rm"), rm, ("policy", "reward")) == "model"
    assert check_kind(Path("old"), {"networks": ["model"]}, "reward") == "model"  # no kind recorded: passes
    with pytest.raises(CheckpointError, match=r"ppo.reward_model=runs/sft is a policy .*stage=sft, network model\], not a reward model \(an RM run\); give ppo.reward_model"):
        check_kind(Path("runs/sft"), sft, "reward", what="ppo.reward_model")
    with pytest.raises(CheckpointError, match=r"model.init_from=runs/rm is a reward model .*not a policy"):
        check_kind(Path("runs/rm"), rm, "policy")
    with pytest.raises(CheckpointError, match=r"is a PPO critic"):
        check_kind(Path("runs/ppo"), ppo, "reward", what="ppo.reward_model", network="critic")


# ----------------------------------------------------------------------------- metrics.jsonl


def test_metrics_torn_line_and_later_steps_are_set_aside(tmp_path):
    from megatron_rlhf.training.metrics import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    kept = "".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    later = "".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (4, 5))
    path.write_text(kept + later + '{"step": 6, "train/lo')  # killed mid-write
    inode = path.stat().st_ino
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]  # a torn last line does not break readers
    logger = MetricsLogger(tmp_path, resume_step=3, tensorboard=False, progress_bar=False)
    logger.log(4, {"train/loss": 0.2})
    logger.close()
    assert path.stat().st_ino == inode  # cut and appended, never rewritten
    assert path.read_text() == kept + json.dumps({"step": 4, "train/loss": 0.2}) + "\n"
    aside = [json.loads(line) for line in (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()]
    assert "resumed at step 3" in aside[0]["note"]
    assert [r.get("step") for r in aside[1:3]] == [4, 5] and aside[3] == {"unparsable_line": '{"step": 6, "train/lo'}
    # a second resume appends to the aside file, after its own note
    MetricsLogger(tmp_path, resume_step=0, tensorboard=False, progress_bar=False).close()
    assert path.read_text() == ""
    aside = [json.loads(line) for line in (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()]
    assert len(aside) == 4 + 1 + 4 and "resumed at step 0" in aside[4]["note"] and [r["step"] for r in aside[5:]] == [1, 2, 3, 4]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(tmp_path)


# ----------------------------------------------------------------------------- orphans


def test_no_process_outlives_a_trainer_killed_mid_save(tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_rlhf", "sft", "--config", "examples/tiny/sft.yaml", "model.hidden_size=32", "model.seq_length=40",
           "train.max_steps=500", "train.global_batch_size=8", "train.micro_batch_size=8", "train.save_interval=1", "train.eval_interval=0",
           "data.valid_path=", "train.progress_bar=false", "train.tensorboard=false", f"output_dir={out}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, killed_mid_save = {}, False
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                break
            for c in children:
                seen.setdefault(c.pid, c)
            # a writer forked by Megatron's save, after at least one checkpoint is complete
            if children and (out / "checkpoints" / "iter_0000002").is_dir():
                killed_mid_save = True
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert killed_mid_save, f"no checkpoint-writer process was seen (children: {len(seen)})"
    time.sleep(3)
    alive = []
    for c in seen.values():
        try:
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE:
                alive.append((c.pid, " ".join(c.cmdline())[:120], c.memory_info().rss >> 20))
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"orphaned processes (pid, command, MiB): {alive}"
