import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


# Files in the order a run should start them: the slowest first (serial seconds on the 2-core
# CI machine, 2026-12-03, in brackets), so that under `pytest -n 2 --dist loadfile` no worker is
# left with a long file at the end while the other idles. The two users of the session's tiny
# SFT (test_dpo trains it, test_grpo waits for it) start apart. Unlisted files follow.
SLOW_FILES_FIRST = [
    "test_ppo.py",  # [~200]
    "test_dpo.py",  # [~150, trains the session's tiny SFT]
    "test_parallel_equivalence.py",  # [~120]
    "test_run_guards.py",  # [~100]
    "test_rollout_dynamic.py",  # [~100]
    "test_grpo.py",  # [~110]
    "test_slurm_cluster.py",
    "test_sft.py",  # [~90]
    "test_rm.py",  # [~90]
    "test_convert_families.py",  # [~90]
    "test_bench.py",  # [~75]
    "test_packing.py",  # [~70]
    "test_dp_equivalence.py",  # [~65]
    "test_reliability_checkpoint.py",  # [~50]
    "test_bench_rollout.py",  # [~45]
    "test_export_trained.py",  # [~40]
    "test_pipeline_ppo.py",  # [~35]
]


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order above, not "most tests first"
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: unlisted keep their order
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sft_policy(tmp_path_factory):
    """The bundled tiny SFT (examples/tiny/sft.yaml as shipped: 372 steps, about a minute on
    one core), trained once per test session for the tests that need a policy that has really
    learned the task (GRPO's reward rise, DPO's held-out accuracy). Returns the run directory.

    Under pytest-xdist (``-n 2``, as CI runs) the workers share one training: the first to
    arrive trains it under a file lock in the session's common temporary folder."""
    import fcntl
    import subprocess

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by all workers of this session
    out = root / "tiny_sft_shared" / "sft"
    with open(root / "tiny_sft_shared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "checkpoints" / "latest").exists():
            cmd = [sys.executable, "-m", "megatron_rlhf", "sft", "--config", "examples/tiny/sft.yaml", f"output_dir={out}",
                   "train.progress_bar=false", "train.tensorboard=false", "train.eval_interval=0", "data.valid_path="]
            env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
            result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, result.stderr[-3000:]
    return out
