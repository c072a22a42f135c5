import math

import pytest
import torch
import torch.nn.functional as F

from lowrank_spin.batching import IGNORE_INDEX, sequence_logps
from lowrank_spin.losses import sft_loss, spin_loss, tspin_loss
from lowrank_spin.settings import LOSS_TYPES


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_spin_loss_logistic_by_hand():
    """β = 0.1; policy real −10, opponent real −12 → real reward 0.1·2 = 0.2;
    policy generated −20, opponent generated −18 → generated reward 0.1·(−2) = −0.2;
    margin 0.4 → loss log(1 + e^−0.4) = 0.513015."""
    losses, real, generated = spin_loss(t(-10.0), t(-20.0), t(-12.0), t(-18.0), beta=0.1)
    assert real.item() == pytest.approx(0.2)
    assert generated.item() == pytest.approx(-0.2)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.4)), rel=1e-6)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        # margin t = 0.4 (as above)
        ("hinge", 0.6),  # max(0, 1 − 0.4)
        ("exponential", math.exp(-0.4)),  # e^−0.4
        ("correlation", 0.6),  # 1 − 0.4
    ],
)
def test_spin_loss_types_by_hand(loss_type, expected):
    losses, _, _ = spin_loss(t(-10.0), t(-20.0), t(-12.0), t(-18.0), beta=0.1, loss_type=loss_type)
    assert losses.item() == pytest.approx(expected, rel=1e-6)


def test_spin_loss_hinge_is_zero_past_margin_one():
    """β = 1, margin = (−1 − −5) − (−9 − −7) = 4 + 2 = 6 > 1 → hinge 0, logistic log(1+e^−6)."""
    hinge, _, _ = spin_loss(t(-1.0), t(-9.0), t(-5.0), t(-7.0), beta=1.0, loss_type="hinge")
    logistic, _, _ = spin_loss(t(-1.0), t(-9.0), t(-5.0), t(-7.0), beta=1.0)
    assert hinge.item() == 0.0
    assert logistic.item() == pytest.approx(math.log1p(math.exp(-6.0)), rel=1e-6)


def test_spin_loss_equal_to_opponent_is_log2():
    """At the start of an iteration the policy equals its opponent: margin 0, logistic loss log 2."""
    logps = t(-3.0, -40.0)
    losses, real, generated = spin_loss(logps, logps - 1, logps, logps - 1)
    assert torch.allclose(losses, torch.full((2,), math.log(2.0)))
    assert torch.equal(real, torch.zeros(2)) and torch.equal(generated, torch.zeros(2))


def test_tspin_loss_by_hand():
    """α = 1, β = 0.1; real −10, generated −12, proto −11:
    −log σ(2) − 0.1·log σ(−1) = 0.126928 + 0.1·1.313262 = 0.258254."""
    losses, current, historical = tspin_loss(t(-10.0), t(-12.0), t(-11.0), alpha=1.0, beta=0.1)
    expected = math.log1p(math.exp(-2.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    assert current.item() == pytest.approx(2.0)
    assert historical.item() == pytest.approx(-1.0)


def test_tspin_alpha_scales_both_terms():
    """α = 2: −log σ(2·2) − 0.1·log σ(2·(−1))."""
    losses, _, _ = tspin_loss(t(-10.0), t(-12.0), t(-11.0), alpha=2.0, beta=0.1)
    expected = math.log1p(math.exp(-4.0)) + 0.1 * math.log1p(math.exp(2.0))
    assert losses.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.1), (2.0, 0.5)])
def test_tspin_loss_gradients_by_hand(alpha, beta):
    """With u = α·(y − y'), v = α·(y' − y0) and loss = −log σ(u) − β·log σ(v), since d(−log σ(t))/dt = −σ(−t):
    d/dy = −α·σ(−u),  d/dy' = α·σ(−u) − αβ·σ(−v),  d/dy0 = αβ·σ(−v).
    Checked against autograd through `tspin_loss` in float64, and its own gradients by finite differences."""
    generator = torch.Generator().manual_seed(0)
    real, generated, proto = (
        (-5 - 10 * torch.rand(5, generator=generator, dtype=torch.float64)).requires_grad_() for _ in range(3)
    )
    losses, _, _ = tspin_loss(real, generated, proto, alpha=alpha, beta=beta)
    grads = torch.autograd.grad(losses.sum(), (real, generated, proto))
    u, v = alpha * (real - generated).detach(), alpha * (generated - proto).detach()
    expected = (
        -alpha * torch.sigmoid(-u),
        alpha * torch.sigmoid(-u) - alpha * beta * torch.sigmoid(-v),
        alpha * beta * torch.sigmoid(-v),
    )
    for grad, by_hand in zip(grads, expected):
        torch.testing.assert_close(grad, by_hand, rtol=1e-12, atol=1e-15)
    loss_only = lambda *logps: tspin_loss(*logps, alpha=alpha, beta=beta)[0]
    assert torch.autograd.gradcheck(loss_only, (real, generated, proto), fast_mode=True)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_spin_loss_finite_for_extreme_logps(loss_type):
    extreme = t(-1e4, 0.0, -1e4)
    losses, real, generated = spin_loss(
        extreme, extreme.flip(0) * 0 - 1e4, t(0.0, -1e4, 0.0), t(0.0, 0.0, -1e4), loss_type=loss_type
    )
    assert torch.isfinite(losses).all() and torch.isfinite(real).all() and torch.isfinite(generated).all()


def test_tspin_loss_finite_for_extreme_logps():
    losses, _, _ = tspin_loss(t(-1e4, 0.0), t(0.0, -1e4), t(-1e4, 0.0))
    assert torch.isfinite(losses).all()


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="loss_type"):
        spin_loss(t(0.0), t(0.0), t(0.0), t(0.0), loss_type="sigmoid")


def test_sft_loss_is_mean_token_nll():
    # responses of 3, 1 and 4 tokens with summed log-probs −6, −2 and −4: every token weighs alike,
    # (6 + 2 + 4) / (3 + 1 + 4) = 1.5, not the mean of the per-response means (2 + 2 + 1) / 3 = 1.67
    assert sft_loss(t(-6.0, -2.0, -4.0), torch.tensor([3, 1, 4])).item() == pytest.approx(1.5)


def test_sft_loss_equals_cross_entropy_over_the_batch():
    logits = torch.randn(2, 6, 7)
    labels = torch.tensor(
        [[IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6, 0]]
    )
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    expected = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX)
    assert sft_loss(sequence_logps(logits, labels), tokens).item() == pytest.approx(expected.item(), rel=1e-5)
