"""How well can the critic learn the hidden taste at all? The demo's critic trained on oracle-ordered pairs
of the community's own images (no community noise), scored against the oracle on the demo's held-out pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toyworld.demo.config import DemoConfig, critic_config


def critic_ceiling(demo_dir: Path, overrides: list[str] = ()) -> dict:
    """Train the demo's critic on oracle-ordered pairs of the community's own images; accuracy vs oracle."""
    import pandas as pd

    import reward
    from reward.data import load_pairs
    from reward.evaluate import evaluate_pairs
    from reward.images import decode_image
    from reward.train import train
    from runkit.config import load_config, override
    from toyworld.community import oracle_pair_rows

    cfg = load_config(DemoConfig, demo_dir / "demo_config.yaml")
    src = demo_dir / "community" / "train"
    community = pd.read_parquet(src / "pairs.parquet")
    by_prompt: dict[str, set] = {}
    for row in community.itertuples():
        by_prompt.setdefault(row.prompt, set()).update([row.pos_path, row.neg_path])
    images, prompts = [], []
    for prompt, paths in sorted(by_prompt.items()):
        paths = sorted(paths)
        images.append((paths, [np.asarray(decode_image(src / p)) for p in paths]))
        prompts.append(prompt)
    rows = []
    for prompt, (paths, arrays) in zip(prompts, images):
        rows += oracle_pair_rows(prompt, arrays, paths)  # the same gap as the held-out oracle pairs
    pairs = src / "oracle_labelled_pairs.parquet"
    pd.DataFrame(rows).to_parquet(pairs)
    out = demo_dir / "critic_ceiling"
    exp = override(critic_config(cfg, pairs, out), overrides)
    train(exp)
    truth = load_pairs(demo_dir / "community" / "oracle_pairs" / "pairs.parquet")
    return {"oracle_labelled_train_pairs": len(rows),
            "accuracy_vs_oracle": evaluate_pairs(reward.load(Path(exp.train.output_dir) / "critic"), truth)}
