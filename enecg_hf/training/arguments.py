"""The command line of `train.py`: `TrainScriptArguments`, the parser and the embedded main job.

Not `transformers.TrainingArguments` (which configures `transformers.Trainer`): these are the options of our own
training run; docs/training.md shows how to train with `transformers.Trainer` instead."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

DATA_FORMATS = ("mimic-iv-ecg", "ptb-xl", "challenge", "ludb", "jsonl", "simulated")  # enecg_hf.data.FORMATS


# `python train.py` with no arguments: the embedded main job, with the default training settings. Small enough for 2
# CPU cores in a few minutes (heads train on cached features: epochs are cheap).
MAIN_JOB_ARGS = [
    "--config", "tiny",
    "--data_format", "simulated",
    "--num_records", "300",
    "--label", "rr_interval",
    "--folds", "3",
    "--output_dir", "outputs/enecg-tiny-rr_interval",
]

# Arguments that do not change the result: a run may resume with different values.
NON_RESULT_ARGS = {
    "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_private", "report_to", "cache_features",
    "cache_dir", "logging_steps", "output_dir",
}



@dataclass
class TrainScriptArguments:
    """Every option of `train.py` (run `python train.py --help` for the descriptions)."""

    config: str = "tiny"
    dataset: str | None = None
    data_format: str | None = None
    data_path: str | None = None
    num_records: int | None = None
    limit: int | None = None
    label: str | None = None
    output_dir: str | None = None
    strategy: str = "stacked"
    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    inner_folds: int = 5
    gate_epochs: int = 100
    gate_learning_rate: float = 3e-3
    class_weighting: str = "balanced"
    folds: int = 3
    seed: int = 42
    mixed_precision: str = "no"
    experts: list[str] | None = None
    gate: str | None = None
    adaptation: str | None = None
    cache_features: bool = True
    cache_dir: str | None = None
    feature_batch_size: int = 16
    resume_from_checkpoint: str | None = None
    report_to: list[str] = field(default_factory=list)
    logging_steps: int = 10
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fit_settings(self):
        """The `fitting.FitSettings` these arguments name."""
        from .fitting import FitSettings

        names = {f.name for f in dataclasses.fields(FitSettings)}
        return FitSettings(**{k: v for k, v in self.to_dict().items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train EnECG: subject-wise k-fold CV, a final fit on all data, a Hub-ready output folder. "
        "With no arguments it runs the main job: " + " ".join(MAIN_JOB_ARGS),
    )
    data = parser.add_argument_group("data")
    data.add_argument("--config", default="tiny", help="EnECG config JSON, or the name of one in hub_configs/ (tiny)")
    data.add_argument("--dataset", help="dataset folder written by `Dataset.save_to_disk` / `python -m enecg_hf.data`")
    data.add_argument("--data_format", choices=DATA_FORMATS,
                      help="build the dataset on the fly with enecg_hf.data.build_dataset")
    data.add_argument("--data_path", help="input of --data_format (a folder of records)")
    data.add_argument("--num_records", type=int, help="records to simulate (--data_format simulated)")
    data.add_argument("--limit", type=int, help="use only the first N records (quick runs)")
    data.add_argument("--label", help="column to predict: rr_interval, age, sex, potassium_flag, arrhythmia "
                      "(default: the config's label_name)")
    data.add_argument("--output_dir", help="folder to write (default outputs/enecg-<config>-<label>)")

    train = parser.add_argument_group("training (see docs/training.md, 'How EnECG learns')")
    train.add_argument("--strategy", choices=["stacked", "joint"], default="stacked",
                       help="stacked (default): heads on their own losses with cross-validated early stopping, gate on "
                       "their out-of-fold predictions; joint: the research code's single stage on the mixture's loss")
    train.add_argument("--epochs", type=int, default=100,
                       help="most epochs of a head fit (stacked: early-stopped by the inner folds; joint: all)")
    train.add_argument("--batch_size", type=int, default=32)
    train.add_argument("--learning_rate", type=float, default=3e-3)
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument("--inner_folds", type=int, default=5,
                       help="subject-wise inner folds of the training records that give out-of-fold predictions")
    train.add_argument("--gate_epochs", type=int, default=100,
                       help="most epochs of the gate's input-dependent part (early-stopped; 0: stacked weights only)")
    train.add_argument("--gate_learning_rate", type=float, default=3e-3)
    train.add_argument("--class_weighting", choices=["balanced", "none"], default="balanced",
                       help="classification: weigh classes by inverse frequency (balanced) or records equally")
    train.add_argument("--folds", type=int, default=3, help="subject-wise CV folds (0 or 1: no CV, final fit only)")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                       help="autocast of heads and gate (experts and cached features stay float32)")

    model = parser.add_argument_group("model")
    model.add_argument("--experts", type=_comma_list, help="comma-separated subset of the config's experts "
                       "(single-expert baselines: --experts moment)")
    model.add_argument("--gate", choices=["learned", "uniform"], help="uniform = plain average of the experts")
    model.add_argument("--adaptation", choices=["lora", "full"])

    cache = parser.add_argument_group("feature cache and checkpoints")
    cache.add_argument("--cache_features", action=argparse.BooleanOptionalAction, default=True,
                       help="run the frozen experts once per record and train on cached features (default on)")
    cache.add_argument("--cache_dir", help="feature/dataset cache folder (default OUT/cache)")
    cache.add_argument("--feature_batch_size", type=int, default=16)
    cache.add_argument("--resume_from_checkpoint", choices=["latest"],
                       help="'latest': reuse every finished job under OUT/checkpoints of an interrupted run")

    hub = parser.add_argument_group("logging and Hub")
    hub.add_argument("--report_to", type=_comma_list, default=[], help="trackers for Accelerator(log_with=...), "
                     "e.g. tensorboard, wandb (must be installed); default none")
    hub.add_argument("--logging_steps", type=int, default=10)
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", help="repo id to push to (default: the output folder's name)")
    hub.add_argument("--hub_private", action="store_true")
    return parser


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> TrainScriptArguments:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = list(MAIN_JOB_ARGS)
    namespace = build_parser().parse_args(argv)
    report_to = [r for r in (namespace.report_to or []) if r != "none"]
    args = TrainScriptArguments(**{**vars(namespace), "report_to": report_to})
    if args.report_to:
        from accelerate.tracking import get_available_trackers

        available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
        missing = [name for name in args.report_to if name != "all" and name not in available]
        if missing:
            raise SystemExit(f"--report_to {','.join(missing)}: not installed (installed trackers: "
                             f"{sorted(available) or 'none'}); e.g. pip install tensorboard")
    if args.dataset and args.data_format:
        raise SystemExit("Pass either --dataset or --data_format/--data_path, not both")
    if not args.dataset and not args.data_format:
        raise SystemExit("No data: pass --dataset DIR, or --data_format FORMAT [--data_path PATH] (e.g. simulated)")
    for name in ("epochs", "batch_size", "feature_batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1")
    try:
        args.fit_settings()
    except ValueError as err:
        raise SystemExit(f"--{err}") from None
    if args.folds < 0:
        raise SystemExit("--folds must be >= 0")
    if args.num_records is not None and args.data_format != "simulated":
        raise SystemExit("--num_records is for --data_format simulated; use --limit to read fewer real records")
    return args


# The earlier name, which clashed with `transformers.TrainingArguments`; `training.run` still imports it.
TrainingArguments = TrainScriptArguments
