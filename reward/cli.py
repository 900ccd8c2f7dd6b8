"""Command-line entry points of `reward` (scripts/ wraps these)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from reward.config import ConfigError, add_config_args, load_config


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # accelerate logs every file of every checkpoint at INFO; one line per checkpoint is ours to write.
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_main(argv=None) -> int:
    from reward.data import DataError
    from reward.train import RewardExperiment, train

    parser = argparse.ArgumentParser(description="Fine-tune a Social Reward critic on preference pairs.")
    add_config_args(parser)
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(RewardExperiment, args.config, args.overrides)
        metrics = train(cfg, resume=args.resume)
    except (ConfigError, DataError, FileNotFoundError) as err:
        logging.getLogger("reward").error("%s", err)
        return 2
    if metrics.get("eval"):
        print(json.dumps({k: v for k, v in metrics["eval"].items()}, indent=2))
    return 0


def validate_main(argv=None) -> int:
    from reward.data import DataError, load_pairs
    from reward.evaluate import evaluate_pairs
    from reward.model import load

    parser = argparse.ArgumentParser(
        description="Pairwise accuracy of a critic on held-out pairs, next to its untuned backbone.")
    parser.add_argument("pairs", help="pairs file (parquet/csv/jsonl)")
    parser.add_argument("--checkpoint", required=True, help="critic directory, or open_clip name[:pretrained]")
    parser.add_argument("--baseline", default=None,
                        help="untuned critic to compare (default: the checkpoint's own backbone; 'none' to skip)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--on-bad-row", default="error", choices=["error", "skip"])
    parser.add_argument("--out", default=None, help="JSON file to write (default: beside the checkpoint)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    setup_logging()
    log = logging.getLogger("reward.validate")
    try:
        records = load_pairs(args.pairs, tie_policy="keep", loss_handles_ties=True, on_bad_row=args.on_bad_row)
        model = load(args.checkpoint, device=args.device)
        report = {"pairs": str(args.pairs), "checkpoint": str(args.checkpoint),
                  "tuned": evaluate_pairs(model, records, args.batch_size, progress=True)}
        baseline = args.baseline
        if baseline is None:
            base = model.config.pretrained
            baseline = base if base else f"{model.config.model_name}"
        if baseline != "none":
            base_model = load(baseline, device=args.device)
            report["baseline"] = {"model": baseline, **evaluate_pairs(base_model, records, args.batch_size)}
            report["gain"] = report["tuned"]["pairwise_accuracy"] - report["baseline"]["pairwise_accuracy"]
    except (DataError, FileNotFoundError, ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    out = Path(args.out) if args.out else (Path(args.checkpoint) / "validation.json"
                                           if Path(args.checkpoint).is_dir() else None)
    if out:
        out.write_text(text)
    return 0


def check_main(argv=None) -> int:
    from reward.data import DataError, check_pairs

    parser = argparse.ArgumentParser(
        description="Decode every image of a pairs set once; write a report of the bad rows and a clean copy.")
    parser.add_argument("source", help="pairs file, shard folder, glob (quote it) or datasets save_to_disk folder")
    parser.add_argument("--out", required=True, help="clean pairs file to write (.parquet)")
    parser.add_argument("--report", default=None, help="JSON report (default: <out>.report.json)")
    parser.add_argument("--fmt", default="auto", choices=["auto", "social", "pickapic", "ranked"])
    parser.add_argument("--num-workers", type=int, default=0, help="processes decoding images")
    args = parser.parse_args(argv)
    setup_logging()
    report = args.report or str(Path(args.out).with_suffix(".report.json"))
    try:
        result = check_pairs(args.source, args.out, report, fmt=args.fmt, num_workers=args.num_workers)
    except (DataError, FileNotFoundError) as err:
        logging.getLogger("reward").error("%s", err)
        return 2
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=2))
    for p in result["problems"][:10]:
        logging.getLogger("reward").warning("%s, row %d: %s", p["file"], p["row"], p["reason"])
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
