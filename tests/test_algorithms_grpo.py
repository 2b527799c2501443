"""Critic-free advantages: GRPO (group-normalised) and RLOO (leave-one-out) against hand numbers,
and the KL loss term (k3) of GRPO."""

import math

import pytest
import torch

from megatron_rlhf.algorithms import expand_to_tokens, grpo_advantages, kl_loss, kl_per_token, rloo_advantages

F64 = torch.float64
# three prompts, four samples each; the middle group is all equal
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 3.0, 1.0, 2.0, 2.0], dtype=F64)


def test_grpo_golden():
    # group 0: mean 1/4, centred [3/4, -1/4 x3], unbiased var (9/16 + 3/16) / 3 = 1/4 -> std 1/2
    # group 2: mean 2, centred [1, -1, 0, 0], var 2/3 -> std sqrt(2/3)
    s = math.sqrt(1.5)
    expected = [1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0, s, -s, 0.0, 0.0]
    torch.testing.assert_close(grpo_advantages(REWARDS, 4, eps=0.0), torch.tensor(expected, dtype=F64), atol=1e-12, rtol=0)
    # without the std division (Dr. GRPO): the centred rewards
    centred = [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0]
    torch.testing.assert_close(grpo_advantages(REWARDS, 4, scale_by_std=False), torch.tensor(centred, dtype=F64), atol=1e-12, rtol=0)
    # the default eps only nudges the scale
    assert grpo_advantages(REWARDS, 4)[0].item() == pytest.approx(0.75 / (0.5 + 1e-6), abs=1e-12)


def test_rloo_golden():
    # group 0: A_0 = 1 - 0 = 1, A_j = 0 - 1/3; group 2: 3 - 5/3, 1 - 7/3, 2 - 2, 2 - 2
    expected = [1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0, 4 / 3, -4 / 3, 0.0, 0.0]
    torch.testing.assert_close(rloo_advantages(REWARDS, 4), torch.tensor(expected, dtype=F64), atol=1e-12, rtol=0)
    # k/(k-1) x the centred reward, for a group of 2 as well
    torch.testing.assert_close(rloo_advantages(torch.tensor([0.5, -1.5]), 2), torch.tensor([2.0, -2.0]))


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_equal_rewards_give_exactly_zero(estimator):
    # 0.1 is not a binary fraction: the group mean differs from 0.1 by an ulp, which a plain
    # (r - mean) / (std + eps) would turn into +-0.58
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float32)
    for group_size in (3, 6):
        out = grpo_advantages(rewards, group_size, eps=0.0) if estimator == "grpo" else rloo_advantages(rewards, group_size)
        assert out.dtype == torch.float32
        if group_size == 3:
            assert out.tolist() == [0.0] * 6
        else:
            assert out[0].item() < 0 < out[-1].item()


def test_group_checks():
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        grpo_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        rloo_advantages(REWARDS, 5)
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages(REWARDS.view(3, 4), 4)


def test_expand_to_tokens():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert expand_to_tokens(torch.tensor([2.0, -1.0]), mask).tolist() == [[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, -1.0, -1.0]]


def test_kl_loss_golden_and_gradient():
    # log ratios (policy - ref) on valid tokens: ln 2, 0 | -ln 2; k3 = exp(-x) - 1 + x
    logprobs = torch.tensor([[-1.0, -2.0, 9.0], [-3.0, 9.0, 9.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.0 - math.log(2), -2.0, 0.0], [-3.0 + math.log(2), 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    k3 = [0.5 - 1 + math.log(2), 0.0, 2 - 1 - math.log(2)]
    loss, metrics = kl_loss(logprobs, ref, mask)
    assert loss.item() == pytest.approx(sum(k3) / 3, abs=1e-12)
    assert metrics["kl_loss"].item() == loss.item()
    summed, _ = kl_loss(logprobs, ref, mask, num_tokens=1)
    assert summed.item() == pytest.approx(sum(k3), abs=1e-12)
    loss.backward()
    # d k3 / d logprob = 1 - exp(-x): pulls the policy towards the reference, 0 at x = 0 and off the mask
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.5 / 3, 0.0, 0.0], [-1.0 / 3, 0.0, 0.0]], dtype=F64))
    torch.testing.assert_close(kl_per_token(logprobs, ref, "k3")[mask].detach(), torch.tensor(k3, dtype=F64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="k1's gradient is zero in expectation"):
        kl_loss(logprobs, ref, mask, estimator="k1")


def test_config_checks_of_the_critic_free_estimators():
    from megatron_rlhf.config import ConfigError, load_config

    for estimator in ("grpo", "rloo"):
        with pytest.raises(ConfigError, match=rf"ppo.advantage_estimator={estimator} .* ppo.samples_per_prompt=1; set ppo.samples_per_prompt to 2"):
            load_config(None, [f"ppo.advantage_estimator={estimator}"], stage="ppo")
        cfg = load_config(None, [f"ppo.advantage_estimator={estimator}", "ppo.samples_per_prompt=4"], stage="ppo")
        assert cfg.ppo.samples_per_prompt == 4
    with pytest.raises(ConfigError, match=r"ppo.advantage_estimator=rloo has none; set ppo.critic_warmup_steps=0"):
        load_config(None, ["ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=2", "ppo.critic_warmup_steps=5"], stage="ppo")
    with pytest.raises(ConfigError, match=r"did you mean 'grpo'"):
        load_config(None, ["ppo.advantage_estimator=gpro"], stage="ppo")
    with pytest.raises(ConfigError, match=r"unknown config key 'ppo.num_generations'; did you mean 'ppo.samples_per_prompt'"):
        load_config(None, ["ppo.num_generations=8"], stage="ppo")
    with pytest.raises(ConfigError, match=r"ppo.kl_in_reward=false .* set ppo.kl_estimator=k3"):
        load_config(None, ["ppo.kl_in_reward=false"], stage="ppo")
    assert load_config(None, ["ppo.kl_in_reward=false", "ppo.kl_estimator=k3"], stage="ppo").ppo.kl_in_reward is False
    with pytest.raises(ConfigError, match=r"ppo.reward_fn='reward.py' must be 'path/to/file.py:function_name'"):
        load_config(None, ["ppo.reward_fn=reward.py"], stage="ppo")
