"""The command line of `train.py`: `TrainScriptArguments`, the parser and the embedded main job.

Not `transformers.TrainingArguments` (which configures `transformers.Trainer`): these are the options of our own
training run; docs/training.md shows how to train with `transformers.Trainer` instead."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..precision_enecg import EXPERT_PRECISIONS
from .errors import TrainingSetupError
from .fitting import CLASS_WEIGHTINGS, FIT_STRATEGIES, INNER_GROUPS, FitSettings

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


def option(help: str | None = None, **metadata: Any) -> dict[str, Any]:
    """`field(metadata=...)` of an option: its help text and argparse settings, read by `HfArgumentParser`."""
    return {"help": help, **metadata} if help else metadata


# The options that set a `FitSettings` field (declared with `fit_setting`): what `fit_settings()` passes on.
FIT_OPTIONS: set[str] = set()


def fit_setting(name: str, help: str | None = None, **metadata: Any) -> Any:
    """`field(...)` of the option that sets the `FitSettings` field `name`: its default is that field's (read from
    `FitSettings`, which holds the defaults of a fit), its help and argparse settings are given here."""
    setting = {f.name: f for f in dataclasses.fields(FitSettings)}[name]
    FIT_OPTIONS.add(name)
    return field(default=setting.default, default_factory=setting.default_factory, metadata=option(help, **metadata))


# One dataclass per group of `python train.py --help`; `TrainScriptArguments` holds them all. `HfArgumentParser` builds
# the command line from these fields. Each default is written once: here, or for the options of a fit (`fit_setting`)
# in `FitSettings`.
@dataclass
class DataArguments:
    _argument_group_name = "data"

    config: str = field(default="tiny", metadata=option(
        "EnECG config JSON, or the name of one in hub_configs/ (tiny)"))
    dataset: list[str] | None = field(default=None, metadata=option(
        "dataset folder(s) written by `Dataset.save_to_disk` / `python -m enecg_hf.data`; several (comma- or "
        "space-separated, e.g. one per source) are trained on together", metavar="DATASET"))
    data_format: str | None = field(default=None, metadata=option(
        "build the dataset on the fly with enecg_hf.data.build_dataset", choices=DATA_FORMATS))
    data_path: str | None = field(default=None, metadata=option("input of --data_format (a folder of records)"))
    num_records: int | None = field(default=None, metadata=option("records to simulate (--data_format simulated)"))
    limit: int | None = field(default=None, metadata=option("use only the first N records (quick runs)"))
    label: str | None = field(default=None, metadata=option(
        "column to predict: rr_interval, age, sex, potassium_flag, arrhythmia (default: the config's label_name)"))
    labels: list[str] | None = field(default=None, metadata=option(
        "several columns, one multi-task model (experts run once for all): e.g. rr_interval,age,sex,arrhythmia, or "
        "all (every task column the dataset has values for); records may have any subset of labels", metavar="LABELS"))
    output_dir: str | None = field(default=None, metadata=option(
        "folder to write (default outputs/enecg-<config>-<label>, or -multitask)"))


@dataclass
class FitArguments:
    _argument_group_name = "training (see docs/training.md, 'How EnECG learns')"

    strategy: str = fit_setting("strategy", help=(
        "stacked (default): heads on their own losses with cross-validated early stopping, gate on their out-of-fold "
        "predictions; joint: the research code's single stage on the mixture's loss"), choices=list(FIT_STRATEGIES))
    epochs: int = fit_setting("epochs", help=(
        "most epochs of a head fit (stacked: early-stopped by the inner folds; joint: all)"))
    batch_size: int = fit_setting("batch_size")
    learning_rate: float = fit_setting("learning_rate")
    weight_decay: float = fit_setting("weight_decay")
    inner_folds: int = fit_setting("inner_folds", help=(
        "subject-wise inner folds of the training records that give out-of-fold predictions"))
    patience: int = fit_setting("patience", help=(
        "end an inner-fold fit once no held-out loss improved for this many epochs (0: never)"))
    gate_epochs: int = fit_setting("gate_epochs", help=(
        "most epochs of the gate's input-dependent part (early-stopped; 0: stacked weights only)"))
    gate_learning_rate: float = fit_setting("gate_learning_rate")
    gate_weight_floor: float = fit_setting("gate_weight_floor", help=(
        "the gate's input-dependent part starts from the stacked weights with every expert at least this weight, so "
        "that it can route to an expert stacking left out (0: from the stacked weights; epoch 0 is always them)"))
    class_weighting: str = fit_setting("class_weighting", help=(
        "classification: weigh classes by inverse frequency (balanced) or records equally"),
        choices=list(CLASS_WEIGHTINGS))
    folds: int = field(default=3, metadata=option("subject-wise CV folds (0 or 1: no CV, final fit only)"))
    cv_groups: list[str] = field(default_factory=lambda: ["subject"], metadata=option(
        "what cross-validation holds out: subject (--folds subject-wise folds, default), source (leave-one-source-"
        "out: each source group in turn, trained on the records of every other institution), or subject,source",
        metavar="CV_GROUPS"))
    inner_groups: str = fit_setting("inner_groups", help=(
        "inner folds (heads' penalties and epochs, gate): subject (default), or source: whole institutions held out "
        "when the training records come from two or more, else subjects"), choices=list(INNER_GROUPS))
    seed: int = fit_setting("seed")
    mixed_precision: str = field(default="no", metadata=option(
        "autocast of heads and gate (experts and cached features stay float32)", choices=["no", "fp16", "bf16"]))


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    experts: list[str] | None = field(default=None, metadata=option(
        "comma-separated subset of the config's experts (single-expert baselines: --experts moment)",
        metavar="EXPERTS"))
    gate: str | None = field(default=None, metadata=option(
        "uniform = plain average of the experts", choices=["learned", "uniform"]))
    gate_input: str | None = field(default=None, metadata=option(
        "what the learned gate reads per record: the samples of the config's gate_leads (the paper; the config's "
        "default) or every head's prediction (docs/benchmarks.md: no better on ../shared/data)",
        choices=["leads", "predictions"]))
    adaptation: str | None = field(default=None, metadata=option(choices=["lora", "full"]))
    expert_precision: str = field(default="fp32", metadata=option(
        "precision of the frozen experts' pass: int8 (dynamic quantisation of their Linear layers, CPU), bf16/fp16 "
        "(autocast; fp16 on a GPU); the saved model keeps float32 weights (docs/training.md, 'Expert precision')",
        choices=list(EXPERT_PRECISIONS)))


@dataclass
class CacheArguments:
    _argument_group_name = "feature store and checkpoints (docs/training.md)"

    cache_features: bool = field(default=True, metadata=option(
        "read the experts' outputs from the shared feature store and add what is missing (default on; "
        "--no-cache_features: compute them for this run only, in a temporary store removed at the end)"))
    cache_dir: str | None = field(default=None, metadata=option(
        "cache folder: dataset builds of --data_format (default OUT/cache) and the feature store, CACHE_DIR/features "
        "(default $ENECG_HF_CACHE/features, else ~/.cache/enecg_hf/features)"))
    feature_batch_size: int = field(default=16, metadata=option(
        "records per forward pass of the experts, for the features the store does not hold yet"))
    resume_from_checkpoint: str | None = field(default=None, metadata=option(
        "'latest': reuse every finished job under OUT/checkpoints of an interrupted run", choices=["latest"]))


@dataclass
class HubArguments:
    _argument_group_name = "logging and Hub"

    report_to: list[str] = field(default_factory=list, metadata=option(
        "trackers for Accelerator(log_with=...), e.g. tensorboard, wandb (must be installed); default none",
        metavar="REPORT_TO"))
    logging_steps: int = 10
    push_to_hub: bool = False
    hub_model_id: str | None = field(default=None, metadata=option(
        "repo id to push to (default: the output folder's name)"))
    hub_private: bool = False


ARGUMENT_GROUPS = (DataArguments, FitArguments, ModelArguments, CacheArguments, HubArguments)
# Options whose values may list several items separated by commas (or spaces).
LIST_OPTIONS = ("experts", "report_to", "labels", "dataset", "cv_groups")
CV_GROUPS = ("subject", "source")


@dataclass
class TrainScriptArguments(HubArguments, CacheArguments, ModelArguments, FitArguments, DataArguments):
    """Every option of `train.py` (run `python train.py --help` for the descriptions); the fields of the groups
    above, in their order."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fit_settings(self) -> FitSettings:
        """The `fitting.FitSettings` these arguments name (the settings without an option keep their defaults)."""
        return FitSettings(**{name: getattr(self, name) for name in FIT_OPTIONS})


def train_option(name: str, help: str | None = None) -> Any:
    """`field(...)` of another command's option that means what train.py's `--name` means: train.py's default and
    argparse settings, and its help unless `help` is given (`python -m enecg_hf.features` declares its data and model
    options so)."""
    source = {f.name: f for f in dataclasses.fields(TrainScriptArguments)}[name]
    metadata = dict(source.metadata) if help is None else {**source.metadata, "help": help}
    return field(default=source.default, default_factory=source.default_factory, metadata=metadata)


def check_data_arguments(args: Any) -> None:
    """Raise `TrainingSetupError` where the data options (`--dataset`, `--data_format`, `--num_records`) of `args`
    cannot go together; train.py and `python -m enecg_hf.features` check them so."""
    if args.dataset and args.data_format:
        raise TrainingSetupError("Pass either --dataset or --data_format/--data_path, not both")
    if not args.dataset and not args.data_format:
        raise TrainingSetupError("No data: pass --dataset DIR, or --data_format FORMAT [--data_path PATH] "
                                 "(e.g. simulated)")
    if args.num_records is not None and args.data_format != "simulated":
        raise TrainingSetupError("--num_records is for --data_format simulated; use --limit to read fewer real "
                                 "records")


def build_parser():
    """`python train.py`'s parser: `transformers.HfArgumentParser` over the argument groups."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        ARGUMENT_GROUPS,
        prog="train.py",
        description="Train EnECG: subject-wise k-fold CV, a final fit on all data, a Hub-ready output folder. "
        "With no arguments it runs the main job: " + " ".join(MAIN_JOB_ARGS),
        formatter_class=argparse.HelpFormatter,  # the help texts as written (no "(default: ...)" appended)
    )
    # The spelling of argparse's BooleanOptionalAction, which train.py accepted before (HfArgumentParser adds
    # --no_cache_features and --no-cache-features).
    parser.add_argument("--no-cache_features", dest="cache_features", action="store_false", help=argparse.SUPPRESS)
    return parser


def comma_list(text: str) -> list[str]:
    """The items of one value of a list option: `"a,b"` gives `["a", "b"]` (blanks dropped)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> TrainScriptArguments:
    """`train.py`'s arguments (`sys.argv` by default; none: the main job). Argparse's own errors (an unknown option, a
    value of the wrong type or not among the choices) and `--help` exit as argparse does; arguments that cannot go
    together, or values a fit does not accept, raise `TrainingSetupError`, which `main()` turns into an exit message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = list(MAIN_JOB_ARGS)
    parser = build_parser()
    *groups, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True,
                                                          look_for_args_file=False)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")  # argparse's own message and exit status
    values = {k: v for group in groups for k, v in dataclasses.asdict(group).items()}
    for name in LIST_OPTIONS:  # "--experts a,b" and "--experts a b" alike
        if values[name] is not None:
            values[name] = [item for value in values[name] for item in comma_list(value)]
    values["report_to"] = [r for r in values["report_to"] if r != "none"]
    args = TrainScriptArguments(**values)
    if args.report_to:
        from accelerate.tracking import get_available_trackers

        available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
        missing = [name for name in args.report_to if name != "all" and name not in available]
        if missing:
            raise TrainingSetupError(f"--report_to {','.join(missing)}: not installed (installed trackers: "
                                     f"{sorted(available) or 'none'}); e.g. pip install tensorboard")
    if args.label and args.labels:
        raise TrainingSetupError("Pass either --label (one task) or --labels (a multi-task model), not both")
    if args.labels and "all" in args.labels and len(args.labels) > 1:
        raise TrainingSetupError("--labels all stands alone (it means every task column the dataset has)")
    check_data_arguments(args)
    for name in ("epochs", "batch_size", "feature_batch_size"):
        if getattr(args, name) < 1:
            raise TrainingSetupError(f"--{name} must be at least 1")
    try:
        args.fit_settings()
    except ValueError as err:
        raise TrainingSetupError(f"--{err}") from None
    if args.folds < 0:
        raise TrainingSetupError("--folds must be >= 0")
    unknown = [g for g in args.cv_groups if g not in CV_GROUPS]
    if unknown or not args.cv_groups or len(set(args.cv_groups)) != len(args.cv_groups):
        raise TrainingSetupError("--cv_groups takes subject, source or subject,source; got "
                                 f"{','.join(args.cv_groups)}")
    return args
