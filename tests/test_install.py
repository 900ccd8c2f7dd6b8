"""What a user installs: the wheel (`pip install .`, not editable) gives the commands and the toy world's
shipped models outside the source tree, and the lock pins every dependency inside pyproject.toml's ranges."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

from runkit.lockfile import canonical, drift, read_pins

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMMANDS = sorted(PYPROJECT["project"]["scripts"])


def _run(args, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A clean venv holding only the project's wheel; its dependencies come from this environment's
    site-packages as plain path entries (so this environment's editable install of the project is not
    seen)."""
    root = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  root / "dist", REPO], cwd=root)
    assert built.returncode == 0, built.stderr
    wheel = next((root / "dist").glob("social_refl-*.whl"))
    venv = root / "venv"
    made = _run([sys._base_executable, "-m", "venv", venv], cwd=root)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
    (Path(purelib.stdout.strip()) / "host_site_packages.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    installed = _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=root)
    assert installed.returncode == 0, installed.stderr
    return venv


def test_the_wheel_installs_every_command(wheel_venv):
    missing = [c for c in COMMANDS if not (wheel_venv / "bin" / c).is_file()]
    assert not missing
    helped = _run([wheel_venv / "bin" / "social-refl-train-reward", "--help"], cwd=wheel_venv)
    assert helped.returncode == 0 and "--set" in helped.stdout


def test_the_wheel_runs_the_demo_and_loads_the_shipped_critic_outside_the_source_tree(wheel_venv, tmp_path):
    probe = ("import json, toyworld, reward; from pathlib import Path; "
             "critic = reward.load(Path(toyworld.__file__).parent / 'assets' / 'toy-clip'); "
             "print(json.dumps({'toyworld': toyworld.__file__, 'reward': reward.__file__, "
             "'score': float(critic.score('a red circle', __import__('PIL.Image').Image.new('RGB', (32, "
             "32))))}))")
    loaded = _run([wheel_venv / "bin" / "python", "-c", probe], cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    import json

    where = json.loads(loaded.stdout.strip().splitlines()[-1])
    for module in ("toyworld", "reward"):
        assert Path(where[module]).is_relative_to(wheel_venv), where  # the installed copy, not the checkout
    assert isinstance(where["score"], float)
    out = tmp_path / "demo"
    demo = _run([wheel_venv / "bin" / "social-refl-demo", "--quick", "--until", "community", "--out", out],
                cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert (out / "community" / "train" / "pairs.parquet").is_file() and "realistic:" in demo.stdout


def test_the_lock_pins_every_dependency_within_pyproject_ranges():
    from packaging.requirements import Requirement

    lock = read_pins((REPO / "requirements-lock.txt").read_text())
    wanted = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]
    outside = []
    for spec in map(Requirement, wanted):
        version = lock.get(canonical(spec.name))
        if version is None or not spec.specifier.contains(version, prereleases=True):
            outside.append(f"{spec}: locked {version}")
    assert not outside, outside
    assert drift(lock, dict(lock)) == [] and drift({"a": "1"}, {"a": "2"}) == ["a: 1 in the lock, 2 here"]
    with pytest.raises(ValueError, match="exact pin"):
        read_pins("torch>=2\n")
