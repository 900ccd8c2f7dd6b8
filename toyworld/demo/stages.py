"""The demo's four stages (community, critic, ReFL, comparison) and how a finished stage is reused.

Each stage writes into its own folder and is skipped when its output exists and was made from the same
settings and the same input files (content hashes, in the folder's stage.json), so an interrupted demo
picks up where it stopped and a changed knob or a retrained critic is never answered with stale results.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from runkit.config import to_dict
from runkit.files import atomic_write_bytes, atomic_write_text, content_hash, paths_relative_to, write_json
from toyworld.demo.config import DemoConfig, compare_config, critic_config, refl_config
from toyworld.demo.layout import critic_dirs, refl_result

logger = logging.getLogger(__name__)

STAGES = ("community", "critic", "refl", "compare")


def trainer_settings(cfg) -> dict:
    """A trainer stage's key settings: its resolved config without where it writes and how it resumes."""
    return to_dict(replace(cfg, train=replace(cfg.train, output_dir="", resume="")))


def enter_stage(out: Path, finished: Path, settings: dict, inputs: dict[str, str]) -> dict | None:
    """A stage's finished output if it was made from the same settings and input files; else None, after
    clearing the stage's folder (a retrained critic or a changed knob never resumes stale work).

    The key (the stage's resolved settings, and the content hash of each input file or folder) is
    written into out/stage.json before the stage runs, so an interrupted stage resumes only into the
    same key."""
    # Paths inside the run folder count by their place in it, so a copied run folder reuses its finished stages.
    key = json.dumps({"settings": paths_relative_to(settings, out.parent),
                      "inputs": {name: content_hash(path) for name, path in inputs.items()}},
                     sort_keys=True, default=str)
    stage_file = out / "stage.json"
    stored = json.loads(stage_file.read_text()).get("key") if stage_file.is_file() else None
    if stored == key:
        if finished.is_file():
            return json.loads(finished.read_text())
    elif out.exists():
        logger.info("%s: settings or input files changed since it ran; running the stage again", out)
        shutil.rmtree(out)
    write_json(stage_file, {"key": key})
    return None


def finish_stage(summary_file: Path, summary: dict) -> dict:
    """Write a stage's finished output with its paths relative to the run folder; returns `summary`."""
    write_json(summary_file, paths_relative_to(summary, summary_file.parent.parent))
    return summary


def _sample(components, prompts: list[str], n: int, steps: int, guidance: float, seed: int,
            cache: Path, model: str) -> np.ndarray:
    """`n` base-model images per prompt, (P, n, H, W, 3) uint8, kept in `cache` under a key of the model's
    content and the settings, so a change in how the community behaves does not draw them again."""
    import hashlib

    from toyworld.pretrain_sd import sample_images

    key = json.dumps({"model": content_hash(model), "prompts": prompts, "n": n, "steps": steps,
                      "guidance": guidance, "seed": seed}, sort_keys=True)
    path = cache / f"samples-{hashlib.blake2b(key.encode(), digest_size=10).hexdigest()}.npz"
    if path.is_file():
        return np.load(path)["images"]
    expanded = [p for p in prompts for _ in range(n)]
    images = sample_images(components, expanded, steps, guidance, seed)  # (P * n, H, W, 3)
    images = images.reshape(len(prompts), n, *images.shape[1:])  # (P, n, H, W, 3)
    atomic_write_bytes(path, lambda f: np.savez(f, images=images))
    return images


def stage_community(cfg: DemoConfig, components, out: Path) -> dict:
    """Generations for training prompts -> community pairs; held-out generations -> oracle pairs."""
    from toyworld.community import build_pairs_with_stats, write_oracle_pairs
    from toyworld.world import split_prompts

    summary_file = out / "community.json"
    c = cfg.community
    settings = {"seed": cfg.seed, "sample_steps": cfg.sample_steps, "guidance_scale": cfg.guidance_scale,
                **to_dict(c)}
    done = enter_stage(out, summary_file, settings, {"sd_model": cfg.sd_model})
    if done is not None:
        return done
    train_prompts, held = split_prompts(seed=0)
    rng = np.random.default_rng(cfg.seed)
    chosen = [train_prompts[i] for i in rng.choice(len(train_prompts), c.prompts, replace=False)]
    t0 = time.perf_counter()
    cache = Path(cfg.output_dir) / "cache"
    images = _sample(components, chosen, c.images_per_prompt, cfg.sample_steps, cfg.guidance_scale, cfg.seed,
                     cache, cfg.sd_model)
    gen_seconds = time.perf_counter() - t0
    result = build_pairs_with_stats({p: list(images[i]) for i, p in enumerate(chosen)}, c.users, cfg.seed,
                                    out / "train", config=c.behaviour)
    # Held-out prompts: every pair of a prompt's generations, ordered by the hidden oracle.
    held_chosen = held[: c.oracle_pair_prompts]
    held_images = _sample(components, held_chosen, c.images_per_prompt, cfg.sample_steps, cfg.guidance_scale,
                          cfg.seed + 1, cache, cfg.sd_model)
    oracle_pairs = write_oracle_pairs(held_images, held_chosen, out / "oracle_pairs")
    summary = {"community": result.summary(), "oracle_pairs": str(oracle_pairs),
               "generation_seconds": gen_seconds}
    return finish_stage(summary_file, summary)


def train_critic_member(cfg: DemoConfig, pairs: str, out: Path, k: int) -> str:
    """Member k of the critic ensemble in `out`: the demo's critic config with seed + k, so the same pairs
    and starting CLIP with another data order and head init. Returns the critic directory."""
    from reward.train import train

    exp = critic_config(cfg, pairs, out)
    train(replace(exp, train=replace(exp.train, seed=exp.train.seed + k)))
    return str(out / "critic")


def stage_critic(cfg: DemoConfig, pairs: str, oracle_pairs: str, out: Path) -> dict:
    import reward
    from reward.data import load_pairs
    from reward.evaluate import evaluate_pairs

    summary_file = out / "critic_summary.json"
    exp = critic_config(cfg, pairs, out)
    settings = {**trainer_settings(exp), "members": cfg.critic_members}
    done = enter_stage(out, summary_file, settings,
                       {"pairs": str(Path(pairs).parent), "oracle_pairs": str(Path(oracle_pairs).parent),
                        "clip_model": cfg.clip_model})
    if done is not None:
        return dict(done, critic=str(out / "critic"), members=critic_dirs(out, cfg.critic_members))
    train_critic_member(cfg, pairs, out, 0)
    truth = load_pairs(oracle_pairs)
    tuned = evaluate_pairs(reward.load(out / "critic"), truth)
    zero_shot = evaluate_pairs(reward.load(cfg.clip_model), truth)
    for k in range(1, cfg.critic_members):
        train_critic_member(cfg, pairs, out / f"member-{k}", k)
    members = critic_dirs(out, cfg.critic_members)
    summary = {"critic": members[0], "accuracy_vs_oracle": tuned, "zero_shot_clip_vs_oracle": zero_shot,
               "chance": 0.5, "members": members,
               "members_accuracy_vs_oracle": [evaluate_pairs(reward.load(m), truth)["pairwise_accuracy"]
                                              for m in members[1:]]}
    return finish_stage(summary_file, summary)


def stage_refl(cfg: DemoConfig, critic: str | list[str], train_prompts: list[str], out: Path) -> dict:
    from refl.train import train

    result_file = out / "result.json"
    rcfg = refl_config(cfg, critic, out / "prompts.txt", out, out / "reg_renders" / "captions.parquet"
                       if cfg.reg_renders else None)
    settings = trainer_settings(rcfg)
    critics = [critic] if isinstance(critic, str) else critic
    done = enter_stage(out, result_file, settings,
                       {"sd_model": cfg.sd_model, **{f"critic_{k}": c for k, c in enumerate(critics)}})
    if done is not None:
        return refl_result(out, done)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "prompts.txt", "\n".join(train_prompts) + "\n")
    if cfg.reg_renders:
        from toyworld.datasets import write_caption_set

        write_caption_set(out / "reg_renders", cfg.reg_renders, seed=cfg.seed + 3)
    return refl_result(out, train(rcfg))


def stage_compare(cfg: DemoConfig, components, critic: str, lora: str, out: Path) -> tuple[dict, object]:
    """Best-of-N vs ReFL on held-out prompts, judged by the critic, the untuned CLIP, the oracle and fidelity."""
    from evaluation.harness import run_compare
    from toyworld.world import split_prompts

    held = split_prompts(seed=0)[1]
    prompts_file = out / "compare_prompts.txt"
    atomic_write_text(prompts_file, "\n".join(held[: cfg.compare_prompts]) + "\n")
    ccfg = compare_config(cfg, critic, lora, prompts_file, out)
    return run_compare(ccfg, components=components), ccfg
