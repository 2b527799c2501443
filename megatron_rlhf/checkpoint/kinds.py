"""The kind of model each network of a checkpoint holds, and the check every consumer makes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from megatron_rlhf.checkpoint.files import CheckpointError

# The kind of model each network of a checkpoint holds. "policy": a language model (SFT,
# PPO actor, an imported HF model); "reward": a reward model; "critic": PPO's value model.
KINDS = ("policy", "reward", "critic")


_DEFAULT_NETWORK_KINDS = {"actor": "policy", "critic": "critic"}


def network_kind(meta: dict, network: str) -> Optional[str]:
    """What ``network`` of a checkpoint holds: "policy", "reward" or "critic" (None: unknown,
    a checkpoint written before kinds were recorded)."""
    kinds = meta.get("network_kinds") or {}
    if network in kinds:
        return kinds[network]
    return _DEFAULT_NETWORK_KINDS.get(network, meta.get("kind"))


_KIND_WORDS = {"policy": "a policy (an SFT run, a PPO run or an imported model)", "reward": "a reward model (an RM run)", "critic": "a PPO critic"}


def check_kind(ckpt: Path, meta: dict, expected: Union[str, Sequence[str]], what: str = "model.init_from", network: Optional[str] = None) -> str:
    """Refuse a checkpoint of the wrong kind, naming the key and what to give instead.

    ``expected``: one kind or several; ``network`` defaults to the one a consumer reads
    (``model``, else ``actor``). Returns the network to load. A checkpoint that records no
    kind passes (written before kinds were recorded).
    """
    wanted = (expected,) if isinstance(expected, str) else tuple(expected)
    if not set(wanted) <= set(KINDS):
        raise ValueError(f"expected kinds {wanted}: each must be one of {KINDS}")
    networks = meta.get("networks") or ["model"]
    if network is None:
        network = next((n for n in ("model", "actor") if n in networks), networks[0])
    kind = network_kind(meta, network)
    if kind is None or kind in wanted:
        return network
    stage = meta.get("stage")
    have = _KIND_WORDS.get(kind, kind) + (f" [meta.json: stage={stage}, network {network}]" if stage else "")
    raise CheckpointError(
        f"{what}={ckpt} is {have}, not {' or '.join(_KIND_WORDS.get(k, k) for k in wanted)}; "
        f"give {what} a checkpoint of the right kind"
    )
