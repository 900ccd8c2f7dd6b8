"""Command-line entry points of `reward` (the console scripts call these; runkit.cli gives
every command its error convention)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from runkit.cli import command
from runkit.config import config_parser, parse_config_args, resolve_device
from runkit.logs import setup_logging


@command
def train_main(argv=None) -> int:
    from reward.config import RewardConfig
    from reward.train import train

    parser = config_parser(RewardConfig, "Fine-tune a Social Reward critic on preference pairs.",
                           flags=("train.output_dir", "train.resume"))
    cfg, _ = parse_config_args(parser, argv)
    setup_logging()
    metrics = train(cfg)
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
    """Pairwise accuracy of a critic on held-out pairs, next to its untuned backbone and the standard reward
    models.

    social-refl-validate-reward heldout.parquet --critic runs/critic \\
        [--baselines ViT-L-14:openai hpsv2:weights/HPS_v2_compressed.pt] [--output-file report.json]
    """
    from reward.config import ValidateConfig

    parser = config_parser(ValidateConfig, validate_main.__doc__, positional=("pairs",), flags=(
        "critic", "baselines", "batch_size", "on_bad_row", "duplicate_pairs", "output_file", "device"),
        required=("critic",))
    cfg, _ = parse_config_args(parser, argv)
    if cfg.output_file and Path(cfg.output_file).is_dir():
        raise IsADirectoryError(f"--output-file {cfg.output_file} is a folder; name the .json report to "
                                "write")
    critic = _model_spec(cfg.critic)
    baselines = [_model_spec(b) for b in cfg.baselines]
    # Every model named is resolved first: a typo in the last baseline must not cost the scoring before it.
    _check_specs("critic", [critic])
    _check_specs("baselines", [b for b in baselines if b != "none"])
    setup_logging()
    device = resolve_device(cfg.device)
    report = _validate(cfg.pairs, critic, baselines, cfg.batch_size, cfg.on_bad_row, device,
                       cfg.duplicate_pairs)
    rows = [(f"critic {critic}", report["tuned"])] + [(b["model"], b) for b in report["baselines"]]
    table = _accuracy_table(rows, report["majority"])
    print(json.dumps(report, indent=2))
    logging.getLogger("reward.validate").info("pairwise accuracy on %s:\n%s", cfg.pairs, table)
    out = Path(cfg.output_file) if cfg.output_file else (Path(critic) / "validation.json"
                                                         if Path(critic).is_dir() else None)
    if out:
        from runkit.files import atomic_write_bytes, paths_relative_to, write_json

        write_json(out, paths_relative_to(report, out.parent))  # the critic folder it sits in may be copied
        atomic_write_bytes(out.with_suffix(".md"), lambda f: f.write(table.encode()))
    return 0


def _model_spec(spec: str) -> str:
    """A critic or open_clip model as the evaluator specs spell it (critic:DIR, clip:NAME[:PRETRAINED], what
    compare and train.heldout_evaluators take) -> as this command loads it (DIR, NAME[:PRETRAINED])."""
    from reward.evaluators import model_spec

    return model_spec(spec)[1]


def _validate(pairs: str, critic: str, baselines: list[str], batch_size: int, on_bad_row: str,
              device: str, duplicate_pairs: str = "drop") -> dict:
    """The report of `validate_main`: the tuned critic, then each baseline in turn (one model in memory)."""
    import gc

    from reward.data import load_pairs
    from reward.evaluate import evaluate_pairs, majority_baseline
    from reward.model import load
    from reward.standard import is_standard_spec, load_standard

    counts: dict = {}
    records = load_pairs(pairs, tie_policy="keep", loss_handles_ties=True, on_bad_row=on_bad_row,
                         duplicate_pairs=duplicate_pairs, counts=counts)
    model = load(critic, device=device)
    chosen = [b for b in baselines or [model.config.pretrained or model.config.model_name] if b != "none"]
    _check_specs("baselines (the critic's own backbone)", [] if baselines else chosen)
    report = {"pairs": str(pairs), "critic": str(critic), "bad_rows_skipped": counts["bad_rows"],
              "duplicate_pairs": counts["duplicate_pairs"], "duplicate_policy": duplicate_pairs,
              "tuned": evaluate_pairs(model, records, batch_size, progress=True), "baselines": []}
    del model
    for spec in chosen:
        base = load_standard(spec, device=device) if is_standard_spec(spec) else load(spec, device=device)
        rep = evaluate_pairs(base, records, batch_size, progress=True)
        rep["tuned_minus_this"] = report["tuned"]["pairwise_accuracy"] - rep["pairwise_accuracy"]
        report["baselines"].append({"model": spec, **rep})
        del base
        gc.collect()
    report["majority"] = majority_baseline(pairs)
    return report


@command
def check_main(argv=None) -> int:
    """Decode every image of a pairs set once; write a report of the bad rows and a clean copy.

    social-refl-check-pairs "data/train-*.parquet" --output-file clean.parquet [--num-workers 8]
    """
    from reward.config import CheckPairsConfig
    from reward.data import check_pairs

    parser = config_parser(CheckPairsConfig, check_main.__doc__, positional=("source",),
                           flags=("output_file", "report_file", "format", "num_workers", "duplicate_pairs"),
                           required=("output_file",))
    cfg, _ = parse_config_args(parser, argv)
    setup_logging()
    report = cfg.report_file or str(Path(cfg.output_file).with_suffix(".report.json"))
    result = check_pairs(cfg.source, cfg.output_file, report, fmt=cfg.format, num_workers=cfg.num_workers,
                         duplicate_pairs=cfg.duplicate_pairs)
    print(json.dumps({k: v for k, v in result.items() if k not in ("problems", "duplicates")}, indent=2))
    for p in result["problems"][:10]:
        logging.getLogger("reward").warning("%s, row %d: %s", p["file"], p["row"], p["reason"])
    return 0
