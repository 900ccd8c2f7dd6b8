"""The demo end to end: every stage, then results.json, report.html and summary.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from runkit.config import save_config
from runkit.files import paths_relative_to, write_json
from toyworld.demo.analysis import compare_summary, oracle_breakdown, promise
from toyworld.demo.config import DemoConfig
from toyworld.demo.layout import community_pairs_file, feed_oracle_pairs_file, oracle_pairs_file
from toyworld.demo.report import (
    ORACLE,
    arms_section,
    breakdown_section,
    critic_section,
    demo_labels,
    learning_section,
    overoptimisation_section,
    promise_section,
    question,
    training_section,
)
from toyworld.demo.stages import STAGES, stage_community, stage_compare, stage_critic, stage_refl


def run_demo(cfg: DemoConfig, until: str = "compare") -> dict:
    """Every stage up to and including `until` (e.g. "community" to look at the feedback before any
    method is trained on it); the report needs all of them."""
    from refl.components import load_components

    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    from toyworld.world import split_prompts

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; name a folder for the demo's run")
    out.mkdir(parents=True, exist_ok=True)
    # config.yaml in this folder is the comparison harness's (it writes into the same folder).
    save_config(cfg, out / "demo_config.yaml")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    components = load_components(cfg.sd_model)
    timings = {}
    community = stage_community(cfg, components, out / "community")
    timings["community_s"] = time.perf_counter() - t0
    if until == "community":
        return {"community": community, "timings": timings}
    critic = stage_critic(cfg, str(community_pairs_file(out)), str(oracle_pairs_file(out)), out / "critic",
                          str(feed_oracle_pairs_file(out)) if cfg.critic_ceiling else None)
    timings["critic_s"] = time.perf_counter() - t0 - sum(timings.values())
    if until == "critic":
        return {"community": community, "critic": critic, "timings": timings}
    train_prompts, held = split_prompts(seed=0)
    members = critic.get("members", [critic["critic"]])
    refl = stage_refl(cfg, members if len(members) > 1 else critic["critic"], train_prompts, out / "refl")
    timings["refl_s"] = time.perf_counter() - t0 - sum(timings.values())
    if until == "refl":
        return {"community": community, "critic": critic, "refl": _jsonable(refl), "timings": timings}
    results, ccfg = stage_compare(cfg, components, critic["critic"], refl["lora"], out)
    timings["compare_s"] = time.perf_counter() - t0 - sum(timings.values())
    base_report = Path(cfg.sd_model) / "pretrain_report.json"
    summary = {"community": community, "critic": critic, "refl": _jsonable(refl), "timings": timings,
               "base_model": json.loads(base_report.read_text()) if base_report.is_file() else {}}
    summary["compare"] = compare_summary(results)
    summary["oracle_breakdown"] = oracle_breakdown(out, results)
    summary["overoptimisation"] = _overoptimisation(cfg, out)
    summary["promise"] = promise(results, critic)
    # One results.json holds every number the report shows: the harness's and the demo's own.
    from evaluation.report import write_report

    results["demo"] = _jsonable(summary)
    write_json(out / "results.json", paths_relative_to(results, out))  # a copied run folder names its own
    preamble = (critic_section(summary)
                + learning_section(summary["critic"])
                + breakdown_section(summary["oracle_breakdown"])
                + overoptimisation_section(summary["overoptimisation"])
                + training_section(out) + arms_section(out))
    summary["report"] = str(write_report(results, out, ccfg, preamble=preamble,
                                         question=question(results["n_samples"]), truth=ORACLE,
                                         labels=demo_labels(results["selector"]),
                                         lead=promise_section(summary["promise"])))
    write_json(out / "summary.json", paths_relative_to(_jsonable(summary), out))
    return summary


def _overoptimisation(cfg: DemoConfig, out: Path) -> dict | None:
    """The ReFL run's over-optimisation analysis, drawn into overoptimisation.png (None without the
    curves)."""
    from runkit.logs import read_metrics
    from toyworld.overoptimisation import analyse, plot

    records = read_metrics(out / "refl" / "metrics.jsonl")
    analysis = analyse(records, cfg.clip_model)
    if analysis is not None:
        plot(records, analysis, cfg.clip_model, out / "overoptimisation.png")
    return analysis


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
