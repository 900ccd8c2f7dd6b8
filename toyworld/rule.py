"""The toy world's rule for choosing ReFL's settings and update budget (refl.sweep.SweepRule), written down
before the third edition's sweep ran: the highest reward on the validation prompts among updates that keep
the zero-shot CLIP within 1 point and prompt fidelity within 5 points of the base (update 0). One CLIP point
is about the spread of the toy CLIP's score between the base's samples of one prompt; 5 points of fidelity is
the comparison's goal."""

from __future__ import annotations

from refl.sweep import HELDOUT, SweepRule

# Held judge spec ("{clip_model}" is the demo's zero-shot CLIP) -> the largest drop from update 0 allowed.
HOLD = {"clip:{clip_model}": 1.0, "fidelity:": 0.05}


def rule_for(clip_model: str) -> SweepRule:
    """The rule with the demo's zero-shot CLIP filled in."""
    return SweepRule(hold={HELDOUT + k.replace("{clip_model}", clip_model): v for k, v in HOLD.items()})
