"""A simulated community whose remixes become Social Reward pairs.

Each user shares the community's taste (the oracle's terms) but weighs the terms their own way
(log-normal factors around the shared weights) and judges noisily (Gaussian noise per look).
A user browses a few prompts; under each they see a few of its images and remix their favourite
(with some probability: people do not always remix). Under one prompt, an image somebody remixed
is a positive, an image that was seen but never remixed a negative (as in Picsart's data: the
negative was exposed, so "not remixed" means "not chosen", not "not seen").

The pairs are as noisy as implicit feedback is: `PairsResult.oracle_agreement` reports the share
that the shared taste agrees with. The oracle's numbers go to the summary only, never into the
parquet, which holds `prompt, pos_path, neg_path` (paths relative to the parquet's folder).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from reward.images import decode_image
from runkit.files import atomic_write_bytes, atomic_write_text, check_output_dir, paths_relative_to
from toyworld.checker import read_image, to_array
from toyworld.oracle import DEFAULT_WEIGHTS, TERMS, oracle_score, reading_terms
from toyworld.render import render_candidates
from toyworld.world import parse_prompt, split_prompts

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"
SUMMARY_FILE = "pairs_summary.json"


@dataclass
class BehaviourConfig:
    """How the simulated users browse, judge and remix."""

    # Exposure matters: the looks per prompt (n_users * prompts_per_user * shown / n_prompts / images
    # per prompt) set how noisy the pairs are. With ~3 looks per image (make_toy_pairs' default)
    # the oracle agrees with about 80% of pairs; much denser exposure leaves only the worst images
    # un-remixed and the pairs get cleaner than implicit feedback is.
    prompts_per_user: int = 12  # prompts each user browses
    shown: int = 4  # images a user sees under one prompt
    remix_prob: float = 0.8  # chance a user remixes their favourite of what they saw
    taste_spread: float = 0.6  # sigma of the log-normal factor on each term's weight, per user
    judgement_noise: float = 0.15  # std of the noise on each utility, in oracle-score units
    max_pairs_per_prompt: int = 12  # keep at most this many (pos, neg) pairs per prompt (random)


@dataclass
class PairsResult:
    parquet: Path
    n_pairs: int
    n_prompts: int  # prompts that produced at least one pair
    n_images: int
    n_remixed: int  # images remixed at least once
    oracle_agreement: float  # share of pairs with oracle(pos) > oracle(neg) (ties count half)
    oracle_ties: float  # share of pairs where the oracle ties
    # Per oracle term: share of pairs whose positive is better on that term (ties count half), i.e.
    # how much of each part of the taste the pairs carry (0.5 = none).
    term_agreement: dict = field(default_factory=dict)
    # Per oracle term: mean over prompts of the spread (std) of that term across one prompt's images,
    # i.e. how much the generator's samples differ in it (what feedback can select at all).
    term_spread: dict = field(default_factory=dict)
    # The realism criteria (REALISM) and whether these pairs meet them: see `realism`.
    realism: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = asdict(self)
        out["parquet"] = str(self.parquet)
        return out


def _is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike))


def _as_uint8(item) -> np.ndarray:
    """Any accepted image (path, PIL, uint8 or [0, 1] float array) -> (H, W, 3) uint8."""
    if _is_path(item):
        # the pairs set's own decoder: any mode, real range
        return np.asarray(decode_image(item), dtype=np.uint8)
    return np.clip(np.rint(to_array(item)), 0, 255).astype(np.uint8)


def build_pairs(images_by_prompt: Mapping[str, Sequence], n_users: int, seed: int, out_dir: str | os.PathLike,
                config: BehaviourConfig | None = None) -> Path:
    """Simulate the community on these images and write `out_dir/pairs.parquet` (+ PNGs); returns its path.

    `images_by_prompt`: prompt -> its images (file paths, PIL images, or (H, W, 3) arrays; an (n, H, W, 3)
    array works too). Arrays and PIL images are written as PNGs under `out_dir/images/`; paths are
    referenced where they are. Same inputs and seed -> the same parquet.
    """
    return build_pairs_with_stats(images_by_prompt, n_users, seed, out_dir, config).parquet


def build_pairs_with_stats(images_by_prompt: Mapping[str, Sequence], n_users: int, seed: int,
                           out_dir: str | os.PathLike, config: BehaviourConfig | None = None) -> PairsResult:
    """`build_pairs`, returning the counts and the oracle agreement too (also written as pairs_summary.json).

    Measure every image once, let the users browse and remix, then pair remixed with seen-but-not-remixed
    images; the last two steps draw from one generator in that order, so a seed fixes the pairs."""
    cfg = config or BehaviourConfig()
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prompts = sorted(images_by_prompt)  # a fixed order, whatever order the mapping came in
    if not prompts:
        raise ValueError("build_pairs() got no prompts")
    items = [list(images_by_prompt[p]) for p in prompts]

    terms, owner, index_in_prompt = _image_terms(prompts, items)  # (I, T), (I,), (I,)
    starts = np.searchsorted(owner, np.arange(len(prompts)))  # first image of each prompt
    seen, remixed = _browse_and_remix(terms, items, starts, n_users, cfg, rng)
    chosen = _pick_pairs(items, starts, seen, remixed, cfg.max_pairs_per_prompt, rng)

    paths = _PairImages(items, owner, index_in_prompt, out_dir)
    rows = [{"prompt": prompts[k], "pos_path": paths(int(a)), "neg_path": paths(int(b))}
            for k, combos in chosen for a, b in combos]
    df = pd.DataFrame(rows, columns=["prompt", "pos_path", "neg_path"])
    parquet = atomic_write_bytes(out_dir / PAIRS_FILE, lambda f: df.to_parquet(f, index=False))
    pair_index = [(a, b) for _, combos in chosen for a, b in combos]
    result = PairsResult(
        parquet=parquet, n_pairs=len(df), n_prompts=len(chosen), n_images=len(terms),
        n_remixed=int((remixed > 0).sum()), **_oracle_agreement(terms, pair_index),
        term_spread=term_spread(terms, owner), config={"n_users": n_users, "seed": seed, **asdict(cfg)},
    )
    result.realism = realism(result.oracle_agreement, result.term_agreement, result.term_spread)
    # Not write_json: a pair-less run's NaN agreement stays NaN, as the summary has always shown it.
    # The parquet named relative to the folder, so a copy of it names its own.
    summary = paths_relative_to(result.summary(), out_dir)
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    logger.info("%d pairs from %d prompts (%d images, %d remixed); oracle agrees with %.1f%%",
                result.n_pairs, result.n_prompts, result.n_images, result.n_remixed,
                100 * result.oracle_agreement)
    return result


def _image_terms(prompts: list[str], items: list[list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The oracle terms of every image, once (users only reweigh them): terms (I, T), and per image the
    index of its prompt (I,) and its index among that prompt's images (I,)."""
    owner, index_in_prompt, term_rows = [], [], []
    for k, (prompt, imgs) in enumerate(tqdm(list(zip(prompts, items)), desc="oracle terms", leave=False)):
        scene = parse_prompt(prompt)
        for j, img in enumerate(imgs):
            t = reading_terms(read_image(_as_uint8(img)), scene)
            term_rows.append([t[name] for name in TERMS])
            owner.append(k)
            index_in_prompt.append(j)
    return np.asarray(term_rows), np.asarray(owner), np.asarray(index_in_prompt)


# What makes simulated feedback realistic, fixed before any method is measured against it:
# - pairs agree with the shared taste as often as human annotators agree with each other's preference
#   labels (ImageReward's annotators 65.3%, HPD v2's 78.1%);
# - every oracle term on which the generator's samples of one prompt really vary (mean within-prompt
#   std above `term_varies_above`) is carried by the pairs (term agreement at least `term_carried_from`);
# - a critic trained on the pairs orders held-out pairs of the base model's samples (at the settings ReFL
#   and the comparison use) as the oracle does at least `critic_accuracy_from` of the time (ImageReward
#   reaches 65.1%, PickScore 70.5% against held-out human labels), with its 95% interval above the
#   zero-shot CLIP's (so the feedback taught something the pre-trained model did not know).
REALISM = {"agreement_range": (0.65, 0.78), "term_varies_above": 0.05, "term_carried_from": 0.55,
           "critic_accuracy_from": 0.65}


def term_spread(terms: np.ndarray, owner: np.ndarray) -> dict[str, float]:
    """Per term, the mean over prompts of the std of that term across the prompt's images; terms (I, T)."""
    stds = [terms[owner == k].std(axis=0) for k in np.unique(owner) if (owner == k).sum() > 1]  # each (T,)
    if not stds:
        return {}
    mean = np.mean(stds, axis=0)  # (T,)
    return {t: float(mean[j]) for j, t in enumerate(TERMS)}


def realism(oracle_agreement: float, term_agreement: dict, spread: dict) -> dict:
    """The REALISM criteria applied: which hold, and the terms that vary but are not carried."""
    lo, hi = REALISM["agreement_range"]
    varying = [t for t, v in spread.items() if v > REALISM["term_varies_above"]]
    uncarried = [t for t in varying if term_agreement.get(t, 0.5) < REALISM["term_carried_from"]]
    in_range = bool(lo <= oracle_agreement <= hi)
    return {"criteria": {k: list(v) if isinstance(v, tuple) else v for k, v in REALISM.items()},
            "agreement_in_human_range": in_range, "varying_terms": varying,
            "uncarried_varying_terms": uncarried, "realistic": in_range and not uncarried}


def critic_realism(critic: dict, zero_shot: dict) -> dict:
    """The REALISM criterion on the critic: `critic` and `zero_shot` are pairwise accuracy reports against the
    oracle on the same held-out pairs (reward.stats.pairwise_accuracy_report)."""
    reaches = bool(critic["pairwise_accuracy"] >= REALISM["critic_accuracy_from"])
    apart = bool(critic["ci95"][0] > zero_shot["ci95"][1])
    return {"critic_accuracy_from": REALISM["critic_accuracy_from"], "reaches_accuracy": reaches,
            "interval_above_zero_shot": apart, "realistic": reaches and apart}


def _shared_weights() -> np.ndarray:
    return np.array([DEFAULT_WEIGHTS[t] for t in TERMS])  # (T,)


def _browse_and_remix(terms: np.ndarray, items: list[list], starts: np.ndarray, n_users: int,
                      cfg: BehaviourConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each user, with their own weights on the shared taste, browses prompts and remixes the favourite
    of the images shown (noisy judgement). Returns per image how often it was seen and remixed, (I,) each."""
    shared = _shared_weights()  # (T,)
    seen = np.zeros(len(terms), dtype=np.int64)
    remixed = np.zeros(len(terms), dtype=np.int64)
    eligible = [k for k, imgs in enumerate(items) if len(imgs) >= 2]
    for _ in range(n_users):
        weights = shared * rng.lognormal(0.0, cfg.taste_spread, len(TERMS))  # (T,) this user's taste
        weights /= weights.sum()
        for k in rng.choice(eligible, size=min(cfg.prompts_per_user, len(eligible)), replace=False):
            n_here = len(items[k])
            shown = starts[k] + rng.choice(n_here, size=min(cfg.shown, n_here), replace=False)  # (s,)
            utility = terms[shown] @ weights + rng.normal(0, cfg.judgement_noise, len(shown))  # (s,)
            seen[shown] += 1
            if rng.uniform() < cfg.remix_prob:
                remixed[shown[int(np.argmax(utility))]] += 1
    return seen, remixed


def _pick_pairs(items: list[list], starts: np.ndarray, seen: np.ndarray, remixed: np.ndarray,
                max_per_prompt: int, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
    """(prompt index, (k, 2) image indices (positive, negative)) for every prompt with both a remixed image
    and a seen-but-never-remixed one; at most `max_per_prompt` random pairs each."""
    chosen = []
    for k in range(len(items)):
        idx = starts[k] + np.arange(len(items[k]))  # (n,)
        pos = idx[remixed[idx] > 0]
        neg = idx[(remixed[idx] == 0) & (seen[idx] > 0)]
        if len(pos) == 0 or len(neg) == 0:
            continue
        combos = np.array([(a, b) for a in pos for b in neg])  # (n_pos * n_neg, 2)
        if len(combos) > max_per_prompt:
            combos = combos[rng.choice(len(combos), size=max_per_prompt, replace=False)]
        chosen.append((k, combos))
    return chosen


class _PairImages:
    """Image index -> its path in the parquet, relative to the parquet's folder (so the data set can be
    moved whole); arrays and PIL images are written as PNGs the first time a pair uses them."""

    def __init__(self, items: list[list], owner: np.ndarray, index_in_prompt: np.ndarray, out_dir: Path):
        self.items, self.owner, self.index_in_prompt, self.out_dir = items, owner, index_in_prompt, out_dir
        self.written: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        if i not in self.written:
            k, j = self.owner[i], self.index_in_prompt[i]
            item = self.items[k][j]
            if _is_path(item):
                self.written[i] = os.path.relpath(Path(item).resolve(), self.out_dir.resolve())
            else:
                name = f"images/p{k:05d}_{j:03d}.png"
                (self.out_dir / "images").mkdir(exist_ok=True)
                Image.fromarray(_as_uint8(item)).save(self.out_dir / name)
                self.written[i] = name
        return self.written[i]


def _oracle_agreement(terms: np.ndarray, pair_index: list[tuple[int, int]]) -> dict:
    """How much of the shared taste the pairs carry: the PairsResult fields oracle_agreement, oracle_ties
    and term_agreement (ties count half)."""
    shared = _shared_weights()
    oracle = terms @ shared / shared.sum()  # (I,) the shared taste
    agree = np.asarray([1.0 if oracle[a] > oracle[b] else 0.5 if oracle[a] == oracle[b] else 0.0
                        for a, b in pair_index])
    term_agreement = {}
    if pair_index:
        pos, neg = np.asarray(pair_index).T  # (P,), (P,)
        better = np.sign(terms[pos] - terms[neg])  # (P, T): +1 positive better, 0 tie, -1 worse
        term_agreement = {t: float(((better[:, j] + 1) / 2).mean()) for j, t in enumerate(TERMS)}
    return {"oracle_agreement": float(agree.mean()) if len(agree) else float("nan"),
            "oracle_ties": float((agree == 0.5).mean()) if len(agree) else float("nan"),
            "term_agreement": term_agreement}


def oracle_pair_rows(prompt: str, images: Sequence, paths: Sequence[str],
                     min_gap: float = 0.02) -> list[dict]:
    """Every pair of one prompt's images whose oracle scores differ by at least `min_gap`, better first, as
    rows `prompt, pos_path, neg_path`: the truth a critic is measured against (no community noise)."""
    scores = oracle_score(list(images), [prompt] * len(images))  # (n,)
    rows = []
    for a in range(len(paths)):
        for b in range(a + 1, len(paths)):
            if abs(scores[a] - scores[b]) < min_gap:
                continue
            pos, neg = (a, b) if scores[a] > scores[b] else (b, a)
            rows.append({"prompt": prompt, "pos_path": paths[pos], "neg_path": paths[neg]})
    return rows


def write_oracle_pairs(images: np.ndarray, prompts: list[str], out: Path, min_gap: float = 0.02) -> Path:
    """`oracle_pair_rows` of each prompt's images (P, n, H, W, 3), written as PNGs plus out/pairs.parquet."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, prompt in enumerate(prompts):
        names = []
        for j in range(images.shape[1]):
            name = f"images/{k:04d}_{j:02d}.png"
            Image.fromarray(images[k, j]).save(out / name)
            names.append(name)
        rows += oracle_pair_rows(prompt, images[k], names, min_gap)
    return atomic_write_bytes(out / PAIRS_FILE, lambda f: pd.DataFrame(rows).to_parquet(f))


@dataclass
class ToyPairsConfig:
    output_dir: str = "runs/toy_pairs"  # output folder: train/ and heldout/ below it
    n_train_prompts: int = 600  # prompts drawn from the training split
    n_heldout_prompts: int = 150  # prompts drawn from the held-out split (at most its size)
    n_candidates: int = 8  # renders of varied quality per prompt (a generator's samples stand-in)
    users_per_prompt: float = 0.5  # community size relative to the number of prompts
    seed: int = 0
    split_seed: int = 0  # the train / held-out prompt split (toyworld.world.split_prompts)
    size: int = 32  # image side in pixels
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)  # how the users browse, judge, remix

    def __post_init__(self):
        # A pair needs two renders of a prompt and a user who saw them; fewer wrote an empty set with exit 0.
        if self.n_train_prompts < 1 or self.n_heldout_prompts < 1 or self.n_candidates < 2 \
                or not self.users_per_prompt > 0:
            raise ValueError(f"n_train_prompts and n_heldout_prompts must be >= 1, n_candidates >= 2 and "
                             f"users_per_prompt > 0; got {self.n_train_prompts}, {self.n_heldout_prompts}, "
                             f"{self.n_candidates} and {self.users_per_prompt}")


def make_toy_pairs(cfg: ToyPairsConfig) -> dict:
    """Render candidates for train and held-out prompts, simulate the community, write both pair sets."""
    check_output_dir(cfg.output_dir, "output_dir")
    train, held = split_prompts(cfg.split_seed)
    summary: dict = {}
    for offset, (split, pool, n) in enumerate((("train", train, cfg.n_train_prompts),
                                               ("heldout", held, cfg.n_heldout_prompts))):
        rng = np.random.default_rng([cfg.seed, offset])
        chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
        images = {p: render_candidates(parse_prompt(p), rng, cfg.n_candidates, size=cfg.size)
                  for p in tqdm(chosen, desc=f"render {split}", leave=False)}
        n_users = max(1, round(cfg.users_per_prompt * len(chosen)))
        result = build_pairs_with_stats(images, n_users, cfg.seed + 1000 * offset,
                                        Path(cfg.output_dir) / split, cfg.behaviour)
        summary[split] = result.summary()
    return summary
