"""Command-line entry points of `reward` (scripts/ and the console scripts wrap these; runkit.cli gives
every command its error convention)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from runkit.cli import command
from runkit.config import add_config_args, config_overrides, load_config
from runkit.logs import setup_logging


@command
def train_main(argv=None) -> int:
    from reward.config import RewardConfig
    from reward.train import train

    parser = argparse.ArgumentParser(description="Fine-tune a Social Reward critic on preference pairs.")
    add_config_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    metrics = train(load_config(RewardConfig, args.config, config_overrides(args)))
    if metrics.get("eval"):
        print(json.dumps({k: v for k, v in metrics["eval"].items()}, indent=2))
    return 0


def _accuracy_table(rows: list[tuple[str, dict]], majority: dict) -> str:
    """Markdown: one row per metric (accuracy with its 95% interval), then chance and the majority rule."""
    lines = ["| metric | pairwise accuracy | 95% interval | pairs |", "|---|---|---|---|"]
    for name, rep in rows:
        lo, hi = rep["ci95"]
        lines.append(f"| {name} | {rep['pairwise_accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {rep['n_pairs']} |")
    n = rows[0][1]["n_pairs"] if rows else 0
    lines.append(f"| chance | 0.500 | | {n} |")
    rate = majority.get("rate")
    lines.append(f"| majority ({majority['rule']}) | {'n/a' if rate is None else f'{rate:.3f}'} | | "
                 f"{majority.get('n_pairs', '')} |")
    return "\n".join(lines) + "\n"


def _check_specs(flag: str, specs: list[str]) -> None:
    """Every model a command will load, resolved before its work starts (reward.standard.check_spec)."""
    from reward.standard import check_spec

    for spec in specs:
        try:
            check_spec(spec)
        except (ValueError, OSError) as err:
            raise type(err)(f"{flag} {spec}: {err}") from err


@command
def validate_main(argv=None) -> int:
    from reward.standard import STANDARD_KINDS

    parser = argparse.ArgumentParser(
        description="Pairwise accuracy of a critic on held-out pairs, next to its untuned backbone and the "
                    "standard reward models.")
    parser.add_argument("pairs", help="pairs file (parquet/csv/jsonl)")
    parser.add_argument("--checkpoint", required=True,
                        help="critic directory, or open_clip name[:pretrained]")
    parser.add_argument("--baseline", action="append", default=None,
                        help="a model to compare, repeatable: a critic or open_clip name[:pretrained] (also "
                             "spelled as the evaluator specs spell them, critic:DIR and clip:NAME), or a "
                             f"standard reward spec KIND:PATH ({', '.join(STANDARD_KINDS)}; e.g. "
                             "hpsv2:weights/HPS_v2_compressed.pt). Default: the checkpoint's own backbone; "
                             "'none' to skip")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--on-bad-row", default="error", choices=["error", "skip"])
    parser.add_argument("--out", default=None, help="JSON file to write (default: beside the checkpoint); "
                                                    "the table goes beside it as .md")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    args.checkpoint = _model_spec(args.checkpoint)
    args.baseline = [_model_spec(b) for b in args.baseline] if args.baseline else args.baseline
    # Every model named is resolved first: a typo in the last baseline must not cost the scoring before it.
    _check_specs("--checkpoint", [args.checkpoint])
    _check_specs("--baseline", [b for b in args.baseline or [] if b != "none"])
    setup_logging()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    report = _validate(args)
    rows = [(f"critic {args.checkpoint}", report["tuned"])] + [(b["model"], b) for b in report["baselines"]]
    table = _accuracy_table(rows, report["majority"])
    print(json.dumps(report, indent=2))
    logging.getLogger("reward.validate").info("pairwise accuracy on %s:\n%s", args.pairs, table)
    out = Path(args.out) if args.out else (Path(args.checkpoint) / "validation.json"
                                           if Path(args.checkpoint).is_dir() else None)
    if out:
        from runkit.files import atomic_write_bytes, write_json

        write_json(out, report)
        atomic_write_bytes(out.with_suffix(".md"), lambda f: f.write(table.encode()))
    return 0


def _model_spec(spec: str) -> str:
    """A critic or open_clip model as the evaluator specs spell it (critic:DIR, clip:NAME[:PRETRAINED], what
    compare.py and train.heldout_evaluators take) -> as this command spells it (DIR, NAME[:PRETRAINED])."""
    kind, _, rest = spec.partition(":")
    return rest if kind in ("critic", "clip") and rest else spec


def _validate(args) -> dict:
    """The report of `validate_main`: the tuned critic, then each baseline in turn (one model in memory)."""
    import gc

    from reward.data import load_pairs
    from reward.evaluate import evaluate_pairs, majority_baseline
    from reward.model import load
    from reward.standard import is_standard_spec, load_standard

    records = load_pairs(args.pairs, tie_policy="keep", loss_handles_ties=True, on_bad_row=args.on_bad_row)
    model = load(args.checkpoint, device=args.device)
    baselines = [b for b in args.baseline or [model.config.pretrained or model.config.model_name]
                 if b != "none"]
    _check_specs("--baseline (the critic's own backbone)", [] if args.baseline else baselines)
    report = {"pairs": str(args.pairs), "checkpoint": str(args.checkpoint),
              "tuned": evaluate_pairs(model, records, args.batch_size, progress=True), "baselines": []}
    del model
    for spec in baselines:
        base = (load_standard(spec, device=args.device) if is_standard_spec(spec)
                else load(spec, device=args.device))
        rep = evaluate_pairs(base, records, args.batch_size, progress=True)
        rep["tuned_minus_this"] = report["tuned"]["pairwise_accuracy"] - rep["pairwise_accuracy"]
        report["baselines"].append({"model": spec, **rep})
        del base
        gc.collect()
    report["majority"] = majority_baseline(args.pairs)
    return report


@command
def check_main(argv=None) -> int:
    from reward.data import FORMATS, check_pairs

    parser = argparse.ArgumentParser(
        description="Decode every image of a pairs set once; write a report of the bad rows and a clean "
                    "copy.")
    parser.add_argument("source", help="pairs file, shard folder, glob (quote it) or datasets save_to_disk "
                                       "folder")
    parser.add_argument("--out", required=True, help="clean pairs file to write (.parquet)")
    parser.add_argument("--report", default=None, help="JSON report (default: <out>.report.json)")
    parser.add_argument("--fmt", default="auto", choices=["auto", *FORMATS])
    parser.add_argument("--num-workers", type=int, default=0, help="processes decoding images")
    args = parser.parse_args(argv)
    setup_logging()
    report = args.report or str(Path(args.out).with_suffix(".report.json"))
    result = check_pairs(args.source, args.out, report, fmt=args.fmt, num_workers=args.num_workers)
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=2))
    for p in result["problems"][:10]:
        logging.getLogger("reward").warning("%s, row %d: %s", p["file"], p["row"], p["reason"])
    return 0
