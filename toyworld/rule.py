"""The toy world's rule for choosing ReFL's settings and update budget (refl.sweep.SweepRule), written down
before the third edition's sweep ran (and DPO's and KTO's, `preference_rule_for`, before theirs): the
highest reward on the validation prompts among updates that keep the zero-shot CLIP within 1 point and
prompt fidelity within 5 points of the base (update 0). One CLIP point is about the spread of the toy CLIP's
score between the base's samples of one prompt; 5 points of fidelity is the comparison's goal."""

from __future__ import annotations

from refl.sweep import HELDOUT, SweepRule

# Held judge spec ("{clip_model}" is the demo's zero-shot CLIP) -> the largest drop from update 0 allowed.
HOLD = {"clip:{clip_model}": 1.0, "fidelity:": 0.05}


def rule_for(clip_model: str) -> SweepRule:
    """The rule with the demo's zero-shot CLIP filled in."""
    return SweepRule(hold={HELDOUT + k.replace("{clip_model}", clip_model): v for k, v in HOLD.items()})


def preference_rule_for(critic: str, clip_model: str) -> SweepRule:
    """The same rule for DPO and KTO (toyworld/arms.py), written before their sweep ran: preference tuning
    has no training reward, so the rule maximises the demo's critic (the reward ReFL climbs, trained on the
    same feedback) as a held-out judge on the same validation images, with the same holds (the zero-shot
    CLIP within 1 point, prompt fidelity within 5 points of update 0). The critic only chooses among
    settings and updates here; it never enters the gradient."""
    return SweepRule(maximise=HELDOUT + f"critic:{critic}", hold=rule_for(clip_model).hold)
