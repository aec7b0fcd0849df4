"""The RL math of RLHF as small pure tensor functions.

No state, no config objects: every function takes tensors and floats and returns tensors
(or plain Python values where noted). Symbols follow the papers (gamma, lam, ε as
``clip_eps``) and the formulas of ``docs/ppo.md#formulas``.

Conventions shared by every function:

- A *mask* is 1 (or True) on positions that count and 0 elsewhere. Positions with mask 0
  never influence a result: they are removed with ``torch.where`` rather than multiplied by
  0, so NaN/inf garbage at pads cannot leak in, neither forward nor through gradients.
- Statistics and losses are computed in at least float32: bf16/fp16 inputs are upcast,
  float64 stays float64 (so property tests can compare against closed forms exactly).
- Shapes: ``B`` = batch, ``T`` = response (or sequence) length, ``V`` = vocabulary size,
  ``P`` = number of comparison pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "masked_moments",
    "whiten_from_moments",
    "logprobs_from_logits",
    "entropy_from_logits",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "truncate_after_eos",
    "last_valid_index",
    "per_token_rewards",
    "gae_advantages",
    "clipped_policy_loss",
    "clipped_value_loss",
    "explained_variance",
    "pairwise_ranking_loss",
    "reward_centering_penalty",
    "ranking_to_pairs",
    "pairwise_accuracy",
    "adaptive_kl_coef",
    "exclusive_cumsum_positions",
    "masked_lm_loss",
    "linear_cross_entropy_sum",
]

# Bound on |log π_ref − log π| before exp in k3 (ORL `compute_approx_kl` clamps the same way):
# exp(20) ≈ 4.9e8 is finite in fp32, while a token the policy has all but ruled out
# (log-ratio of, say, 100) would give exp = inf, an inf reward and NaN advantages.
_MAX_LOG_RATIO = 20.0


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` in float32 if it is of lower precision (or integer), else as is."""
    if tensor.dtype in (torch.float32, torch.float64):
        return tensor
    return tensor.float()


def _zero_where_masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not values * mask: 0 * inf = NaN, and garbage at pads must not matter.
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


# --------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` over positions where ``mask`` is 1.

    Args:
        values: any shape, e.g. (B, T).
        mask: same shape as ``values``; 1/True = counts.
        dim: dimension to reduce; None reduces over all elements (scalar result).

    Returns:
        The masked sum, float32 or float64.
    """
    kept = _zero_where_masked(_upcast(values), mask)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1; 0 where nothing is masked in.

    This is the token-level average of N+/TRL/DSC (docs/ppo.md#39): every valid token of
    the minibatch weighs the same, whatever sequence it belongs to.

    Args:
        values: any shape, e.g. (B, T).
        mask: same shape as ``values``, 0/1 or bool.
        dim: dimension to reduce; None reduces over all elements (scalar result).

    Returns:
        The masked mean, float32 or float64. An empty selection gives 0, not NaN.
    """
    total = masked_sum(values, mask, dim)
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    # count is an integer, so clamping at 1 only changes the empty case, where total is 0.
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of ``values`` over all positions where ``mask`` is 1 (a scalar).

    Biased (divide by n) by default, like LHP and N+ (TF `moments`); TRL 0.29 uses Bessel's
    correction (docs/ppo.md#23), available as ``unbiased=True`` (divide by n − 1).
    With too few elements (n = 0, or n = 1 when unbiased) the result is 0 rather than NaN,
    so a whitening over a single token yields 0 instead of poisoning the batch.

    Args:
        values: any shape, e.g. (B, T).
        mask: same shape as ``values``, 0/1 or bool.
        unbiased: divide by n − 1 instead of n.

    Returns:
        Scalar variance, float32 or float64.
    """
    mean = masked_mean(values, mask)
    centered = _zero_where_masked(_upcast(values) - mean, mask)
    count = mask.bool().sum()
    denominator = count - 1 if unbiased else count
    # When denominator <= 0 the sum of squares is 0 too, so the clamp turns 0/0 into 0.
    return centered.square().sum() / denominator.clamp(min=1).to(centered.dtype)


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    unbiased: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Normalise ``values`` to masked mean 0 and variance 1; 0 at masked positions.

    Â = (x − μ)/√(σ² + eps) with μ, σ² taken over all masked-in elements (docs/ppo.md#formulas,
    docs/ppo.md#23). ``shift_mean=False`` adds μ back, so only the scale changes: LHP's reward
    whitening for the books tasks (docs/ppo.md#21).

    Args:
        values: any shape, e.g. advantages (B, T).
        mask: same shape as ``values``, 0/1 or bool.
        shift_mean: subtract the mean (True) or keep it (False).
        unbiased: use the n − 1 variance (TRL 0.29) instead of the n variance (LHP, N+).
        eps: added to the variance; 1e-8 as in LHP/N+/TRL.

    Returns:
        Tensor of the shape of ``values``, float32 or float64.
    """
    values = _upcast(values)
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=unbiased)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_where_masked(whitened, mask)


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of the masked-in ``values``, in float64.

    Moments add up: summed over the shards of a batch (e.g. ``all_reduce`` over processes) they are
    the moments of the whole batch, which ``whiten_from_moments`` turns into its whitening.

    Args:
        values: any shape, e.g. (B, T).
        mask: same shape, 0/1 or bool.
    Returns:
        (3,) float64 tensor.
    """
    kept = _zero_where_masked(values.double(), mask)
    return torch.stack([mask.bool().sum().double(), kept.sum(), kept.square().sum()])


def whiten_from_moments(values: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor,
                        eps: float = 1e-8) -> torch.Tensor:
    """``values`` whitened with the mean and (biased) variance of ``moments`` (from ``masked_moments``,
    possibly summed over shards); 0 at masked positions. On the moments of ``values`` alone this is
    ``masked_whiten`` up to float rounding (the variance is E[x²] − E[x]², in float64).

    Returns:
        Tensor of the shape and (at least float32) dtype of ``values``.
    """
    count, total, total_sq = moments.tolist()
    count = max(count, 1.0)
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    values = _upcast(values)
    return _zero_where_masked((values - mean) * (var + eps) ** -0.5, mask)


# --------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------


def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Divide by the sampling temperature wherever logprobs are computed, or the ratio
    # compares different distributions (docs/ppo.md#10). fp32 log-softmax: docs/ppo.md#38.
    return _upcast(logits) / temperature


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each token under softmax(logits / temperature).

    ℓ_t = z_t[a_t] − logsumexp(z_t), z = logits/τ; no one-hot tensor is built.

    Args:
        logits: (B, T, V), already aligned so that ``logits[:, t]`` predicts ``tokens[:, t]``.
        tokens: (B, T) long token ids, each in [0, V); overwrite pad ids that are outside
            the vocabulary before calling (docs/ppo.md#42).
        temperature: τ > 0, the one used for sampling.

    Returns:
        (B, T) log-probabilities, float32 (float64 for float64 logits).
    """
    scaled = _scaled_logits(logits, temperature)
    # −cross-entropy is z_t[a_t] − logsumexp(z_t) in one fused kernel each way (log-softmax, then the gather):
    # 4-5x faster on CPU than gather − logsumexp for a PPO batch's (B, T, 8k) logits, and nothing (B, T, V)
    # is kept for backward but the log-softmax. No ignore_index a token id can take: a -100 label (the usual
    # "ignore" id) is an out-of-range token here and raises, as the gather did, instead of giving logprob 0.
    flat = -F.cross_entropy(scaled.reshape(-1, scaled.shape[-1]), tokens.reshape(-1).long(), reduction="none",
                            ignore_index=torch.iinfo(torch.long).min)
    return flat.view(tokens.shape)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position.

    H_t = logsumexp(z_t) − Σ_v softmax(z_t)_v · z_{t,v} (docs/ppo.md#formulas, Diagnostics), equal to
    ``torch.distributions.Categorical(logits=z).entropy()``.

    Args:
        logits: (B, T, V).
        temperature: τ > 0.

    Returns:
        (B, T) entropies in nats, float32 (float64 for float64 logits).
    """
    scaled = _scaled_logits(logits, temperature)
    probs = torch.softmax(scaled, dim=-1)
    return torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(-1)


# --------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence"; docs/ppo.md#18, docs/ppo.md#oracle-6)
# All estimate KL(π ‖ π_ref) per token from tokens sampled from π.
# --------------------------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref: unbiased, can be negative per token.

    The estimator of LHP, N+, DSC and the TRL/ORL default when the KL goes into the reward.

    Args:
        logprobs: (B, T) log π(a_t) of the sampled tokens.
        ref_logprobs: (B, T) log π_ref(a_t) of the same tokens.

    Returns:
        (B, T) per-token estimate.
    """
    return _upcast(logprobs) - _upcast(ref_logprobs)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π − log π_ref)²: ≥ 0, biased, low variance.

    Args:
        logprobs: (B, T) log π(a_t) of the sampled tokens.
        ref_logprobs: (B, T) log π_ref(a_t) of the same tokens.

    Returns:
        (B, T) per-token estimate.
    """
    return 0.5 * kl_k1(logprobs, ref_logprobs).square()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (ρ − 1) − log ρ with ρ = π_ref/π: ≥ 0 and unbiased.

    The log-ratio is clamped to ±20 before exp (as ORL does) so a token the policy nearly
    never emits cannot overflow exp to inf; e^x − 1 − x stays ≥ 0 after clamping.

    Args:
        logprobs: (B, T) log π(a_t) of the sampled tokens.
        ref_logprobs: (B, T) log π_ref(a_t) of the same tokens.

    Returns:
        (B, T) per-token estimate.
    """
    log_ratio = (_upcast(ref_logprobs) - _upcast(logprobs)).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (torch.exp(log_ratio) - 1) - log_ratio


_KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate with the named estimator.

    Use "k1" when the KL goes into the reward (the default of every reference); "k2"/"k3"
    when it is a loss term, since ∇k1 is zero in expectation (docs/ppo.md#18).

    Args:
        logprobs: (B, T) log π(a_t) of the sampled tokens.
        ref_logprobs: (B, T) log π_ref(a_t) of the same tokens.
        estimator: "k1", "k2" or "k3".

    Returns:
        (B, T) per-token estimate.
    """
    try:
        fn = _KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; expected one of {sorted(_KL_ESTIMATORS)}"
        ) from None
    return fn(logprobs, ref_logprobs)


# --------------------------------------------------------------------------------------
# Responses, masks and rewards
# --------------------------------------------------------------------------------------


def truncate_after_eos(
    response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace every token after the first EOS with PAD; keep the EOS (N+/TRL truncation).

    Args:
        response_ids: (B, T) generated token ids.
        eos_token_id: id of the stop token.
        pad_token_id: id written after it; should differ from ``eos_token_id`` (docs/ppo.md#2).

    Returns:
        truncated_ids: (B, T) same dtype as ``response_ids``.
        response_mask: (B, T) long, 1 up to and including the first EOS, or everywhere when
            the row has no EOS (m_t of docs/ppo.md#formulas).
        ended: (B,) bool, whether the row contains an EOS; rows without one get the
            missing-EOS penalty (docs/ppo.md#14).
    """
    is_eos = response_ids == eos_token_id
    # A position is kept iff no EOS occurs strictly before it: exclusive cumsum == 0.
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    keep = eos_before == 0
    truncated_ids = torch.where(keep, response_ids, torch.full_like(response_ids, pad_token_id))
    return truncated_ids, keep.long(), is_eos.any(-1)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 in every row (t* of docs/ppo.md#formulas).

    Works for left and right padding alike. Rows with no 1 give 0.

    Args:
        mask: (B, T), 0/1 or bool.

    Returns:
        (B,) long indices.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(-1).values.clamp(min=0)


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: −β·KL on every response token plus the score on the last one.

    r_t = m_t·(−β·k_t) + s·𝟙[t = t*] (docs/ppo.md#formulas, docs/ppo.md#17). The score goes on t*, the last
    valid token (the EOS when there is one), not on t*+1 as in N+/TRL/DSC (docs/ppo.md#40), so the
    advantage at the EOS sees the score directly and no value read at a pad matters.

    Args:
        scores: (B,) sequence-level reward-model scores s.
        kl: (B, T) per-token KL estimate k_t (e.g. from :func:`kl_penalty`).
        response_mask: (B, T), 1 on response tokens up to and including the EOS.
        kl_coef: β.

    Returns:
        (B, T) rewards, 0 where ``response_mask`` is 0 (all-pad rows get no score).
    """
    kl = _upcast(kl)
    mask = response_mask.bool()
    rewards = -kl_coef * _zero_where_masked(kl, mask)
    positions = torch.arange(kl.shape[-1], device=kl.device)
    is_last = (positions == last_valid_index(mask).unsqueeze(-1)) & mask
    return rewards + torch.where(is_last, scores.to(rewards.dtype).unsqueeze(-1), 0.0)


# --------------------------------------------------------------------------------------
# Generalised advantage estimation (Schulman et al. 2016; docs/ppo.md#formulas, docs/ppo.md#22 to #24)
# --------------------------------------------------------------------------------------


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and value targets (returns), detached.

    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  G_t = A_t + V_t.

    Every masked position is terminal: its V and A count as 0, so V beyond t* is 0 and the
    values and rewards written at pads (e.g. a critic's output at a pad token) never
    matter. G is computed here, before any advantage whitening, which the caller does
    separately (docs/ppo.md#24: the value target is not whitened).

    Args:
        rewards: (B, T) per-token rewards (see :func:`per_token_rewards`).
        values: (B, T) critic values V_t of the state before token t (rollout-time).
        response_mask: (B, T), 1 on response tokens up to and including the EOS.
        gamma: discount γ (1.0 in every reference).
        lam: GAE λ (0.95 in LHP/N+/TRL; 1.0 in ORL).

    Returns:
        advantages: (B, T), 0 at masked positions, no grad.
        returns: (B, T), A + V, 0 at masked positions, no grad.
    """
    mask = response_mask.bool()
    rewards = _zero_where_masked(_upcast(rewards.detach()), mask)
    values = _zero_where_masked(_upcast(values.detach()), mask)

    # A plain reverse loop over T (responses are short); rows are processed in parallel.
    # V_{T} := 0 and A_{T} := 0: nothing follows the last position.
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # At a pad, δ would be 0 anyway for right padding (r = V = 0 there); zeroing makes
        # every masked position terminal for the token before it, whatever the layout.
        advantage = torch.where(mask[:, t], advantage, 0.0)
        advantages_reversed.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = _zero_where_masked(advantages + values, mask)
    return advantages, returns


# --------------------------------------------------------------------------------------
# PPO losses (Schulman et al. 2017; docs/ppo.md#formulas, policy and value loss)
# --------------------------------------------------------------------------------------


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss, token-level masked mean.

    ρ_t = exp(log π_θ − ℓ_t),  L = Σ m_t·max(−Â_t·ρ_t, −Â_t·clip(ρ_t, 1−ε, 1+ε)) / Σ m_t.
    At ρ = 1 its gradient w.r.t. log π_θ(a_t) is −m_t·Â_t/Σm (the vanilla policy gradient).

    Args:
        logprobs: (B, T) log π_θ(a_t), with grad.
        old_logprobs: (B, T) rollout log-probabilities ℓ_t (no grad needed).
        advantages: (B, T) Â_t, usually whitened; treated as constants.
        response_mask: (B, T), 1 on tokens in the loss.
        clip_eps: ε (0.2 everywhere in the references).

    Returns:
        loss: scalar.
        stats: detached scalars ``clipfrac`` (share of tokens where the clipped term is
            strictly larger, i.e. the clip is active), ``approx_kl`` (½·mean (log π_θ − ℓ)²,
            docs/ppo.md#34) and ``ratio_mean``.
    """
    mask = response_mask.bool()
    # Mask the log-ratio *before* exp: garbage at pads could make exp = inf, and inf * 0 in
    # the backward of where() would give NaN gradients.
    log_ratio = _zero_where_masked(_upcast(logprobs) - _upcast(old_logprobs).detach(), mask)
    ratio = torch.exp(log_ratio)
    advantages = _zero_where_masked(_upcast(advantages).detach(), mask)

    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # The pessimistic (larger) loss: flat in ρ once the clip helps the objective.
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio.square(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, token-level masked mean.

    V^c = V_old + clip(V − V_old, −ε_v, ε_v),  L = ½·Σ m·max((V − G)², (V^c − G)²) / Σ m.
    ε_v is in reward units (0.2 in LHP/N+/TRL), meaningful only with normalised rewards.

    Args:
        values: (B, T) current critic values V_θ, with grad.
        old_values: (B, T) rollout values V_old.
        returns: (B, T) value targets G (unwhitened).
        response_mask: (B, T), 1 on tokens in the loss.
        clip_eps: ε_v.

    Returns:
        loss: scalar.
        stats: detached scalar ``value_clipfrac``, the share of tokens where the clipped
            error is strictly larger than the unclipped one (gradient 0 there).
    """
    mask = response_mask.bool()
    values = _zero_where_masked(_upcast(values), mask)
    old_values = _zero_where_masked(_upcast(old_values).detach(), mask)
    returns = _zero_where_masked(_upcast(returns).detach(), mask)

    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)

    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explained variance of the critic: 1 − Var(G − V)/Var(G) over masked positions.

    1 is a perfect critic, 0 no better than a constant, < 0 worse (LHP `var_explained`).
    When Var(G) = 0 there is nothing to explain and we return 0 rather than NaN (cleanrl
    returns NaN), so the metric stays a plain number in metrics.jsonl.

    Args:
        values: (B, T) critic values V.
        returns: (B, T) value targets G.
        mask: (B, T), 1 on tokens that count.

    Returns:
        Scalar tensor (float32 or float64), detached.
    """
    with torch.no_grad():
        values, returns = _upcast(values), _upcast(returns)
        var_returns = masked_var(returns, mask)
        var_residual = masked_var(returns - values, mask)
        explained = 1 - var_residual / var_returns.clamp(min=torch.finfo(var_returns.dtype).tiny)
        return torch.where(var_returns > 0, explained, torch.zeros_like(explained))


# --------------------------------------------------------------------------------------
# Reward model (pairwise preferences; docs/ppo.md#5, docs/ppo.md#8, docs/ppo.md#oracle-8)
# --------------------------------------------------------------------------------------


def _group_index_and_sizes(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) dense group index 0..G-1 of each pair (ids may be any values) and (G,) pairs per group."""
    _, group_index = torch.unique(group_ids, return_inverse=True)
    return group_index, torch.bincount(group_index)


def pairwise_ranking_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley–Terry loss −log σ(r_c − r_r − margin), averaged per prompt or per pair.

    With ``group_ids`` every group (a prompt's C(K,2) pairs) counts once: the loss is the
    mean over groups of the mean over that group's pairs. This is InstructGPT's batching
    (IGPT §3.5): pairs of one ranking are correlated, and weighing them as independent
    examples overfits. Without ``group_ids`` it is the plain mean over pairs.

    Args:
        chosen_rewards: (P,) scores of the preferred responses.
        rejected_rewards: (P,) scores of the other responses.
        margin: optional float or (P,) margin subtracted inside the sigmoid.
        group_ids: optional (P,) integer id of each pair's prompt (any values).

    Returns:
        Scalar loss, float32 (float64 for float64 inputs).
    """
    logits = _upcast(chosen_rewards) - _upcast(rejected_rewards)
    if margin is not None:
        logits = logits - margin
    # logsigmoid is stable for large |Δ|; log(sigmoid(Δ)) underflows to -inf.
    per_pair = -F.logsigmoid(logits)
    if group_ids is None:
        return per_pair.mean()
    group_index, pairs_per_group = _group_index_and_sizes(group_ids)
    num_groups = pairs_per_group.numel()
    # Weight 1/(num_groups · |group|) per pair = mean over groups of the in-group mean.
    weights = 1.0 / (pairs_per_group[group_index].to(per_pair.dtype) * num_groups)
    return (weights * per_pair).sum()


def reward_centering_penalty(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over prompts of the square of the prompt's mean reward (Eisenstein et al. 2023).

    The ranking loss only sees differences within a prompt, so each prompt's reward level is
    left to chance: nothing in the loss stops the model from adding a different constant per
    prompt. PPO then sees that constant as reward, and with few samples per prompt it is noise
    in the advantages that the critic has to learn away. This auxiliary term pulls every
    prompt's mean reward towards 0 and leaves the differences, which the ranking loss fixes,
    alone. A prompt's mean is taken over its pairs' midpoints (r_c + r_r)/2; with all
    K(K−1)/2 pairs of a ranking every response appears K−1 times, so that is the mean over the
    K responses. TRL's ``center_rewards_coefficient`` adds mean((r_c + r_r)²) over pairs,
    which for one pair per prompt is 4× this term.

    Args:
        chosen_rewards, rejected_rewards: (P,) scores of each pair's responses.
        group_ids: optional (P,) id of each pair's prompt; without it every pair is its own prompt.

    Returns:
        Scalar loss, float32 (float64 for float64 inputs).
    """
    midpoints = (_upcast(chosen_rewards) + _upcast(rejected_rewards)) / 2
    if group_ids is None:
        return midpoints.square().mean()
    group_index, pairs_per_group = _group_index_and_sizes(group_ids)
    sums = torch.zeros(pairs_per_group.numel(), dtype=midpoints.dtype, device=midpoints.device)
    sums.index_add_(0, group_index, midpoints)
    return (sums / pairs_per_group.to(midpoints.dtype)).square().mean()


def ranking_to_pairs(num_responses: int, ranking: Sequence[int]) -> list[tuple[int, int]]:
    """All K(K−1)/2 ordered (better, worse) pairs of a ranking given best first.

    Args:
        num_responses: K, the number of ranked responses.
        ranking: the K response indices ordered best first, a permutation of range(K).

    Returns:
        List of (better_index, worse_index), in order: best vs each lower one, then the
        second best vs each lower one, and so on. K = 1 gives no pair.
    """
    order = [int(index) for index in ranking]
    if sorted(order) != list(range(num_responses)):
        raise ValueError(
            f"ranking must be a permutation of range({num_responses}) listing response indices "
            f"best first, got {order}"
        )
    return [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Share of pairs with r_c > r_r, strictly (ties count as wrong; docs/ppo.md#8).

    Args:
        chosen_rewards: (P,) scores of the preferred responses.
        rejected_rewards: (P,) scores of the other responses.

    Returns:
        Scalar float32 tensor in [0, 1], detached.
    """
    return (chosen_rewards.detach() > rejected_rewards.detach()).float().mean()


# --------------------------------------------------------------------------------------
# KL coefficient controller (Ziegler et al. 2019, §2.2; docs/ppo.md#20)
# --------------------------------------------------------------------------------------


def adaptive_kl_coef(
    kl_coef: float, observed_kl: float, target_kl: float, horizon: float, num_episodes: int
) -> float:
    """One step of the proportional KL controller: β ← β·(1 + e·n/horizon).

    e = clip(KL/target − 1, −0.2, 0.2); the clip bounds the change per update however far
    the KL is from the target.

    Args:
        kl_coef: current β.
        observed_kl: batch mean of the per-sequence summed k1 KL.
        target_kl: target KL (6 nats in LHP).
        horizon: episodes over which the error is corrected (10 000 in LHP).
        num_episodes: n, episodes in this update (the rollout batch size).

    Returns:
        The new β as a Python float.
    """
    if target_kl <= 0 or horizon <= 0:
        raise ValueError(f"target_kl and horizon must be > 0, got {target_kl} and {horizon}")
    error = min(max(float(observed_kl) / target_kl - 1.0, -0.2), 0.2)
    return float(kl_coef) * (1.0 + error * num_episodes / horizon)


# --------------------------------------------------------------------------------------
# Positions and language-model loss
# --------------------------------------------------------------------------------------


def exclusive_cumsum_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids = exclusive cumulative sum of the attention mask.

    The first real token of a left-padded row gets position 0, as in generation, so a
    training forward matches the rollout (docs/ppo.md#11; LHP `positions_for`).

    Args:
        attention_mask: (B, T), 1 on real tokens.

    Returns:
        (B, T) long position ids; pads get the count of real tokens before them.
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - mask).clamp(min=0)


def masked_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: ``logits[:, t]`` predicts ``labels[:, t + 1]``.

    Used by SFT and by the PPO-ptx term (IGPT C.4). Computed in float32.

    Args:
        logits: (B, T, V).
        labels: (B, T) token ids, ``ignore_index`` where no loss is taken (prompt, pads).
        ignore_index: label value to skip.

    Returns:
        loss_mean: scalar mean over the non-ignored predicted tokens (0 if there are none).
        num_tokens: scalar long tensor, the number of those tokens (to re-weight across
            gradient-accumulation steps: loss_mean · num_tokens is the sum).
    """
    shifted_logits = _upcast(logits[:, :-1])
    shifted_labels = labels[:, 1:]
    loss_sum = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    num_tokens = (shifted_labels != ignore_index).sum()
    return loss_sum / num_tokens.clamp(min=1), num_tokens


class _LinearCrossEntropySum(torch.autograd.Function):
    """Σ_i CE(hidden_i · Wᵀ + b, target_i), its gradients computed in the forward, chunk by chunk.

    Each chunk's logits are made, reduced to their loss and turned into their gradient
    (softmax − one-hot) at once, then dropped: the full (N, V) logits, their log-softmax and
    its gradient never exist, and the backward only scales the stored input gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, align, grad_enabled):
        vocab = weight.shape[0]
        padding = -vocab % align
        if padding:  # zero rows to an aligned width (fast GEMM kernels); their logits are cut before the softmax
            weight = F.pad(weight, (0, 0, 0, padding))
            bias = None if bias is None else F.pad(bias, (0, padding))
        # needs_input_grad says what requires a gradient even under no_grad; then none is made.
        need_hidden, need_weight, need_bias = (grad_enabled and needed for needed in ctx.needs_input_grad[:3])
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # float64 stays float64
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if need_bias else None
        loss_sum = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            hidden_chunk = hidden[start:start + chunk_rows]
            target_chunk = targets[start:start + chunk_rows]
            padded_logits = _upcast(F.linear(hidden_chunk, weight, bias))
            logits = padded_logits[:, :vocab]
            log_normalizer = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(len(target_chunk), device=logits.device)
            loss_sum += (log_normalizer - logits[rows, target_chunk]).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d loss / d logits = softmax - one-hot, made in the logits' own memory
            grad_logits = logits.sub_(log_normalizer[:, None]).exp_()
            grad_logits[rows, target_chunk] -= 1.0
            if padding:
                padded_logits[:, vocab:] = 0.0
            # The gradient matmuls in the forward's dtypes (under autocast: its dtype), accumulated in float32.
            grad_padded = padded_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:start + chunk_rows] = grad_padded @ weight.to(hidden.dtype)
            if need_weight:
                chunk_grad_weight = grad_padded.t() @ hidden_chunk.to(grad_padded.dtype)
                grad_weight += chunk_grad_weight.to(accumulate)
            if need_bias:
                grad_bias += padded_logits.sum(dim=0).to(accumulate)
        if need_weight:
            grad_weight = grad_weight[:vocab].to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias[:vocab].to(bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [None if grad is None else grad * grad_loss.to(grad.dtype)
                  for grad in (grad_hidden, grad_weight, grad_bias)]
        return (*scaled, None, None, None, None)


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_rows: int = 256,
    align: int = 1,
) -> torch.Tensor:
    """Summed next-token cross-entropy of the logits ``hidden @ weight.T + bias``, without the logits.

    The same value and gradients as ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets,
    reduction="sum")`` up to float rounding (logits and loss in at least float32), computed ``chunk_rows``
    rows at a time, each chunk's gradient made in the forward pass (the "fused linear cross-entropy" of
    Liger-Kernel, here in plain torch operations): memory for one chunk's logits instead of all of them,
    and one pass over them instead of log-softmax, its saved output and its backward.

    Args:
        hidden: (N, D) the hidden states of the N predicted positions.
        weight: (V, D) the output projection; ``bias``: (V,) or None.
        targets: (N,) token ids, all of them trained (select the positions beforehand).
        chunk_rows: rows per chunk: bigger chunks make bigger matmuls, smaller ones less memory.
        align: compute with the vocabulary padded by zero rows to a multiple of this (GPU GEMM
            alignment); the padded logits never enter the softmax.

    Returns:
        A scalar (float32, or float64 for float64 inputs). Without grad mode, or when no input requires a
        gradient, no gradient is made.
    """
    if chunk_rows < 1 or align < 1:
        raise ValueError(f"chunk_rows and align must be >= 1, got {chunk_rows} and {align}")
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets {targets.shape[0]}")
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, chunk_rows, align, torch.is_grad_enabled())
