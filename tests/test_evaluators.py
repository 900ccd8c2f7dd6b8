"""The evaluator registry (reward/evaluators.py): loud failures, lazy factories, entry-point plug-ins."""

from __future__ import annotations

import numpy as np
import pytest

from reward import evaluators as E
from reward.evaluators import EVALUATORS, create_evaluator, register_evaluator


def _brightness_factory(argument: str, device: str):
    """A plug-in evaluator as the toy world would register one: mean pixel value, torch-free."""
    return lambda images, prompts: images.reshape(len(images), -1).mean(axis=1) / 255.0


@pytest.fixture
def registry(monkeypatch):
    """The registry as it was before the test: kinds a test registers are dropped afterwards."""
    monkeypatch.setattr(E, "EVALUATORS", dict(EVALUATORS))
    return E.EVALUATORS


def test_evaluator_registry_fails_loudly_and_is_lazy(registry):
    with pytest.raises(ValueError, match="registered kinds: .*clip.*critic"):
        create_evaluator("oracle-typo:x")
    register_evaluator("later", "social_refl_no_such_module:make")  # registering imports nothing
    try:
        with pytest.raises(ImportError, match="social_refl_no_such_module"):
            create_evaluator("later:")
    finally:
        registry.pop("later")
    with pytest.raises(ValueError, match="already registered"):
        register_evaluator("critic", _brightness_factory)
    register_evaluator("brightness", _brightness_factory, overwrite=True)
    ev = create_evaluator("brightness:x")
    assert ev.name == "brightness:x"
    np.testing.assert_allclose(ev(np.full((2, 4, 4, 3), 255, np.uint8), ["a", "b"]), [1.0, 1.0])


def test_the_registry_names_no_package_above_reward():
    from reward.evaluators import _entry_point_factories

    # Kinds that came in through entry points (added on first use by other tests) are the plug-ins' own.
    declared = _entry_point_factories()
    builtin = {k: f for k, f in EVALUATORS.items() if declared.get(k) != f}
    assert builtin and not any(isinstance(f, str) and f.startswith(("toyworld", "evaluation", "refl"))
                               for f in builtin.values())


def test_a_kind_declared_as_an_entry_point_is_registered_on_first_use(registry, monkeypatch):
    looked_up = []

    def declared():
        looked_up.append(True)
        return {"dim": f"{__name__}:_brightness_factory"}

    monkeypatch.setattr(E, "_entry_point_factories", declared)
    assert "dim" not in registry
    ev = create_evaluator("dim:")
    assert ev.name == "dim:" and registry["dim"] == f"{__name__}:_brightness_factory"
    np.testing.assert_allclose(ev(np.zeros((3, 2, 2, 3), np.uint8), ["a"] * 3), [0.0, 0.0, 0.0])
    create_evaluator("dim:again")
    assert len(looked_up) == 1  # registered now; registered kinds never consult the entry points
    # A run-time registration of the same kind wins over the declaration.
    register_evaluator("dim", lambda argument, device: lambda images, prompts: np.ones(len(images)),
                       overwrite=True)
    np.testing.assert_allclose(create_evaluator("dim:")(np.zeros((2, 2, 2, 3), np.uint8), ["a", "b"]), [1, 1])


def test_unknown_kind_lists_registered_and_entry_point_kinds(registry, monkeypatch):
    monkeypatch.setattr(E, "_entry_point_factories", lambda: {"plugged": "somewhere:factory"})
    with pytest.raises(ValueError, match=r"registered kinds: \[.*'critic'.*\]; entry-point kinds "
                                         r".*\['plugged'\]"):
        create_evaluator("nope:x")
    assert "nope" not in registry and "plugged" not in registry


def test_entry_point_lookup_reads_the_installed_metadata(monkeypatch):
    from importlib.metadata import EntryPoint

    seen = {}

    def entry_points(group):
        seen["group"] = group
        return [EntryPoint("oracle", "toyworld.evaluators:oracle", group)]

    monkeypatch.setattr(E.importlib.metadata, "entry_points", entry_points)
    assert E._entry_point_factories() == {"oracle": "toyworld.evaluators:oracle"}
    assert seen["group"] == "social_refl.evaluators"


def test_toy_world_evaluators_come_from_the_installed_entry_points(registry):
    """Needs the package installed from this tree's pyproject.toml (`pip install -e .`): the toy world
    declares `oracle` and `fidelity` there, and nothing else registers them."""
    declared = E._entry_point_factories()
    assert {"oracle", "fidelity"} <= set(declared), (
        f"entry points of group {E.ENTRY_POINT_GROUP!r} are {declared}; reinstall the package (pip install "
        "-e .)")
    from toyworld.render import render
    from toyworld.world import Scene, scene_to_prompt

    scene = Scene("circle", "red", "blue")
    # (2, 32, 32, 3)
    images = np.stack([np.asarray(render(scene, np.random.default_rng(i))) for i in range(2)])
    prompts = [scene_to_prompt(scene)] * 2
    oracle, fidelity = create_evaluator("oracle:"), create_evaluator("fidelity:")
    assert oracle.name == "oracle:" and oracle.fingerprint.startswith("oracle:|")
    scores = oracle(images, prompts)
    assert scores.shape == (2,) and ((0 <= scores) & (scores <= 1)).all()
    assert set(fidelity(images, prompts)) <= {0.0, 1.0}
