"""Run a test function under N processes on gloo, as torchrun would, and collect results.

    results = run_distributed(my_worker, 2, arg1, arg2)   # one result per rank

``my_worker`` must be a module-level function (it is pickled by name into spawned
processes); it runs with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set,
so ``megatron_rlhf.parallel.init_distributed`` works unchanged inside it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise
    finally:
        from megatron_rlhf.parallel import destroy_distributed

        destroy_distributed()


def run_distributed(fn, world_size: int, *args, timeout: float = 300, **kwargs):
    """Positional extra arguments, or ``args=(...)``, are passed to ``fn`` on every rank."""
    if "args" in kwargs:
        args = tuple(kwargs.pop("args")) + args
    if kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)}")
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=False, start_method="spawn"
        )
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception:
            errors = []
            for rank in range(world_size):
                f = Path(out_dir) / f"rank{rank}.pt"
                if f.exists():
                    data = torch.load(f, weights_only=False)
                    if not data["ok"]:
                        errors.append(f"rank {rank}:\n{data['error']}")
            raise RuntimeError("distributed worker failed:\n" + "\n".join(errors)) from None
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False)["result"] for r in range(world_size)]


def run_single(fn, *args):
    """The same as run_distributed with one process (a fresh interpreter: no global state leaks)."""
    return run_distributed(fn, 1, *args)[0]
