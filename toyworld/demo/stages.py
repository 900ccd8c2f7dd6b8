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
import pandas as pd

from runkit.config import to_dict
from runkit.files import atomic_write_bytes, atomic_write_text, content_hash, paths_relative_to, write_json
from toyworld.demo.config import (
    DemoConfig,
    compare_config,
    critic_config,
    feed_guidance_scales,
    fitting_scheduler,
    refl_config,
)
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
    # Paths inside the run folder count by their place in it, so a copied run folder reuses its finished
    # stages.
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


def _sample(components, prompts: list[str], guidance: list[float], steps: int, seed: int, cache: Path,
            model: str, scheduler: str) -> np.ndarray:
    """Base-model images, (P, n, H, W, 3) uint8: image j of each prompt drawn at guidance[j], image (k, j)
    from seed + j * P + k, with `scheduler` (the model's family's: fitting_scheduler). Kept in `cache` under
    a key of the model's content and the settings, so a change in how the community behaves does not draw
    them again."""
    import hashlib

    from refl.sampling import make_pipeline, sample

    key = json.dumps({"model": content_hash(model), "prompts": prompts, "guidance": guidance, "steps": steps,
                      "seed": seed}, sort_keys=True)
    path = cache / f"samples-{hashlib.blake2b(key.encode(), digest_size=10).hexdigest()}.npz"
    if path.is_file():
        return np.load(path)["images"]
    n = len(prompts)
    pipe = make_pipeline(components, scheduler)
    # (P, H, W, 3) each, in batches of 64: another batch size moves the images' last bits, and the demo's
    # numbers with them
    slots = [sample(pipe, prompts, seeds=range(seed + j * n, seed + (j + 1) * n), num_inference_steps=steps,
                    guidance_scale=g, batch_size=64) for j, g in enumerate(guidance)]
    images = np.stack(slots, axis=1)  # (P, n, H, W, 3)
    atomic_write_bytes(path, lambda f: np.savez(f, images=images))
    return images


# Seed offsets of the two image sets the community stage draws, far apart so no image shares its noise.
FEED_SEED, HELDOUT_SEED = 0, 500_000


def feed_summary(images: np.ndarray, prompts: list[str], guidance: list[float]) -> dict:
    """Per distinct guidance scale of the feed: its images' mean oracle score and prompt fidelity."""
    from toyworld.checker import prompt_fidelity
    from toyworld.oracle import oracle_score

    out = {}
    for g in sorted(set(guidance)):
        cols = [j for j, v in enumerate(guidance) if v == g]
        imgs = images[:, cols].reshape(-1, *images.shape[2:])  # (P * len(cols), H, W, 3)
        ps = [p for p in prompts for _ in cols]
        out[f"{g:g}"] = {"images": len(ps), "oracle": float(oracle_score(imgs, ps).mean()),
                         "prompt_fidelity": float(prompt_fidelity(imgs, ps))}
    return out


def stage_community(cfg: DemoConfig, components, out: Path) -> dict:
    """The feed (training prompts at the feed's guidance scales) -> community pairs, and the same images
    ordered by the oracle (the critic's ceiling); held-out generations at the demo's settings -> oracle
    pairs."""
    from toyworld.community import build_pairs_with_stats, write_oracle_pairs
    from toyworld.world import heldout_prompts, split_prompts

    summary_file = out / "community.json"
    c = cfg.community
    held_chosen = heldout_prompts("oracle_pairs", c.n_oracle_pair_prompts)
    feed_guidance = feed_guidance_scales(cfg)
    # The scales as drawn: a default feed keys the stage as the same scales written out
    settings = {"seed": cfg.seed, "num_inference_steps": cfg.num_inference_steps,
                "guidance_scale": cfg.guidance_scale,
                **to_dict(c), "feed_guidance_scales": feed_guidance, "oracle_pair_prompt_list": held_chosen}
    done = enter_stage(out, summary_file, settings, {"sd_model": cfg.sd_model})
    if done is not None:
        return done
    train_prompts = split_prompts(seed=0)[0]
    rng = np.random.default_rng(cfg.seed)
    chosen = [train_prompts[i] for i in rng.choice(len(train_prompts), c.n_prompts, replace=False)]
    t0 = time.perf_counter()
    cache = Path(cfg.output_dir) / "cache"
    base_seed = 1_000_000 * cfg.seed
    images = _sample(components, chosen, feed_guidance, cfg.num_inference_steps,
                     base_seed + FEED_SEED, cache, cfg.sd_model, fitting_scheduler(cfg))  # (P, n, H, W, 3)
    gen_seconds = time.perf_counter() - t0
    result = build_pairs_with_stats({p: list(images[i]) for i, p in enumerate(chosen)}, c.n_users, cfg.seed,
                                    out / "train", config=c.behaviour)
    feed_oracle_pairs = write_oracle_pairs(images, chosen,
                                           out / "feed_oracle_pairs") if cfg.critic_ceiling else None
    # Held-out prompts: every pair of a prompt's generations, ordered by the hidden oracle.
    held_images = _sample(components, held_chosen, [cfg.guidance_scale] * c.oracle_images_per_prompt,
                          cfg.num_inference_steps, base_seed + HELDOUT_SEED, cache, cfg.sd_model,
                          fitting_scheduler(cfg))
    oracle_pairs = write_oracle_pairs(held_images, held_chosen, out / "oracle_pairs")
    summary = {"community": result.summary(), "oracle_pairs": str(oracle_pairs),
               "feed_oracle_pairs": str(feed_oracle_pairs) if feed_oracle_pairs else None,
               "feed": feed_summary(images, chosen, feed_guidance),
               "generation_seconds": gen_seconds}
    return finish_stage(summary_file, summary)


def train_critic_member(cfg: DemoConfig, pairs: str, out: Path, k: int) -> str:
    """Member k of the critic ensemble in `out`: the demo's critic config with seed + k, so the same pairs
    and starting CLIP with another data order and head init. Returns the critic directory."""
    from reward.train import train

    exp = critic_config(cfg, pairs, out)
    train(replace(exp, train=replace(exp.train, seed=exp.train.seed + k)))
    return str(out / "critic")


def _train_and_measure(cfg: DemoConfig, pairs: str | Path, out: Path, truth, gaps) -> dict:
    """One more critic with the demo's recipe on other pairs, measured on the held-out oracle pairs."""
    import reward
    from reward.train import train
    from toyworld.critic_vs_oracle import accuracy_vs_oracle

    train(critic_config(cfg, pairs, out))
    return accuracy_vs_oracle(reward.load(out / "critic"), truth, gaps)


def stage_critic(cfg: DemoConfig, pairs: str, oracle_pairs: str, out: Path,
                 feed_oracle_pairs: str | None = None) -> dict:
    """The critic (and its ensemble members) on the community's pairs, measured against the oracle on held-out
    pairs with the zero-shot CLIP beside it; then its learning curve (cfg.critic_curve) and its ceiling
    (cfg.critic_ceiling: the same recipe on `feed_oracle_pairs`)."""
    import reward
    from reward.data import load_pairs
    from toyworld.community import critic_realism
    from toyworld.critic_vs_oracle import accuracy_vs_oracle, pair_gaps, subset_pairs

    summary_file = out / "critic_summary.json"
    exp = critic_config(cfg, pairs, out)
    settings = {**trainer_settings(exp), "members": cfg.n_critic_members, "curve": cfg.critic_curve,
                "ceiling": cfg.critic_ceiling}
    inputs = {"pairs": str(Path(pairs).parent), "oracle_pairs": str(Path(oracle_pairs).parent),
              "clip_model": cfg.clip_model}
    if cfg.critic_ceiling:
        if feed_oracle_pairs is None:
            raise ValueError("critic_ceiling needs the community stage's oracle-ordered feed pairs")
        inputs["feed_oracle_pairs"] = str(Path(feed_oracle_pairs).parent)
    done = enter_stage(out, summary_file, settings, inputs)
    if done is not None:
        return dict(done, critic=str(out / "critic"), members=critic_dirs(out, cfg.n_critic_members))
    train_critic_member(cfg, pairs, out, 0)
    truth = load_pairs(oracle_pairs)
    gaps = pair_gaps(truth)  # (N,)
    tuned = accuracy_vs_oracle(reward.load(out / "critic"), truth, gaps)
    zero_shot = accuracy_vs_oracle(reward.load(cfg.clip_model), truth, gaps)
    for k in range(1, cfg.n_critic_members):
        train_critic_member(cfg, pairs, out / f"member-{k}", k)
    members = critic_dirs(out, cfg.n_critic_members)
    n_pairs = len(pd.read_parquet(pairs))
    curve = []
    for fraction in sorted(cfg.critic_curve):
        part = subset_pairs(Path(pairs), fraction, cfg.critic.train.seed,
                            out / "curve" / f"pairs-{fraction:g}.parquet")
        curve.append({"fraction": fraction, "n_pairs": len(pd.read_parquet(part)),
                      "accuracy_vs_oracle": _train_and_measure(cfg, part, out / "curve" / f"{fraction:g}",
                                                               truth, gaps)})
    curve.append({"fraction": 1.0, "n_pairs": n_pairs, "accuracy_vs_oracle": tuned})
    ceiling = None
    if cfg.critic_ceiling:
        ceiling = {"n_pairs": len(pd.read_parquet(feed_oracle_pairs)),
                   "accuracy_vs_oracle": _train_and_measure(cfg, feed_oracle_pairs, out / "ceiling", truth,
                                                            gaps)}
    summary = {"critic": members[0], "accuracy_vs_oracle": tuned, "zero_shot_clip_vs_oracle": zero_shot,
               "chance": 0.5, "members": members, "learning_curve": curve, "ceiling": ceiling,
               "realism": critic_realism(tuned, zero_shot),
               "members_accuracy_vs_oracle": [
                   accuracy_vs_oracle(reward.load(m), truth, gaps)["pairwise_accuracy"] for m in members[1:]]}
    return finish_stage(summary_file, summary)


def stage_refl(cfg: DemoConfig, critic: str | list[str], train_prompts: list[str], out: Path) -> dict:
    from refl.train import train

    result_file = out / "result.json"
    rcfg = refl_config(cfg, critic, out / "prompts.txt", out, out / "reg_renders" / "captions.parquet"
                       if cfg.n_reg_renders else None)
    settings = trainer_settings(rcfg)
    critics = [critic] if isinstance(critic, str) else critic
    done = enter_stage(out, result_file, settings,
                       {"sd_model": cfg.sd_model, **{f"critic_{k}": c for k, c in enumerate(critics)}})
    if done is not None:
        return refl_result(out, done)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "prompts.txt", "\n".join(train_prompts) + "\n")
    if cfg.n_reg_renders:
        from toyworld.datasets import write_caption_set

        write_caption_set(out / "reg_renders", cfg.n_reg_renders, seed=cfg.seed + 3)
    return refl_result(out, train(rcfg))


def stage_compare(cfg: DemoConfig, components, critic: str, lora: str, out: Path) -> tuple[dict, object]:
    """Best-of-N vs ReFL on held-out prompts, judged by the critic, the untuned CLIP, the oracle and
    fidelity."""
    from evaluation.harness import run_compare
    from toyworld.world import heldout_prompts

    prompts_file = out / "compare_prompts.txt"
    atomic_write_text(prompts_file, "\n".join(heldout_prompts("compare", cfg.n_compare_prompts)) + "\n")
    ccfg = compare_config(cfg, critic, lora, prompts_file, out)
    return run_compare(ccfg, components=components), ccfg
