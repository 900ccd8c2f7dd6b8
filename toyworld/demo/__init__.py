"""The default run, end to end, in the toy world (no downloads):

1. the shipped toy SD draws images for training prompts; the simulated community remixes some,
   which gives Social Reward pairs (`prompt, pos_path, neg_path`);
2. the shipped toy CLIP is fine-tuned on them into a critic (reward/), and judged against the
   hidden oracle on pairs from held-out prompts, next to its zero-shot starting point and chance;
3. ReFL trains a LoRA on the toy SD against the critic (refl/);
4. the comparison harness draws base, best-of-64 and ReFL samples for held-out prompts and scores
   every arm with the critic, the untuned CLIP, the oracle and prompt fidelity -> report.html.

Each stage writes into its own folder under `output_dir` and is skipped when its output exists and
was made from the same settings and the same input files (content hashes, in the folder's
stage.json), so an interrupted demo picks up where it stopped and a changed knob or a retrained
critic is never answered with stale results.

Modules: `config` (DemoConfig, QUICK, each stage's config as the demo fills it), `layout` (where each
stage's outputs lie), `stages` (the four stages and their reuse), `analysis` (the oracle's terms per
arm), `report` (the demo's sections of report.html), `summary` (the console summary), `run` (run_demo).
"""

from toyworld.demo.config import QUICK, DemoConfig
from toyworld.demo.run import run_demo
from toyworld.demo.stages import STAGES
from toyworld.demo.summary import format_summary

__all__ = ["QUICK", "STAGES", "DemoConfig", "format_summary", "run_demo"]
