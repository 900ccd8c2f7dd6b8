"""Choosing ReFL's settings and update budget from validation curves, by a rule a user can follow.

A sweep trains a few settings (learning rate, guidance in training, ...) with validation every few updates
(from update 0, the base). The rule then reads only what a user has on the validation prompts: the reward
itself (eval/reward) and held-out judges (eval/heldout/<spec>: a zero-shot model, prompt fidelity); never an
oracle. Every validated update of every run is a candidate; a candidate is admissible when each held judge
is within its allowed drop of that run's update-0 value; the admissible candidate with the highest reward
wins (ties: the earlier update, then the run listed first). Its run's settings and its update are the choice.

The same curves show where each guard would stop or select (`guard_picks`), so a study can say how far
each lands from the best update by a judge the user does not have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

HELDOUT = "eval/heldout/"


@dataclass
class SweepRule:
    """What the choice climbs and what it must not give up; keys are validation metric names."""

    # The metric to maximise over (run, update): the training reward on the validation images, or a held-out
    # judge (eval/heldout/<spec>) for a trainer with no reward (preference tuning).
    maximise: str = "eval/reward"
    # Held judges: metric -> the largest drop from the run's update-0 value an admissible update may show, in
    # the judge's own units (e.g. 1.0 for a CLIP score in points, 0.05 for a fidelity share).
    hold: dict[str, float] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse a judge a real user does not have: the toy world's oracle (evaluation only)."""
        for key in [self.maximise, *self.hold]:
            if "oracle" in key.lower():
                raise ValueError(f"{key!r}: the sweep rule may use only judges a user has (the reward, a "
                                 "zero-shot model, prompt fidelity); the oracle is for evaluation only")
        for key, drop in self.hold.items():
            if drop < 0:
                raise ValueError(f"hold[{key!r}] must be >= 0, got {drop}")


class NoAdmissibleUpdate(ValueError):
    """No validation of any run holds the judges: with a reference, even the runs' common start breaks it."""


def validations(records: Sequence[Mapping], key: str = "eval/reward") -> list[dict]:
    """The validation rows of a run's metrics.jsonl records (those holding `key`: the reward, or the
    maximised judge of a run that has no reward), by update (a resumed run's repeat wins)."""
    by_update = {int(r["update"]): dict(r) for r in records if key in r}
    return [by_update[u] for u in sorted(by_update)]


def admissible(rows: Sequence[Mapping], rule: SweepRule, reference: Mapping | None = None) -> list[dict]:
    """The rows (validations of one run) whose held judges are within their drop of the update-0 row, or of
    `reference` (a validation row of the same prompts and seeds: the base's, for a run that started from an
    earlier LoRA, so drops add up across runs instead of starting anew)."""
    rule.check()
    if not rows or int(rows[0]["update"]) != 0:
        raise ValueError("the sweep rule compares with update 0 (the base): validate at the start "
                         "(train.validate_at_start=true)")
    base = rows[0] if reference is None else reference
    for key in rule.hold:
        if key not in base:
            raise KeyError(f"held judge {key!r} is not among the validation metrics {sorted(base)}")
    return [dict(r) for r in rows if all(r[k] >= base[k] - d for k, d in rule.hold.items())]


def choose(runs: Mapping[str, Sequence[Mapping]], rule: SweepRule, reference: Mapping | None = None) -> dict:
    """Apply the rule to every run's validation rows (name -> metrics.jsonl records), each held judge against
    its run's update 0 or `reference` (see `admissible`). Returns each run's best admissible update
    ("per_run": name -> row or None) and the choice ("run", "update", "row")."""
    rule.check()
    per_run, best = {}, None
    for name, records in runs.items():
        rows = admissible(validations(records, rule.maximise), rule, reference)
        top = max(rows, key=lambda r: (r[rule.maximise], -int(r["update"])), default=None)
        per_run[name] = top
        if top is not None and (best is None or (top[rule.maximise], -int(top["update"]))
                                > (best[1][rule.maximise], -int(best[1]["update"]))):
            best = (name, top)
    if best is None:
        why = "check the held judges' names" if reference is None else "every run starts beyond the reference"
        raise NoAdmissibleUpdate(f"no run has an admissible validation (not even update 0): {why}")
    return {"per_run": per_run, "run": best[0], "update": int(best[1]["update"]), "row": best[1]}


def guard_picks(rows: Sequence[Mapping], judges: Mapping[str, str], rule: SweepRule | None = None,
                drops: int = 2) -> dict[str, int]:
    """Where each guard lands on one run's validation rows: for every judge (label -> metric) the update it
    selects (its maximum, as train.select_by) and the update at which train.stop_after_drops=`drops` would
    stop (the judge fell `drops` validations in a row while the reward rose; the last update if never), and
    with `rule` the update the sweep rule keeps. Label -> update."""
    from refl import guard
    from refl.train import TrainState

    picks: dict[str, int] = {}
    for label, key in judges.items():
        picks[f"select by {label}"] = int(max(rows, key=lambda r: (r[key], -int(r["update"])))["update"])
        state = TrainState()
        stop = int(rows[-1]["update"])
        for r in rows:
            state.update = int(r["update"])
            guard.track(state, r[key], r["eval/reward"])
            if state.drops >= drops:
                stop = state.update
                break
        picks[f"stop after {drops} drops of {label}"] = stop
    if rule is not None:
        picks["sweep rule"] = choose({"run": rows}, rule)["update"]
    return picks

