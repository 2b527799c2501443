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


def pytest_collection_modifyitems(config, items):
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
