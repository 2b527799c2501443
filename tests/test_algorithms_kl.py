"""Per-token KL estimators and the fixed/adaptive KL coefficient controllers."""

import pytest
import torch

from megatron_rlhf.algorithms import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_per_token

# log_ratio = logprobs - ref_logprobs = [0.5, -1.0]
LOGPROBS = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
REF_LOGPROBS = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", [0.5, -1.0]),
        ("k2", [0.125, 0.5]),  # 0.5 * log_ratio^2
        # exp(-log_ratio) - 1 + log_ratio: e^-0.5 - 0.5 = 0.10653066, e^1 - 2 = 0.71828183
        ("k3", [0.10653065971263342, 0.7182818284590451]),
    ],
)
def test_estimators_golden(estimator, expected):
    out = kl_per_token(LOGPROBS, REF_LOGPROBS, estimator)
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float64), atol=1e-12, rtol=0)


def test_k1_and_k3_are_unbiased_for_exact_kl():
    # exact expectation under the policy over a small vocabulary, no sampling noise
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(13, dtype=torch.float64), -1)
    ref_logp = torch.log_softmax(torch.randn(13, dtype=torch.float64), -1)
    exact_kl = (logp.exp() * (logp - ref_logp)).sum()
    for estimator in ("k1", "k3"):
        expectation = (logp.exp() * kl_per_token(logp, ref_logp, estimator)).sum()
        assert expectation.item() == pytest.approx(exact_kl.item(), abs=1e-12)


def test_k2_k3_non_negative_and_zero_at_equality():
    torch.manual_seed(1)
    a, b = torch.randn(50), torch.randn(50)
    for estimator in ("k2", "k3"):
        assert (kl_per_token(a, b, estimator) >= 0).all()
    for estimator in KL_ESTIMATORS:
        assert kl_per_token(a, a, estimator).abs().max().item() == 0.0


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'.*k1, k2, k3"):
        kl_per_token(LOGPROBS, REF_LOGPROBS, "k4")


def test_adaptive_controller_golden():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # error 9/6 - 1 = 0.5 clipped to 0.2: 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    assert controller.update(current_kl=9.0, n_steps=256) == pytest.approx(0.100512, abs=1e-12)
    # error 5.4/6 - 1 = -0.1 unclipped: * (1 - 0.1 * 1000 / 10000) = * 0.99
    assert controller.update(current_kl=torch.tensor(5.4), n_steps=1000) == pytest.approx(0.09950688, abs=1e-9)
    # KL 0: error -1 clipped to -0.2, a full horizon: * 0.8
    assert controller.update(current_kl=0.0, n_steps=10000) == pytest.approx(0.079605504, abs=1e-9)
    assert controller.value == pytest.approx(0.079605504, abs=1e-9)


def test_adaptive_controller_checkpoint_roundtrip():
    controller = AdaptiveKLController(0.2, target=6.0, horizon=100)
    controller.update(12.0, n_steps=10)  # 0.2 * 1.02
    resumed = AdaptiveKLController(0.2, target=6.0, horizon=100)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == pytest.approx(0.204, abs=1e-12)
    assert resumed.update(12.0, 10) == controller.update(12.0, 10)


def test_fixed_controller_and_kind_check():
    controller = FixedKLController(0.02)
    assert controller.update(current_kl=100.0, n_steps=512) == 0.02
    resumed = FixedKLController(0.5)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == 0.02
    with pytest.raises(ValueError, match="adaptive"):
        resumed.load_state_dict(AdaptiveKLController(0.1, 6.0, 10).state_dict())


@pytest.mark.parametrize("args", [(-0.1, 6.0, 10.0), (0.1, 0.0, 10.0), (0.1, 6.0, 0.0)])
def test_adaptive_controller_validates(args):
    with pytest.raises(ValueError):
        AdaptiveKLController(*args)
