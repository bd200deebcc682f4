"""core.losses.dpo_loss: every kind against its formula evaluated by hand on python floats, the
ln 2 identity, gradient signs, the robust loss's unbiasedness, and the argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from core.losses import DPO_KINDS, dpo_loss

# (policy chosen, policy rejected, ref chosen, ref rejected) log-probs of four examples: margins
# z = (pc - pr) - (rc - rr) of 3.0, -4.5, 0.0 and 17.0 (past the hinge's margin at beta 0.1).
ROWS = [
    (-12.0, -15.0, -11.0, -11.0),
    (-30.5, -20.0, -25.0, -19.0),
    (-7.25, -9.5, -8.0, -10.25),
    (-3.0, -40.0, -10.0, -30.0),
]


def log_sigmoid(x: float) -> float:
    """log(1 / (1 + e^-x)) without overflow."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def expected(kind: str, row, beta: float, eps: float) -> float:
    """The per-example loss, written from the papers' formulas (TRL's definitions)."""
    pc, pr, rc, rr = row
    z = (pc - pr) - (rc - rr)
    if kind == "sigmoid":  # DPO; with eps, conservative DPO: BCE against the soft label 1 - eps
        return -(1 - eps) * log_sigmoid(beta * z) - eps * log_sigmoid(-beta * z)
    if kind == "robust":  # Chowdhury et al. 2024, eq. (9)
        return ((1 - eps) * -log_sigmoid(beta * z) - eps * -log_sigmoid(-beta * z)) / (1 - 2 * eps)
    if kind == "hinge":  # SLiC
        return max(0.0, 1 - beta * z)
    return (z - 1 / (2 * beta)) ** 2  # IPO, eq. (17)


def tensors(rows=ROWS, dtype=torch.float64, requires_grad=False):
    columns = list(zip(*rows))
    return [torch.tensor(c, dtype=dtype, requires_grad=requires_grad) for c in columns]


@pytest.mark.parametrize(
    "kind, beta, eps",
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.2),
        ("robust", 0.1, 0.0),
        ("robust", 0.3, 0.1),
        ("robust", 0.1, 0.45),
        ("hinge", 0.1, 0.0),
        ("hinge", 0.5, 0.0),
        ("ipo", 0.1, 0.0),
        ("ipo", 1.0, 0.0),
    ],
)
def test_each_kind_matches_its_formula(kind, beta, eps):
    out = dpo_loss(*tensors(), beta=beta, kind=kind, label_smoothing=eps)
    want = [expected(kind, row, beta, eps) for row in ROWS]
    assert out.losses.shape == (len(ROWS),)
    torch.testing.assert_close(out.losses, torch.tensor(want, dtype=torch.float64))
    # the rewards: beta * (policy - reference), detached
    chosen = [beta * (pc - rc) for pc, _, rc, _ in ROWS]
    rejected = [beta * (pr - rr) for _, pr, _, rr in ROWS]
    torch.testing.assert_close(out.chosen_rewards, torch.tensor(chosen, dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor(rejected, dtype=torch.float64))


def test_hand_computed_values():
    """Two values written out, so the formula helper above is checked too."""
    # z = 3, beta = 0.1: -log sigmoid(0.3) = log(1 + e^-0.3) = log(1.7408182206817179)
    out = dpo_loss(*tensors(ROWS[:1]), beta=0.1, kind="sigmoid")
    assert out.losses.item() == pytest.approx(0.55435524446852, abs=1e-13)
    # IPO, z = 3, beta = 0.1: (3 - 5)^2 = 4
    assert dpo_loss(*tensors(ROWS[:1]), beta=0.1, kind="ipo").losses.item() == 4.0


@pytest.mark.parametrize("beta", [0.01, 0.1, 2.0])
def test_sigmoid_is_ln2_when_policy_equals_reference(beta):
    pc, pr, _, _ = tensors()
    out = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, kind="sigmoid")
    torch.testing.assert_close(out.losses, torch.full_like(pc, math.log(2)))
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


@pytest.mark.parametrize("kind", DPO_KINDS)
def test_raising_chosen_or_lowering_rejected_lowers_the_loss(kind):
    # margins of 3, -4.5 and 0: inside the hinge's margin (beta z < 1) and below IPO's target
    # (z < 1 / (2 beta) = 5), where both still push the margin up
    rows = ROWS[:3]
    pc, pr, rc, rr = tensors(rows, requires_grad=True)
    eps = 0.1 if kind in ("sigmoid", "robust") else 0.0
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, kind=kind, label_smoothing=eps)
    out.losses.sum().backward()
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)
    assert rc.grad is None and rr.grad is None  # the reference is a constant
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    with torch.no_grad():
        higher = dpo_loss(pc + 0.5, pr, rc, rr, beta=0.1, kind=kind, label_smoothing=eps)
        lower = dpo_loss(pc, pr - 0.5, rc, rr, beta=0.1, kind=kind, label_smoothing=eps)
    assert torch.all(higher.losses < out.losses) and torch.all(lower.losses < out.losses)


def test_hinge_is_flat_past_its_margin():
    pc, pr, rc, rr = tensors(ROWS[3:], requires_grad=True)  # beta z = 1.7 > 1
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, kind="hinge")
    out.losses.sum().backward()
    assert out.losses.item() == 0.0 and pc.grad.item() == 0.0


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.4])
def test_robust_loss_is_unbiased_under_label_flips(eps):
    """Labels flipped with probability eps: the expected robust loss over the flip is the
    clean sigmoid loss (Chowdhury et al.'s defining property)."""
    pc, pr, rc, rr = tensors()
    kept = dpo_loss(pc, pr, rc, rr, beta=0.2, kind="robust", label_smoothing=eps).losses
    flipped = dpo_loss(pr, pc, rr, rc, beta=0.2, kind="robust", label_smoothing=eps).losses
    clean = dpo_loss(pc, pr, rc, rr, beta=0.2, kind="sigmoid").losses
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean)


def test_conservative_dpo_stops_at_the_soft_label():
    """cDPO's gradient vanishes where sigmoid(beta z) = 1 - eps: it does not push the margin
    to infinity."""
    beta, eps = 0.5, 0.1
    z = math.log((1 - eps) / eps) / beta
    pc = torch.tensor([z], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    dpo_loss(pc, zero, zero, zero, beta=beta, kind="sigmoid", label_smoothing=eps).losses.backward()
    assert abs(pc.grad.item()) < 1e-12


def test_low_precision_inputs_give_fp32_losses():
    pc, pr, rc, rr = tensors(dtype=torch.bfloat16)
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, kind="sigmoid")
    assert out.losses.dtype == out.chosen_rewards.dtype == torch.float32


def test_argument_errors():
    args = tensors()
    valid = "sigmoid, robust, hinge, ipo"
    with pytest.raises(ValueError, match=f"unknown DPO loss kind 'kto'; the kinds are {valid}"):
        dpo_loss(*args, beta=0.1, kind="kto")
    for eps in (-0.01, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
            dpo_loss(*args, beta=0.1, kind="robust", label_smoothing=eps)
    for kind in ("hinge", "ipo"):
        with pytest.raises(ValueError, match=f"sigmoid and robust only, not '{kind}'"):
            dpo_loss(*args, beta=0.1, kind=kind, label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(*args, beta=0.0, kind="ipo")
    with pytest.raises(ValueError, match="must all be \\[B\\]"):
        dpo_loss(args[0], args[1][:2], args[2], args[3], beta=0.1, kind="sigmoid")
