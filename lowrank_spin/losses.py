"""The training objectives (sft, spin, tspin) as pure functions over sequence log-probs.

Every objective takes summed (or length-normalised) response log-probabilities of shape [batch] and
returns per-example losses first, so the LightningModule decides how to reduce and what to log.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowrank_spin.settings import LOSS_TYPES

# exp(-margin) overflows float32 once -margin > 88; clamping keeps the exponential loss finite for
# extreme log-probs (its gradient is zero beyond the clamp, as for any saturated loss).
_MAX_EXPONENT = 50.0


def sft_loss(real_logps: torch.Tensor, real_tokens: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of the real responses over the whole batch (the SFT baseline), from each response's
    summed log-prob and token count: −Σ log pθ(y) / Σ |y|, every token weighted alike."""
    return -real_logps.sum() / real_tokens.sum().clamp(min=1)


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    opponent_real_logps: torch.Tensor,
    opponent_generated_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "logistic",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPIN objective (Chen et al. 2024, Eq. 4.7).

        real_rewards      = β·(log pθ(y|x)  − log pθt(y|x))
        generated_rewards = β·(log pθ(y'|x) − log pθt(y'|x))
        loss              = ℓ(real_rewards − generated_rewards)

    with ℓ one of the monotonically decreasing convex losses of Assumption 5.1:
    logistic log(1 + e^−t) (default), hinge max(0, 1 − t), exponential e^−t, correlation 1 − t.
    Returns (per-example losses, real_rewards, generated_rewards), each of shape [batch].
    """
    real_rewards = beta * (policy_real_logps - opponent_real_logps)
    generated_rewards = beta * (policy_generated_logps - opponent_generated_logps)
    margin = real_rewards - generated_rewards
    if loss_type == "logistic":
        losses = F.softplus(-margin)  # log(1 + e^−t), stable for any t
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - margin)
    elif loss_type == "exponential":
        losses = torch.exp((-margin).clamp(max=_MAX_EXPONENT))
    elif loss_type == "correlation":
        losses = 1.0 - margin
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, real_rewards, generated_rewards


def tspin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    policy_proto_logps: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T-SPIN objective (arXiv 2601.08198), reference-free:

        loss = −log σ(α·[log pθ(y) − log pθ(y')]) − β·log σ(α·[log pθ(y') − log pθ(y0)])

    The first term is self-play against the latest generated response y'; the second, the
    historical advantage, keeps y' ahead of the proto-synthetic response y0 of the initial model.
    Returns (per-example losses, current advantage α·(y − y'), historical advantage α·(y' − y0)).
    """
    current_advantage = alpha * (policy_real_logps - policy_generated_logps)
    historical_advantage = alpha * (policy_generated_logps - policy_proto_logps)
    losses = -F.logsigmoid(current_advantage) - beta * F.logsigmoid(historical_advantage)
    return losses, current_advantage, historical_advantage
