"""KL penalty between the RL policy and the frozen SFT reference, and its coefficient controllers.

InstructGPT eq. 2 penalises ``beta * log(pi_RL(y|x) / pi_SFT(y|x))`` per response. With tokens
sampled from the policy, the per-token estimators of KL(pi || pi_ref) are (Schulman, "Approximating
KL divergence", 2020), writing ``log_ratio = logprobs - ref_logprobs``:

    k1 = log_ratio                                   unbiased, high variance, can be negative
    k2 = 0.5 * log_ratio ** 2                        biased, low variance, >= 0
    k3 = exp(-log_ratio) - 1 + log_ratio             unbiased, low variance, >= 0

k1 is exactly the term of InstructGPT eq. 2.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from .sft import masked_token_mean

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from the sampled tokens' log-probs (see module docstring).

    Args:
        logprobs: ``[batch, seq]`` log pi(token) of the sampled tokens under the policy.
        ref_logprobs: ``[batch, seq]`` log pi_ref(token) of the same tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``[batch, seq]`` per-token estimate, unmasked (the caller applies its mask).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    # k3 written as (r - 1) - log r with r = pi_ref/pi, which is >= 0 for every sample
    return torch.expm1(-log_ratio) + log_ratio


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "k3",
    num_tokens=None,
):
    """KL(pi || pi_ref) as a LOSS term (GRPO, Shao et al. 2024 eq. 3-4) instead of a reward penalty.

        loss = sum_t mask_t * KL_t / N,     KL_t = k3 = ref/pi - log(ref/pi) - 1 by default

    ``logprobs`` carry the gradient (the policy being updated) and ``ref_logprobs`` are
    constants. On samples from the current policy the gradient of the k3 (or k2) loss is a
    KL-decreasing direction; k1's gradient is zero in expectation, so it is refused here.

    Args:
        logprobs, ref_logprobs, response_mask: ``[batch, seq]``.
        estimator: ``"k3"`` (GRPO) or ``"k2"``.
        num_tokens: denominator N; default the local mask sum. Under data parallelism pass the
            GLOBAL token count (1 gives the sum), as ``sft.masked_token_mean``.

    Returns:
        ``(loss, metrics)``; metrics hold the detached ``kl_loss`` (= loss).
    """
    if estimator not in ("k2", "k3"):
        raise ValueError(f"kl_loss needs the k2 or k3 estimator (k1's gradient is zero in expectation), got {estimator!r}")
    kl = kl_per_token(logprobs, ref_logprobs.detach(), estimator)
    loss = masked_token_mean(kl, response_mask, num_tokens)
    return loss, {"kl_loss": loss.detach()}


class FixedKLController:
    """Constant KL coefficient beta (InstructGPT uses a fixed beta = 0.02)."""

    kind = "fixed"

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient so both controllers are interchangeable."""
        return self.value

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        _check_kind(self.kind, state)
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller driving the observed KL towards ``target`` (Ziegler et al. 2019).

        e_t      = clip(KL_t / target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + e_t * n_steps / horizon)

    ``n_steps`` is how many samples (episodes) the KL measurement covers, so the rate of
    adaptation does not depend on the batch size.
    """

    kind = "adaptive"
    error_clip = 0.2

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt beta from the measured mean KL per sequence; returns the new coefficient."""
        error = min(max(float(current_kl) / self.target - 1.0, -self.error_clip), self.error_clip)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # only beta is restored: target and horizon come from the (possibly edited) run config
        _check_kind(self.kind, state)
        self.value = float(state["value"])


def _check_kind(expected: str, state: Dict[str, Any]) -> None:
    if state.get("kind", expected) != expected:
        raise ValueError(f"cannot load a {state['kind']!r} KL controller state into a {expected!r} controller")
