import math

import pytest
import torch
import torch.nn.functional as F

from reward.losses import LOSSES, PairwiseLoss, PickScoreLoss, TripletLoss, create_loss


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# text = e1; pos at 60 degrees (cos 0.5), neg at 90 degrees (cos 0).
TEXT = _unit([1.0, 0.0])
POS = _unit([0.5, math.sqrt(3) / 2])
NEG = _unit([0.0, 1.0])


def test_triplet_hand_computed():
    # |t-p|^2 = 2 - 2*0.5 = 1, |t-n|^2 = 2 -> relu(1 - 2 + 0.3) = 0; swapped -> relu(2 - 1 + 0.3) = 1.3
    loss = TripletLoss(margin=0.3)
    assert loss(TEXT, POS, NEG)["loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss(TEXT, NEG, POS)["loss"].item() == pytest.approx(1.3, abs=1e-6)
    # On unit vectors it equals 2 * relu(cos_neg - cos_pos + margin / 2).
    assert loss(TEXT, NEG, POS)["loss"].item() == pytest.approx(2 * max(0.5 - 0.0 + 0.15, 0), abs=1e-6)
    both = loss(torch.cat([TEXT, TEXT]), torch.cat([POS, NEG]), torch.cat([NEG, POS]),
                weight=torch.tensor([1.0, 3.0]))
    assert both["loss"].item() == pytest.approx((0 + 3 * 1.3) / 4, abs=1e-6)


def test_pairwise_hand_computed():
    loss = PairwiseLoss(init_logit_scale=10.0)
    # -log sigmoid(10 * (0.5 - 0)) = log(1 + e^-5)
    assert loss(TEXT, POS, NEG)["loss"].item() == pytest.approx(math.log1p(math.exp(-5)), rel=1e-5)
    # A tie label: 0.5 * (log(1+e^-5) + log(1+e^5))
    tie = loss(TEXT, POS, NEG, label=torch.tensor([0.5]))["loss"].item()
    assert tie == pytest.approx(0.5 * (math.log1p(math.exp(-5)) + math.log1p(math.exp(5))), rel=1e-5)
    out = loss(TEXT, POS, NEG)
    out["loss"].backward()
    assert loss.log_scale.grad is not None  # the scale is learned


def test_pickscore_hand_computed_with_soft_labels():
    loss = PickScoreLoss(logit_scale=100.0)
    # softmax over [50, 0]: -log p0 = log(1 + e^-50)
    assert loss(TEXT, POS, NEG)["loss"].item() == pytest.approx(math.log1p(math.exp(-50)), abs=1e-6)
    tie = loss(TEXT, POS, NEG, label=torch.tensor([0.5]))["loss"].item()
    assert tie == pytest.approx(0.5 * (math.log1p(math.exp(-50)) + math.log1p(math.exp(50))), rel=1e-5)


def test_registry_refuses_unknown_and_names_choices():
    assert set(LOSSES) == {"triplet", "pairwise", "pickscore"}
    with pytest.raises(ValueError, match="triplet, pairwise, pickscore"):
        create_loss("hinge")
    assert all("loss" in create_loss(n)(TEXT, POS, NEG) for n in LOSSES)
