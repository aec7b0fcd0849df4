"""Hand-checked tests for rlhf.functional.

Expected numbers are worked out in the comments (docs/ppo.md#formulas and docs/ppo.md#oracles give most of them);
property tests use fixed seeds. All run on CPU in well under a second each.
"""

import math

import pytest
import torch

from rlhf.functional import (
    adaptive_kl_coef,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    exclusive_cumsum_positions,
    explained_variance,
    gae_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    last_valid_index,
    linear_cross_entropy_sum,
    logprobs_from_logits,
    masked_lm_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    pairwise_accuracy,
    pairwise_ranking_loss,
    reward_centering_penalty,
    per_token_rewards,
    ranking_to_pairs,
    truncate_after_eos,
)

ATOL = 1e-6


def close(actual, expected, atol=ATOL):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ======================================================================================
# Masked statistics and whitening (docs/ppo.md#oracle-10)
# ======================================================================================


def test_masked_sum_and_mean_ignore_garbage_at_pads():
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), -float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_sum(values, mask), 1 + 2 + 3)  # 6
    close(masked_mean(values, mask), (1 + 2 + 3) / 3)  # 2
    close(masked_sum(values, mask, dim=1), [1 + 2, 3])
    close(masked_mean(values, mask, dim=1), [(1 + 2) / 2, 3 / 1])


def test_masked_mean_of_empty_selection_is_zero_not_nan():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    close(masked_mean(values, torch.zeros_like(mask)), 0.0)
    close(masked_mean(values, mask, dim=1), [1.5, 0.0])


def test_masked_mean_accepts_bool_mask_and_upcasts_bf16():
    values = torch.tensor([1.0, 2.0, 4.0], dtype=torch.bfloat16)
    mean = masked_mean(values, torch.tensor([True, False, True]))
    assert mean.dtype == torch.float32
    close(mean, (1 + 4) / 2)


def test_masked_var_biased_and_unbiased():
    # (1, 2, 3, 4): mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    values = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, -7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    close(masked_var(values, mask), 5 / 4)  # 1.25
    close(masked_var(values, mask, unbiased=True), 5 / 3)  # 1.666667


def test_masked_var_with_too_few_elements_is_zero():
    values = torch.tensor([3.0, 8.0])
    close(masked_var(values, torch.tensor([1, 0])), 0.0)
    close(masked_var(values, torch.tensor([1, 0]), unbiased=True), 0.0)
    close(masked_var(values, torch.tensor([0, 0]), unbiased=True), 0.0)


def test_masked_whiten_biased_oracle():
    # σ² = 1.25, σ = 1.118034; (x − 2.5)/σ = (−1.5, −0.5, 0.5, 1.5)/1.118034
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    close(masked_whiten(values, mask), [[-1.341641, -0.447214, 0.447214, 1.341641, 0.0]])


def test_masked_whiten_unbiased_oracle():
    # σ² = 5/3, σ = 1.290994; (−1.5, −0.5, 0.5, 1.5)/1.290994
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.ones(4)
    close(masked_whiten(values, mask, unbiased=True), [-1.161895, -0.387298, 0.387298, 1.161895])


def test_masked_whiten_without_shift_keeps_mean():
    # (x − 2.5)/1.118034 + 2.5 = 2.5 + (−1.341641, −0.447214, 0.447214, 1.341641)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, -3.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    whitened = masked_whiten(values, mask, shift_mean=False)
    close(whitened, [1.158359, 2.052786, 2.947214, 3.841641, 0.0])
    close(masked_mean(whitened, mask), 2.5)


def test_masked_whiten_gives_mean_zero_variance_one_and_ignores_pads():
    torch.manual_seed(0)
    values = torch.randn(4, 7) * 3 + 5
    mask = (torch.rand(4, 7) > 0.3).long()
    whitened = masked_whiten(values, mask)
    close(masked_mean(whitened, mask), 0.0, atol=1e-5)
    close(masked_var(whitened, mask), 1.0, atol=1e-5)
    assert torch.all(whitened[mask == 0] == 0)
    garbage = torch.where(mask.bool(), values, torch.full_like(values, 1e6))
    close(masked_whiten(garbage, mask), whitened)


# ======================================================================================
# Log-probabilities and entropy (docs/ppo.md#10, docs/ppo.md#oracle-13)
# ======================================================================================


def test_logprobs_from_logits_hand_values():
    # logits (0, 0, ln 2): softmax = (1, 1, 2)/4
    # τ = 2: logits/2 = (0, 0, ln√2): softmax[2] = √2/(2 + √2) = 1/(1 + √2)
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [0.0, 0.0, math.log(2.0)]]])
    tokens = torch.tensor([[2, 0]])
    close(logprobs_from_logits(logits, tokens), [[math.log(1 / 2), math.log(1 / 4)]])
    close(
        logprobs_from_logits(logits, tokens, temperature=2.0)[0, 0],
        -math.log(1 + math.sqrt(2)),  # −0.881374
    )


def test_logprobs_from_logits_matches_log_softmax_and_is_fp32():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11) * 4
    tokens = torch.randint(0, 11, (2, 5))
    reference = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, tokens, temperature=0.7), reference, atol=1e-5)
    half = logprobs_from_logits(logits.bfloat16(), tokens)
    assert half.dtype == torch.float32 and half.shape == (2, 5)


def test_logprobs_from_logits_rejects_an_ignore_label_instead_of_returning_zero():
    # -100 is the usual "ignore" label of a cross-entropy; here every position is a token, so it is out of range
    with pytest.raises(IndexError):
        logprobs_from_logits(torch.zeros(1, 2, 3), torch.tensor([[0, -100]]))


def test_logprobs_from_logits_rejects_nonpositive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)


def test_entropy_uniform_is_log_vocab():
    # H(uniform over 100) = ln 100
    close(entropy_from_logits(torch.zeros(2, 3, 100)), torch.full((2, 3), 4.605170))


def test_entropy_hand_value():
    # p = (1/4, 1/4, 1/2): H = 2·(1/4)·ln 4 + (1/2)·ln 2 = 0.693147 + 0.346574 = 1.039721
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)]]])
    close(entropy_from_logits(logits), [[1.039721]])


def test_entropy_matches_categorical():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 17) * 5
    for temperature in (1.0, 0.7):
        expected = torch.distributions.Categorical(logits=logits / temperature).entropy()
        close(entropy_from_logits(logits, temperature=temperature), expected, atol=1e-5)


# ======================================================================================
# KL estimators (docs/ppo.md#oracle-6)
# ======================================================================================


def test_kl_estimators_are_exactly_zero_for_identical_logprobs():
    torch.manual_seed(3)
    logprobs = torch.log_softmax(torch.randn(4, 9, 13), -1)[..., 0]
    for estimator in ("k1", "k2", "k3"):
        kl = kl_penalty(logprobs, logprobs.clone(), estimator)
        assert torch.equal(kl, torch.zeros_like(kl)), estimator


def test_k2_and_k3_are_nonnegative():
    torch.manual_seed(4)
    logprobs = -torch.rand(1000) * 8
    ref_logprobs = -torch.rand(1000) * 8
    assert torch.all(kl_k2(logprobs, ref_logprobs) >= 0)
    assert torch.all(kl_k3(logprobs, ref_logprobs) >= 0)
    assert torch.any(kl_k1(logprobs, ref_logprobs) < 0)  # k1 alone can go negative


def test_kl_estimators_hand_values():
    # log(π_ref/π) = −0.1, i.e. log π − log π_ref = 0.1
    # k1 = 0.1;  k2 = ½·0.1² = 0.005;  k3 = (e^{−0.1} − 1) − (−0.1) = 0.904837 − 1 + 0.1
    logprobs = torch.tensor([-1.0])
    ref_logprobs = torch.tensor([-1.1])
    close(kl_k1(logprobs, ref_logprobs), [0.1])
    close(kl_k2(logprobs, ref_logprobs), [0.005])
    close(kl_k3(logprobs, ref_logprobs), [0.0048374])
    close(kl_penalty(logprobs, ref_logprobs, "k3"), [0.0048374])


def test_kl_estimators_exact_expectations():
    # x ~ q = (.5, .3, .2), p = π_ref = (.4, .4, .2). E_q[k] = Σ_x q(x)·k(x).
    # KL(q‖p) = .5·ln(1.25) + .3·ln(.75) + .2·ln 1 = 0.111572 − 0.086305 = 0.025267
    # E[k3] = Σ(p − q) + KL = KL;  E[k2] = ½(.5·ln²1.25 + .3·ln².75) = ½(0.024896 + 0.024828)
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    expectation = {name: (q * kl_penalty(q.log(), p.log(), name)).sum() for name in ("k1", "k2", "k3")}
    close(expectation["k1"], 0.025267)
    close(expectation["k3"], 0.025267)
    close(expectation["k2"], 0.024862)


def test_k3_clamps_log_ratio_so_it_stays_finite():
    # ref − lp = 100 would overflow exp in fp32; clamped at 20: e^20 − 1 − 20
    kl = kl_k3(torch.tensor([-100.0]), torch.tensor([0.0]))
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(math.exp(20.0) - 21.0, rel=1e-6)


def test_kl_penalty_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


# ======================================================================================
# Adaptive KL controller (docs/ppo.md#oracle-7)
# ======================================================================================


@pytest.mark.parametrize(
    "observed_kl, expected",
    [
        (6.0, 0.15),  # e = 0
        (12.0, 0.151536),  # e = clip(1, ±0.2) = 0.2: 0.15·(1 + 0.2·512/10000) = 0.15·1.01024
        (3.0, 0.148464),  # e = clip(−0.5, ±0.2) = −0.2: 0.15·(1 − 0.01024)
        (6.6, 0.150768),  # e = 0.1 (clip inactive): 0.15·(1 + 0.1·0.0512) = 0.15·1.00512
    ],
)
def test_adaptive_kl_coef(observed_kl, expected):
    new_coef = adaptive_kl_coef(0.15, observed_kl, target_kl=6.0, horizon=10000, num_episodes=512)
    assert isinstance(new_coef, float)
    assert new_coef == pytest.approx(expected, abs=1e-6)


# ======================================================================================
# Truncation, t*, rewards (docs/ppo.md#oracle-12, docs/ppo.md#40)
# ======================================================================================

EOS, PAD = 2, 0


@pytest.mark.parametrize(
    "ids, expected_ids, expected_mask, expected_ended",
    [
        ([5, 7, 2, 9, 4], [5, 7, 2, 0, 0], [1, 1, 1, 0, 0], True),  # EOS in the middle
        ([2, 9, 4, 6, 8], [2, 0, 0, 0, 0], [1, 0, 0, 0, 0], True),  # EOS at position 0
        ([5, 7, 3, 9, 4], [5, 7, 3, 9, 4], [1, 1, 1, 1, 1], False),  # no EOS: keep all
        ([5, 2, 9, 2, 2], [5, 2, 0, 0, 0], [1, 1, 0, 0, 0], True),  # several EOS: first wins
        ([5, 7, 3, 9, 2], [5, 7, 3, 9, 2], [1, 1, 1, 1, 1], True),  # EOS at the last slot
    ],
)
def test_truncate_after_eos(ids, expected_ids, expected_mask, expected_ended):
    truncated, mask, ended = truncate_after_eos(torch.tensor([ids]), EOS, PAD)
    assert truncated.tolist() == [expected_ids]
    assert mask.tolist() == [expected_mask]
    assert ended.tolist() == [expected_ended]


def test_truncate_after_eos_batched_rows_are_independent():
    ids = torch.tensor([[5, 2, 9], [4, 4, 4]])
    truncated, mask, ended = truncate_after_eos(ids, EOS, PAD)
    assert truncated.tolist() == [[5, 2, 0], [4, 4, 4]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert ended.tolist() == [True, False]
    assert truncated.dtype == ids.dtype and ended.dtype == torch.bool


def test_last_valid_index():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padded
            [0, 0, 1, 1, 1],  # left padded
            [1, 1, 1, 1, 1],  # no padding
            [0, 0, 0, 0, 0],  # empty row -> 0
            [0, 1, 1, 0, 0],  # both sides
        ]
    )
    assert last_valid_index(mask).tolist() == [2, 4, 4, 0, 2]
    assert last_valid_index(mask.bool()).tolist() == [2, 4, 4, 0, 2]


def test_per_token_rewards_masked_example():
    # docs/ppo.md#masked-example: m = (1, 1, 0), β = 0.1, k = (0.2, −0.1, garbage), s = 1
    # r_0 = −0.1·0.2 = −0.02;  r_1 = −0.1·(−0.1) + 1 = 1.01 (score at t* = 1, not 2);  r_2 = 0
    kl = torch.tensor([[0.2, -0.1, 123.0]])
    rewards = per_token_rewards(torch.tensor([1.0]), kl, torch.tensor([[1, 1, 0]]), kl_coef=0.1)
    close(rewards, [[-0.02, 1.01, 0.0]])


def test_per_token_rewards_score_lands_on_last_valid_token():
    scores = torch.tensor([2.0, -1.0, 5.0])
    kl = torch.zeros(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    rewards = per_token_rewards(scores, kl, mask, kl_coef=0.05)
    # Row 0 has no EOS (mask everywhere): score on the last column. Row 1: on index 0.
    # Row 2 has no valid token: no score anywhere.
    close(rewards, [[0, 0, 0, 2.0], [-1.0, 0, 0, 0], [0, 0, 0, 0]])


# ======================================================================================
# GAE (docs/ppo.md#oracle-1, docs/ppo.md#oracle-2, docs/ppo.md#oracle-14)
# ======================================================================================


@pytest.mark.parametrize(
    "lam, expected_advantages, expected_returns",
    [
        # δ_1 = r_1 − V_1 = 1 − 0.8 = 0.2;  δ_0 = r_0 + γV_1 − V_0 = 0 + 0.8 − 0.5 = 0.3
        # A_0 = δ_0 + γλ·δ_1;  G = A + V
        (0.95, [0.3 + 0.95 * 0.2, 0.2], [0.49 + 0.5, 0.2 + 0.8]),  # (0.49, 0.20), (0.99, 1.00)
        (1.0, [0.3 + 1.0 * 0.2, 0.2], [1.0, 1.0]),  # Monte Carlo: (0 + 1) − 0.5 = 0.50
        (0.0, [0.3, 0.2], [0.8, 1.0]),  # TD(0): A = δ, G_0 = r_0 + γV_1 = 0.8
    ],
)
def test_gae_two_timesteps(lam, expected_advantages, expected_returns):
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.8]])
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 2), gamma=1.0, lam=lam)
    close(advantages, [expected_advantages])
    close(returns, [expected_returns])


def test_gae_three_tokens_discounted():
    # γ = 0.9, λ = 0.95, γλ = 0.855, r = (0, 0, 1), V = (0.5, 0.6, 0.7), V_3 = 0
    # δ_2 = 1 − 0.7 = 0.3;  δ_1 = 0 + 0.9·0.7 − 0.6 = 0.03;  δ_0 = 0 + 0.9·0.6 − 0.5 = 0.04
    # A_2 = 0.3;  A_1 = 0.03 + 0.855·0.3 = 0.2865;  A_0 = 0.04 + 0.855·0.2865 = 0.2849575
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.95)
    close(advantages, [[0.2849575, 0.2865, 0.3]])
    close(returns, [[0.2849575 + 0.5, 0.2865 + 0.6, 0.3 + 0.7]])


def test_gae_masked_example_ignores_value_at_pad():
    # r = (−0.02, 1.01, 0) from per_token_rewards; V = (0.3, 0.6, 9.9 garbage); γ = 1, λ = 0.95
    # δ_1 = 1.01 + 1·0 − 0.6 = 0.41 (V after t* is terminal, not 9.9)
    # δ_0 = −0.02 + 0.6 − 0.3 = 0.28;  A_0 = 0.28 + 0.95·0.41 = 0.6695
    rewards = torch.tensor([[-0.02, 1.01, 0.0]])
    values = torch.tensor([[0.3, 0.6, 9.9]])
    mask = torch.tensor([[1, 1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    close(advantages, [[0.6695, 0.41, 0.0]])
    close(returns, [[0.6695 + 0.3, 0.41 + 0.6, 0.0]])  # (0.9695, 1.01, 0)


def test_gae_lambda_one_is_returns_to_go_minus_value():
    torch.manual_seed(5)
    rewards, values = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    advantages, returns = gae_advantages(rewards, values, torch.ones(3, 6), gamma=1.0, lam=1.0)
    returns_to_go = rewards.flip(1).cumsum(1).flip(1)
    close(returns, returns_to_go)
    close(advantages, returns_to_go - values)


def test_gae_lambda_zero_is_td0():
    torch.manual_seed(6)
    rewards, values = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    advantages, returns = gae_advantages(rewards, values, torch.ones(3, 6), gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    close(returns, rewards + 0.9 * next_values)
    close(advantages, rewards + 0.9 * next_values - values)


def test_gae_recursion_equals_closed_form_on_random_data():
    # A_t = Σ_{l=0}^{t*−t} (γλ)^l δ_{t+l}, with V after t* = 0.
    torch.manual_seed(7)
    batch, length, gamma, lam = 4, 8, 0.97, 0.9
    rewards = torch.randn(batch, length, dtype=torch.float64)
    values = torch.randn(batch, length, dtype=torch.float64)
    lengths = [8, 5, 1, 3]
    mask = torch.zeros(batch, length)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    advantages, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    for row, n in enumerate(lengths):
        v = torch.cat([values[row, :n], torch.zeros(1, dtype=torch.float64)])
        delta = rewards[row, :n] + gamma * v[1:] - v[:-1]
        for t in range(n):
            expected = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
            close(advantages[row, t], expected, atol=1e-12)
            close(returns[row, t], expected + values[row, t], atol=1e-12)
        assert torch.all(advantages[row, n:] == 0) and torch.all(returns[row, n:] == 0)


def test_gae_padding_invariance():
    # Appending pads with arbitrary V and r leaves the valid outputs unchanged.
    torch.manual_seed(8)
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)

    padded_rewards = torch.cat([rewards, torch.randn(2, 3) * 100], dim=1)
    padded_values = torch.cat([values, torch.randn(2, 3) * 100], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], dim=1)
    # Also garbage inside the row-1 padding that already existed.
    padded_values[1, 3:5] = torch.tensor([9.9, -7.0])
    padded_rewards[1, 3:5] = torch.tensor([4.0, 5.0])
    padded_advantages, padded_returns = gae_advantages(
        padded_rewards, padded_values, padded_mask, gamma=1.0, lam=0.95
    )
    close(padded_advantages[:, :5], advantages)
    close(padded_returns[:, :5], returns)
    assert torch.all(padded_advantages[padded_mask == 0] == 0)


def test_gae_permuting_rows_permutes_outputs():
    torch.manual_seed(9)
    rewards, values = torch.randn(5, 4), torch.randn(5, 4)
    mask = (torch.arange(4) < torch.tensor([[4], [2], [3], [1], [4]])).long()
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    perm = torch.tensor([3, 0, 4, 1, 2])
    perm_advantages, perm_returns = gae_advantages(rewards[perm], values[perm], mask[perm], 1.0, 0.95)
    close(perm_advantages, advantages[perm])
    close(perm_returns, returns[perm])


def test_gae_outputs_are_detached():
    rewards = torch.randn(2, 3, requires_grad=True)
    values = torch.randn(2, 3, requires_grad=True)
    advantages, returns = gae_advantages(rewards, values, torch.ones(2, 3), gamma=1.0, lam=0.95)
    assert not advantages.requires_grad and not returns.requires_grad


def test_returns_are_computed_before_whitening():
    # G = A + V with the raw A, even if the caller whitens A afterwards.
    torch.manual_seed(10)
    rewards, values = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.ones(3, 4)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    close(returns, advantages + values)
    assert not torch.allclose(returns, masked_whiten(advantages, mask) + values)


# ======================================================================================
# Policy loss (docs/ppo.md#oracle-3, docs/ppo.md#oracle-4)
# ======================================================================================

ADVANTAGES = torch.tensor([[1.0, -2.0, 0.5]])
MASK3 = torch.ones(1, 3)


def _policy_loss_at_ratio(ratio, advantages=ADVANTAGES, mask=MASK3):
    old_logprobs = torch.full_like(advantages, -1.3)
    logprobs = (old_logprobs + math.log(ratio)).requires_grad_()
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    loss.backward()
    return loss, stats, logprobs.grad


def test_policy_loss_at_ratio_one_is_vanilla_policy_gradient():
    # L = −mean(A) = −(1 − 2 + 0.5)/3 = 1/6
    # ∂L/∂log π_t = −A_t·ρ_t/3 = (−1/3, 2/3, −1/6)
    loss, stats, grad = _policy_loss_at_ratio(1.0)
    close(loss, 1 / 6)
    close(grad, [[-1 / 3, 2 / 3, -1 / 6]])
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["ratio_mean"], 1.0)


def test_policy_loss_clip_flatness_ratio_above():
    # ρ = 1.5, clip(ρ) = 1.2. Per token max(−Aρ, −A·clip ρ):
    #   A=1:    max(−1.5, −1.2) = −1.2 clipped -> flat
    #   A=−2:   max(3.0, 2.4)   = 3.0  unclipped (pessimistic)
    #   A=0.5:  max(−0.75, −0.6) = −0.6 clipped -> flat
    # L = (−1.2 + 3.0 − 0.6)/3 = 0.4
    # Gradient w.r.t. log π (not ρ): ∂L/∂log π = ∂L/∂ρ·ρ, so for A=−2: (2/3)·1.5 = 1.0;
    # w.r.t. ρ it would be (0, 2/3, 0). The notes' (0, 1.0, 0) is the log π gradient.
    loss, stats, grad = _policy_loss_at_ratio(1.5)
    close(loss, 0.4)
    close(grad, [[0.0, 1.0, 0.0]])
    close(stats["clipfrac"], 2 / 3)  # strict clipped > unclipped on tokens 0 and 2
    close(stats["approx_kl"], 0.5 * math.log(1.5) ** 2)  # ½·0.405465² = 0.082201
    close(stats["ratio_mean"], 1.5)


def test_policy_loss_clip_flatness_ratio_below():
    # ρ = 0.5, clip(ρ) = 0.8:
    #   A=1:    max(−0.5, −0.8) = −0.5 unclipped (pessimistic): ∂/∂log π = −1·0.5/3 = −1/6
    #   A=−2:   max(1.0, 1.6)   = 1.6  clipped -> flat
    #   A=0.5:  max(−0.25, −0.4) = −0.25 unclipped: ∂/∂log π = −0.5·0.5/3 = −1/12
    # L = (−0.5 + 1.6 − 0.25)/3 = 0.85/3. (W.r.t. ρ the gradient would be (−1/3, 0, −1/6).)
    loss, stats, grad = _policy_loss_at_ratio(0.5)
    close(loss, 0.85 / 3)
    close(grad, [[-1 / 6, 0.0, -1 / 12]])
    close(stats["clipfrac"], 1 / 3)


def test_policy_loss_ignores_masked_tokens_even_with_garbage():
    # A 4th masked token with a huge log-ratio and advantage must change neither the loss
    # nor the gradient of the valid tokens, and must get a zero (not NaN) gradient itself.
    advantages = torch.tensor([[1.0, -2.0, 0.5, 1e6]])
    mask = torch.tensor([[1, 1, 1, 0]])
    old_logprobs = torch.tensor([[-1.3, -1.3, -1.3, -500.0]])
    logprobs = torch.tensor([[-1.3, -1.3, -1.3, 0.0]], requires_grad=True)
    loss, _ = clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    loss.backward()
    close(loss, 1 / 6)
    close(logprobs.grad, [[-1 / 3, 2 / 3, -1 / 6, 0.0]])


def test_policy_loss_stats_are_detached():
    logprobs = torch.randn(2, 3, requires_grad=True)
    _, stats = clipped_policy_loss(logprobs, torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), 0.2)
    assert set(stats) == {"clipfrac", "approx_kl", "ratio_mean"}
    assert all(not value.requires_grad and value.dim() == 0 for value in stats.values())


# ======================================================================================
# Value loss (docs/ppo.md#oracle-5)
# ======================================================================================


@pytest.mark.parametrize(
    "value, expected_loss, expected_grad, expected_clipfrac",
    [
        # V_old = 1, G = 2, ε = 0.2; V^c = 1 + clip(V − 1, ±0.2); L = ½·max((V−G)², (V^c−G)²)
        (1.0, 0.5, -1.0, 0.0),  # both terms ½·1² = 0.5; ∂L/∂V = V − G = −1
        (1.1, 0.405, -0.9, 0.0),  # V^c = V: ½·0.9² = 0.405; grad −0.9
        (1.5, 0.32, 0.0, 1.0),  # ½·max(0.5², (1.2−2)²) = ½·0.64 = 0.32, clipped: flat
        (0.5, 1.125, -1.5, 0.0),  # ½·max(1.5², (0.8−2)²) = ½·2.25, unclipped: grad −1.5
    ],
)
def test_value_loss_clip(value, expected_loss, expected_grad, expected_clipfrac):
    values = torch.tensor([[value]], requires_grad=True)
    loss, stats = clipped_value_loss(
        values, torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), clip_eps=0.2
    )
    loss.backward()
    close(loss, expected_loss)
    close(values.grad, [[expected_grad]])
    close(stats["value_clipfrac"], expected_clipfrac)
    assert not stats["value_clipfrac"].requires_grad


def test_value_loss_ignores_masked_positions():
    values = torch.tensor([[1.1, float("nan")]], requires_grad=True)
    old_values = torch.tensor([[1.0, 50.0]])
    returns = torch.tensor([[2.0, -50.0]])
    loss, _ = clipped_value_loss(values, old_values, returns, torch.tensor([[1, 0]]), clip_eps=0.2)
    loss.backward()
    close(loss, 0.405)
    close(values.grad, [[-0.9, 0.0]])


# ======================================================================================
# Explained variance
# ======================================================================================


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    close(explained_variance(returns, returns, mask), 1.0)  # perfect critic
    close(explained_variance(torch.zeros_like(returns), returns, mask), 0.0)  # Var(G)/Var(G)
    # G − V = (0.5, −0.5, 0.5, −0.5): Var = 0.25; Var(G) = 1.25 -> 1 − 0.25/1.25 = 0.8
    values = returns - torch.tensor([[0.5, -0.5, 0.5, -0.5, 7.0]])
    close(explained_variance(values, returns, mask), 0.8)


def test_explained_variance_with_constant_returns_is_zero():
    returns = torch.full((2, 3), 4.0)
    ev = explained_variance(torch.randn(2, 3), returns, torch.ones(2, 3))
    assert torch.isfinite(ev) and ev.item() == 0.0


# ======================================================================================
# Pairwise ranking loss (docs/ppo.md#oracle-8)
# ======================================================================================


def test_pairwise_loss_equal_scores_is_log2_with_grad_minus_half():
    # −log σ(0) = log 2;  ∂/∂r_c = −σ(−Δ) = −0.5
    chosen = torch.tensor([0.7], requires_grad=True)
    loss = pairwise_ranking_loss(chosen, torch.tensor([0.7]))
    loss.backward()
    close(loss, 0.693147)
    close(chosen.grad, [-0.5])


def test_pairwise_loss_of_identical_batches_is_log2():
    torch.manual_seed(11)
    scores = torch.randn(16)
    close(pairwise_ranking_loss(scores, scores), math.log(2))


def test_pairwise_loss_hand_values():
    # L(1) = log(1 + e^{−1}) = log 1.367879 = 0.313262;  L(−1) = log(1 + e) = 1.313262
    close(pairwise_ranking_loss(torch.tensor([1.0]), torch.tensor([0.0])), 0.313262)
    close(pairwise_ranking_loss(torch.tensor([0.0]), torch.tensor([1.0])), 1.313262)
    # Margin 1 on Δ = 1: −log σ(0) = log 2
    close(pairwise_ranking_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0), math.log(2))


def test_pairwise_loss_antisymmetry_and_shift_invariance():
    torch.manual_seed(12)
    chosen, rejected = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    for i in range(10):
        delta = chosen[i] - rejected[i]
        # L(Δ) − L(−Δ) = −Δ
        difference = pairwise_ranking_loss(chosen[i : i + 1], rejected[i : i + 1]) - pairwise_ranking_loss(
            rejected[i : i + 1], chosen[i : i + 1]
        )
        close(difference, -delta, atol=1e-12)
    close(
        pairwise_ranking_loss(chosen + 3.7, rejected + 3.7),
        pairwise_ranking_loss(chosen, rejected),
        atol=1e-12,
    )


def test_pairwise_loss_is_stable_for_large_gaps():
    loss = pairwise_ranking_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    close(loss, 400.0, atol=1e-4)  # −log σ(−400) ≈ 400, not inf


def test_ranking_of_three_gives_per_prompt_loss():
    # Scores (2, 1, 0) ranked best first: pairs Δ = 1, 2, 1
    # (log(1+e^{−1}) + log(1+e^{−2}) + log(1+e^{−1}))/3 = (0.313262 + 0.126928 + 0.313262)/3
    scores = torch.tensor([2.0, 1.0, 0.0])
    pairs = ranking_to_pairs(3, [0, 1, 2])
    better, worse = zip(*pairs)
    one_prompt = torch.zeros(3, dtype=torch.long)
    loss = pairwise_ranking_loss(scores[list(better)], scores[list(worse)], group_ids=one_prompt)
    close(loss, 0.251150)


def test_pairwise_loss_weighs_prompts_not_pairs():
    # Prompt 7: 3 pairs Δ = (1, 2, 1), mean 0.251150. Prompt 3: one pair Δ = −1, 1.313262.
    # Per prompt: (0.251150 + 1.313262)/2 = 0.782206
    # Per pair would be (0.753451 + 1.313262)/4 = 0.516678
    chosen = torch.tensor([2.0, 2.0, 1.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.0, 0.0, 1.0])
    group_ids = torch.tensor([7, 7, 7, 3])
    loss = pairwise_ranking_loss(chosen, rejected, group_ids=group_ids)
    close(loss, 0.782206)
    close(pairwise_ranking_loss(chosen, rejected), 0.516678)
    # Weights: 1/(2·3) for prompt 7's pairs, 1/2 for prompt 3's: ∂L/∂r_c = −w·σ(−Δ)
    loss.backward()
    sig = torch.sigmoid
    expected = [
        -sig(torch.tensor(-1.0)) / 6,
        -sig(torch.tensor(-2.0)) / 6,
        -sig(torch.tensor(-1.0)) / 6,
        -sig(torch.tensor(1.0)) / 2,
    ]
    close(chosen.grad, torch.stack(expected))


def test_pairwise_loss_k2_group_reduces_to_plain_loss():
    torch.manual_seed(13)
    chosen, rejected = torch.randn(6), torch.randn(6)
    # One pair per prompt: per-prompt and per-pair weighting agree.
    close(
        pairwise_ranking_loss(chosen, rejected, group_ids=torch.arange(6)),
        pairwise_ranking_loss(chosen, rejected),
    )


def test_centering_penalty_hand_values():
    # Without groups each pair is a prompt: midpoints (1 + −1)/2 = 0 and (3 + 1)/2 = 2 → (0 + 4)/2 = 2
    chosen, rejected = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0])
    close(reward_centering_penalty(chosen, rejected), 2.0)
    # One prompt: its mean midpoint is 1 → 1
    close(reward_centering_penalty(chosen, rejected, group_ids=torch.tensor([5, 5])), 1.0)


def test_centering_penalty_of_a_full_ranking_is_the_squared_mean_reward():
    # Prompt 7: rewards (2, 0, −1) ranked best first, all 3 pairs: midpoints 1, 0.5, −0.5, mean 1/3
    # = the mean of the three rewards. Prompt 3: one pair (4, 2), mean 3. Penalty (1/9 + 9)/2 = 4.555556
    scores = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    better, worse = zip(*ranking_to_pairs(3, [0, 1, 2]))
    chosen = torch.cat([scores[list(better)], torch.tensor([4.0])])
    rejected = torch.cat([scores[list(worse)], torch.tensor([2.0])])
    group_ids = torch.tensor([7, 7, 7, 3])
    penalty = reward_centering_penalty(chosen, rejected, group_ids=group_ids)
    close(penalty, (1 / 9 + 9) / 2)
    # ∂/∂r_i = (1/2 prompts) · 2 · mean · (1/3 responses) = mean/3 = 1/9 for every response of prompt 7
    penalty.backward()
    close(scores.grad, [1 / 9, 1 / 9, 1 / 9])


def test_centering_penalty_ignores_differences_within_a_prompt():
    # Spreading a prompt's rewards around the same mean leaves the penalty alone; shifting them does not.
    group_ids = torch.tensor([0, 0, 1])
    base = reward_centering_penalty(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, -1.0, 0.5]), group_ids)
    spread = reward_centering_penalty(torch.tensor([3.0, 4.0, 0.5]), torch.tensor([-2.0, -3.0, 0.5]), group_ids)
    close(spread, base)
    shifted = reward_centering_penalty(torch.tensor([2.0, 3.0, 0.5]), torch.tensor([1.0, 0.0, 0.5]), group_ids)
    assert shifted.item() > base.item() + 0.5


def test_ranking_to_pairs():
    # Ranking best first (2, 0, 1): 2 ≻ 0, 2 ≻ 1, 0 ≻ 1
    assert ranking_to_pairs(3, [2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert len(ranking_to_pairs(4, [3, 1, 0, 2])) == 4 * 3 // 2
    assert ranking_to_pairs(2, [1, 0]) == [(1, 0)]


@pytest.mark.parametrize("bad_ranking", [[0, 0, 1], [0, 1], [0, 1, 3], [0, 1, 2, 3]])
def test_ranking_to_pairs_rejects_non_permutation(bad_ranking):
    with pytest.raises(ValueError, match="permutation"):
        ranking_to_pairs(3, bad_ranking)


def test_pairwise_accuracy_is_strict():
    # 1 > 0 right, 2 = 2 tie counts as wrong, 3 < 4 wrong -> 1/3
    close(pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])), 1 / 3)


# ======================================================================================
# Positions and LM loss (docs/ppo.md#11, docs/ppo.md#oracle-14)
# ======================================================================================


def test_exclusive_cumsum_positions():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    positions = exclusive_cumsum_positions(mask)
    assert positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3], [0, 1, 2, 3, 4]]
    assert positions.dtype == torch.long
    assert exclusive_cumsum_positions(mask.bool()).tolist() == positions.tolist()


def test_masked_lm_loss_hand_example():
    # V = 3. logits[t] predicts labels[t + 1]:
    #   t=0: logits (0, 0, ln 2) -> p = (1/4, 1/4, 1/2), label 2: −ln(1/2) = 0.693147
    #   t=1: label −100, ignored
    #   t=2: logits (ln 3, 0, 0) -> p = (3/5, 1/5, 1/5), label 0: −ln(3/5) = 0.510826
    #   t=3: predicts nothing (its logits are never used)
    # mean = (0.693147 + 0.510826)/2 = 0.601986 over 2 tokens
    logits = torch.tensor(
        [[[0.0, 0.0, math.log(2.0)], [5.0, -5.0, 1.0], [math.log(3.0), 0.0, 0.0], [9.0, 9.0, 9.0]]],
        requires_grad=True,
    )
    labels = torch.tensor([[1, 2, -100, 0]])
    loss, num_tokens = masked_lm_loss(logits, labels)
    close(loss, 0.601986)
    assert num_tokens.item() == 2
    loss.backward()
    assert torch.all(logits.grad[0, 1] == 0) and torch.all(logits.grad[0, 3] == 0)


def test_masked_lm_loss_matches_cross_entropy_and_handles_empty():
    torch.manual_seed(14)
    logits = torch.randn(2, 6, 10)
    labels = torch.randint(0, 10, (2, 6))
    labels[0, :3] = -100
    loss, num_tokens = masked_lm_loss(logits.bfloat16(), labels)
    expected = torch.nn.functional.cross_entropy(
        logits.bfloat16().float()[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert loss.dtype == torch.float32
    close(loss, expected, atol=1e-5)
    assert num_tokens.item() == 2 * 5 - 2  # labels[0, 1:3] are ignored

    empty_loss, empty_count = masked_lm_loss(logits, torch.full((2, 6), -100))
    assert empty_count.item() == 0 and empty_loss.item() == 0.0


def test_linear_cross_entropy_sum_hand_example():
    # D = 2, V = 3, weight rows e0, e1, (1, 1); no bias.
    #   h = (0, 0): logits (0, 0, 0), target 1: −ln(1/3) = 1.098612; d/dz = (1/3, −2/3, 1/3)
    #   h = (ln 2, 0): logits (ln 2, 0, ln 2), p = (2/5, 1/5, 2/5), target 0: −ln(2/5) = 0.916291;
    #   d/dz = (−3/5, 1/5, 2/5)
    # sum = 2.014903; d/dh = d/dz · W: row 0 (1/3 + 1/3, −2/3 + 1/3) = (2/3, −1/3), row 1 (−1/5, 3/5)
    # d/dW = Σ_rows (d/dz)ᵀ h: only row 1 has h ≠ 0: column 0 = ln 2 · (−3/5, 1/5, 2/5), column 1 = 0
    hidden = torch.tensor([[0.0, 0.0], [math.log(2.0), 0.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    loss = linear_cross_entropy_sum(hidden, weight, torch.tensor([1, 0]), chunk_rows=1)
    close(loss, 2.014903)
    loss.backward()
    close(hidden.grad, torch.tensor([[2 / 3, -1 / 3], [-1 / 5, 3 / 5]], dtype=torch.float64))
    ln2 = math.log(2.0)
    close(weight.grad, torch.tensor([[-0.6 * ln2, 0.0], [0.2 * ln2, 0.0], [0.4 * ln2, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("chunk_rows,align,with_bias", [(1, 1, False), (5, 1, True), (7, 64, True), (100, 8, False)])
def test_linear_cross_entropy_sum_equals_cross_entropy_of_the_logits(chunk_rows, align, with_bias):
    # The oracle: the loss and gradients of the logits made whole, in float64, for any chunking and padding.
    torch.manual_seed(15)
    hidden0, weight0, bias0 = torch.randn(23, 8, dtype=torch.float64), torch.randn(37, 8, dtype=torch.float64), \
        torch.randn(37, dtype=torch.float64)
    targets = torch.randint(0, 37, (23,))
    results = []
    for fused in (False, True):
        hidden, weight, bias = (t.clone().requires_grad_() for t in (hidden0, weight0, bias0))
        if fused:
            loss = linear_cross_entropy_sum(hidden, weight, targets, bias if with_bias else None,
                                            chunk_rows=chunk_rows, align=align)
        else:
            logits = torch.nn.functional.linear(hidden, weight, bias if with_bias else None)
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        (2.5 * loss).backward()  # the backward scales the stored gradients by the incoming one
        results.append((loss.detach(), hidden.grad, weight.grad, bias.grad))
    (loss, *grads), (fused_loss, *fused_grads) = results
    assert fused_loss.dtype == torch.float64
    close(fused_loss, loss, atol=1e-10)
    for name, grad, fused_grad in zip(("hidden", "weight", "bias"), grads, fused_grads):
        if grad is None:
            assert fused_grad is None and not with_bias, name
        else:
            torch.testing.assert_close(fused_grad, grad, rtol=1e-10, atol=1e-12, msg=name)


def test_linear_cross_entropy_sum_in_float32_frozen_weight_and_no_grad():
    torch.manual_seed(16)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(50, 16)  # frozen (LoRA): no weight gradient is asked for or made
    targets = torch.randint(0, 50, (40,))
    loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_rows=16)
    expected = torch.nn.functional.cross_entropy(hidden.detach() @ weight.t(), targets, reduction="sum")
    assert loss.dtype == torch.float32
    close(loss, expected, atol=1e-4)
    loss.backward()
    reference = hidden.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(reference @ weight.t(), targets, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        untracked = linear_cross_entropy_sum(hidden, weight, targets, chunk_rows=16)
    assert not untracked.requires_grad
    close(untracked, expected, atol=1e-4)


def test_linear_cross_entropy_sum_rejects_bad_arguments():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="chunk_rows and align must be >= 1"):
        linear_cross_entropy_sum(hidden, weight, torch.zeros(3, dtype=torch.long), chunk_rows=0)
    with pytest.raises(ValueError, match="hidden has 3 rows but targets 2"):
        linear_cross_entropy_sum(hidden, weight, torch.zeros(2, dtype=torch.long))


def test_linear_cross_entropy_sum_under_bf16_autocast_and_with_bf16_weights():
    # What a GPU run with training.mixed_precision=bf16 does (autocast), and a model kept in bf16.
    torch.manual_seed(17)
    hidden0, weight0, targets = torch.randn(100, 32), 0.3 * torch.randn(77, 32), torch.randint(0, 77, (100,))
    results = []
    for fused in (False, True):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_rows=30, align=64)
            else:
                loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets,
                                                         reduction="sum")
        loss.backward()
        results.append((loss, hidden.grad, weight.grad))
    (loss, hidden_grad, weight_grad), (fused_loss, fused_hidden_grad, fused_weight_grad) = results
    assert fused_loss.dtype == torch.float32 and fused_weight_grad.dtype == torch.float32
    close(fused_loss, loss, atol=1e-3)
    torch.testing.assert_close(fused_hidden_grad, hidden_grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_weight_grad, weight_grad, rtol=2e-2, atol=2e-2)
    hidden, weight = hidden0.bfloat16().requires_grad_(), weight0.bfloat16().requires_grad_()
    loss = linear_cross_entropy_sum(hidden, weight, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
