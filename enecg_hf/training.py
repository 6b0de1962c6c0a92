"""Training EnECG with 🤗 Accelerate: subject-wise k-fold cross-validation, a final fit, and a Hub-ready output folder.

    python train.py                                   # the main job: simulated ECGs, tiny config, RR interval
    accelerate launch train.py --config hub_configs/tiny.json --dataset DIR --label sex --output_dir OUT
    accelerate launch --num_processes 2 --cpu train.py ...

What a run does, in order (see docs/training.md):

1. Load the dataset (`--dataset`, a folder written by `Dataset.save_to_disk` / `python -m enecg_hf.data`) or build
   it with `enecg_hf.data.build_dataset` (`--data_format/--data_path`). Check the label column, its values, the
   sampling rate and record length against the config, and the class coverage of the folds - before any training.
2. Cached expert features (default): the frozen experts run once per record in a `datasets` map, sharded across the
   processes and cached on disk under `OUT/cache` by fingerprint. Heads and gate then train on the cache.
3. For each of the `--folds` subject-wise folds: a FRESH model (same seed, so the same frozen experts) and a fresh
   optimiser, trained on the other folds and scored on this one with our local `evaluate` modules.
4. A final model is fitted on all records and saved with `save_pretrained`, with `metrics.json`,
   `training_args.json` and a model card (`README.md`); `--push_to_hub` uploads the folder.

Every epoch (and every `--save_steps`) `accelerator.save_state` writes a checkpoint of the trainable parameters and the
optimiser under `OUT/checkpoints/<stage>/checkpoint-<step>`, atomically; `--resume_from_checkpoint latest` continues a
killed run mid-epoch and reaches the same result as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .configuration_enecg import EnECGConfig
from .modeling_enecg import EnECGModel


logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
METRICS_DIR = PACKAGE_DIR / "metrics"

# Labels the data module produces, with their task. Other numeric/string columns work too (inferred, see
# `LabelSpec.infer`).
REGRESSION_LABELS = {"rr_interval": "ms", "age": "years"}
CLASS_NAMES = {"sex": ["female", "male"], "potassium_flag": ["normal", "abnormal"]}  # index = stored 0/1 value
CLASSIFICATION_LABELS = ("sex", "potassium_flag", "arrhythmia")
DATA_FORMATS = ("mimic-iv-ecg", "ptb-xl", "challenge", "ludb", "jsonl", "simulated")  # enecg_hf.data.FORMATS

# `python train.py` with no arguments: the embedded main job. Small enough for 2 CPU cores in under 3 minutes, long
# enough to learn RR intervals well beyond a mean predictor (heads train on cached features: epochs are cheap).
MAIN_JOB_ARGS = [
    "--config", "tiny",
    "--data_format", "simulated",
    "--num_records", "300",
    "--label", "rr_interval",
    "--epochs", "30",
    "--batch_size", "16",
    "--learning_rate", "3e-3",
    "--folds", "3",
    "--output_dir", "outputs/enecg-tiny-rr_interval",
]

# Arguments that do not change the result: a run may resume with different values.
_NON_RESULT_ARGS = {
    "resume_from_checkpoint", "stop_after_steps", "push_to_hub", "hub_model_id", "hub_private", "report_to",
    "cache_features", "cache_dir", "save_steps", "save_total_limit", "logging_steps", "output_dir",
}


# ------------------------------------------------------------------------------------------------ arguments
@dataclass
class TrainingArguments:
    """Every option of `train.py` (run `python train.py --help` for the descriptions)."""

    config: str = "tiny"
    dataset: str | None = None
    data_format: str | None = None
    data_path: str | None = None
    num_records: int | None = None
    limit: int | None = None
    label: str | None = None
    output_dir: str | None = None
    epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    folds: int = 3
    seed: int = 42
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    experts: list[str] | None = None
    gate: str | None = None
    adaptation: str | None = None
    cache_features: bool = True
    cache_dir: str | None = None
    feature_batch_size: int = 16
    save_steps: int = 0
    save_total_limit: int = 2
    resume_from_checkpoint: str | None = None
    report_to: list[str] = field(default_factory=list)
    logging_steps: int = 10
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    stop_after_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--batch_size", type=int, default=16, help="records per optimiser step, over all processes")
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument("--folds", type=int, default=3, help="subject-wise CV folds (0 or 1: no CV, final fit only)")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
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
    cache.add_argument("--save_steps", type=int, default=0, help="also checkpoint every N optimiser steps")
    cache.add_argument("--save_total_limit", type=int, default=2, help="checkpoints kept per stage")
    cache.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder under OUT/checkpoints")
    cache.add_argument("--stop_after_steps", type=int, help=argparse.SUPPRESS)  # debugging: die like a killed run

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


def parse_args(argv: Sequence[str] | None = None) -> TrainingArguments:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = list(MAIN_JOB_ARGS)
    namespace = build_parser().parse_args(argv)
    report_to = [r for r in (namespace.report_to or []) if r != "none"]
    args = TrainingArguments(**{**vars(namespace), "report_to": report_to})
    if args.dataset and args.data_format:
        raise SystemExit("Pass either --dataset or --data_format/--data_path, not both")
    if not args.dataset and not args.data_format:
        raise SystemExit("No data: pass --dataset DIR, or --data_format FORMAT [--data_path PATH] (e.g. simulated)")
    for name in ("epochs", "batch_size", "gradient_accumulation_steps", "feature_batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1")
    if args.folds < 0:
        raise SystemExit("--folds must be >= 0")
    if args.num_records is not None and args.data_format != "simulated":
        raise SystemExit("--num_records is for --data_format simulated; use --limit to read fewer real records")
    return args


# ------------------------------------------------------------------------------------------------ config and labels
def resolve_config_path(config: str) -> Path:
    """A config path, or the name of a file in the repository's `hub_configs/`."""
    for candidate in (Path(config), REPO_DIR / "hub_configs" / config, REPO_DIR / "hub_configs" / f"{config}.json"):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"Config {config!r} not found (a JSON path, or a name in {REPO_DIR / 'hub_configs'})")


@dataclass
class LabelSpec:
    """What is predicted and how dataset values become model labels."""

    name: str
    problem_type: str
    class_names: list[str] | None = None
    unit: str | None = None

    @property
    def is_regression(self) -> bool:
        return self.problem_type == "regression"

    @classmethod
    def infer(cls, name: str, dataset, config_dict: dict[str, Any]) -> "LabelSpec":
        if name not in dataset.column_names:
            raise SystemExit(
                f"Unknown label column {name!r}: the dataset has {dataset.column_names}. Known labels: "
                f"{sorted([*REGRESSION_LABELS, *CLASSIFICATION_LABELS])}"
            )
        if name in REGRESSION_LABELS:
            return cls(name, "regression", unit=REGRESSION_LABELS[name])
        config_classes = None
        if config_dict.get("label_name") == name and config_dict.get("id2label"):
            id2label = config_dict["id2label"]
            config_classes = [id2label[k] for k in sorted(id2label, key=int)]
        if name in CLASS_NAMES:
            return cls(name, "single_label_classification", config_classes or list(CLASS_NAMES[name]))
        if name == "arrhythmia":
            from .data import ARRHYTHMIA_CLASSES

            return cls(name, "single_label_classification", config_classes or list(ARRHYTHMIA_CLASSES))
        feature = dataset.features[name]
        dtype = getattr(feature, "dtype", None)
        if dtype in ("float16", "float32", "float64"):
            return cls(name, "regression", unit=config_dict.get("label_unit") if config_dict.get("label_name") == name else None)
        if dtype is None:
            raise SystemExit(f"Label column {name!r} is not a scalar column ({feature}); pick a scalar column")
        values = sorted({str(v) for v in dataset[name] if not _is_missing(v)})
        return cls(name, "single_label_classification", config_classes or values)

    def encode(self, value: Any) -> float | int | None:
        """Dataset value -> model label (float for regression, class index), None if missing."""
        if _is_missing(value):
            return None
        if self.is_regression:
            return float(value)
        if self.name in CLASS_NAMES and isinstance(value, (int, np.integer, bool)):
            if not 0 <= int(value) < len(self.class_names):
                raise SystemExit(f"Label {self.name!r}: value {value} is not a class index of {self.class_names}")
            return int(value)
        text = str(value)
        if text not in self.class_names:
            raise SystemExit(f"Label {self.name!r}: value {text!r} is not one of the classes {self.class_names}")
        return self.class_names.index(text)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def build_config(args: TrainingArguments, label: LabelSpec, config_dict: dict[str, Any]) -> EnECGConfig:
    """The config of every model of the run: the file's, with the label and the command-line overrides."""
    data = {k: v for k, v in config_dict.items() if k not in ("id2label", "label2id", "num_labels", "problem_type")}
    data.update(label_name=label.name, problem_type=label.problem_type)
    if label.is_regression:
        data.update(num_labels=1, label_unit=label.unit)
    else:
        data.update(id2label=dict(enumerate(label.class_names)), label_unit=None)
        data["label2id"] = {name: i for i, name in enumerate(label.class_names)}
    if args.experts:
        known = [e["name"] for e in data["experts"]]
        unknown = [name for name in args.experts if name not in known]
        if unknown:
            raise SystemExit(f"--experts: unknown expert(s) {unknown}; the config has {known}")
        data["experts"] = [e for e in data["experts"] if e["name"] in args.experts]
    if args.gate:
        data["gate_type"] = args.gate
    if args.adaptation:
        data["adaptation"] = args.adaptation
    try:
        return EnECGConfig(**data)
    except ValueError as err:
        raise SystemExit(f"Invalid config: {err}") from err


# ------------------------------------------------------------------------------------------------ data
def load_training_dataset(args: TrainingArguments, accelerator, cache_dir: Path):
    """The dataset of the run: loaded from `--dataset`, or built once (main process first) and cached on disk."""
    import datasets

    if args.dataset:
        path = Path(args.dataset)
        if not path.exists():
            raise SystemExit(f"--dataset {path} does not exist")
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise SystemExit(f"--dataset {path} is a DatasetDict without a 'train' split: {list(dataset)}")
            dataset = dataset["train"]
    else:
        key = _hash_json({"format": args.data_format, "path": args.data_path and str(Path(args.data_path).resolve()),
                          "num_records": args.num_records, "limit": args.limit, "seed": args.seed})
        folder = cache_dir / f"dataset-{args.data_format}-{key}"
        with accelerator.main_process_first():
            if not folder.exists():
                if not accelerator.is_main_process:
                    raise RuntimeError(f"{folder} should have been written by the main process")
                dataset = _build_dataset(args)
                tmp = folder.with_name(folder.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                dataset.save_to_disk(str(tmp))
                os.replace(tmp, folder)
            else:
                logger.info("Dataset: using the cached build %s", folder)
            dataset = datasets.load_from_disk(str(folder))  # memory-mapped, with a stable fingerprint
    if args.limit is not None and args.limit < len(dataset):
        dataset = dataset.select(range(args.limit))
    if len(dataset) == 0:
        raise SystemExit("The dataset has no records")
    return dataset


def _build_dataset(args: TrainingArguments):
    try:
        from .data import build_dataset
    except ImportError as err:
        raise SystemExit(f"--data_format needs enecg_hf.data.build_dataset, which failed to import: {err}") from err
    # For simulated data `limit` is the number of records to make; --num_records is the clearer spelling of it.
    limit = args.num_records if args.num_records is not None else args.limit
    logger.info("Building the %r dataset from %s (limit %s)", args.data_format, args.data_path, limit)
    start = time.perf_counter()
    try:
        dataset = build_dataset(args.data_format, args.data_path, limit=limit, seed=args.seed)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"--data_format {args.data_format} --data_path {args.data_path}: {err}") from err
    logger.info("Built %d records in %.1f s", len(dataset), time.perf_counter() - start)
    return dataset


def check_signal_compatibility(dataset, config: EnECGConfig) -> None:
    """Fail before training when records do not match what the config's model reads."""
    if "signal" not in dataset.column_names:
        raise SystemExit(f"The dataset has no 'signal' column (columns: {dataset.column_names})")
    expected = (len(config.lead_names), config.input_length)
    shape = getattr(dataset.features["signal"], "shape", None)
    if shape is None:
        shape = np.asarray(dataset[0]["signal"]).shape
    if tuple(shape) != expected:
        raise SystemExit(
            f"Records are {tuple(shape)} (leads x samples) but the config expects {expected} "
            f"({config.input_length} samples at {config.sampling_rate} Hz). Rebuild the dataset at "
            f"{config.sampling_rate} Hz / {config.input_length / config.sampling_rate:g} s, or use a config for this data."
        )
    if "sampling_rate" in dataset.column_names:
        rates = sorted({int(r) for r in dataset.unique("sampling_rate")})
        if rates != [config.sampling_rate]:
            raise SystemExit(
                f"The dataset's sampling rate is {rates} Hz but the config expects {config.sampling_rate} Hz; rebuild "
                f"the dataset at {config.sampling_rate} Hz or use a config for this data"
            )


def encode_labels(dataset, label: LabelSpec) -> tuple[list[int], np.ndarray]:
    """(indices of records with a label, their encoded labels)."""
    encoded = [label.encode(v) for v in dataset[label.name]]
    keep = [i for i, v in enumerate(encoded) if v is not None]
    if not keep:
        raise SystemExit(f"Label {label.name!r} has no values in this dataset ({len(dataset)} records, all missing)")
    dropped = len(encoded) - len(keep)
    if dropped:
        logger.warning("Label %r is missing for %d of %d records: they are left out", label.name, dropped, len(encoded))
    dtype = np.float32 if label.is_regression else np.int64
    return keep, np.asarray([encoded[i] for i in keep], dtype=dtype)


def make_folds(dataset, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from .data import subject_kfold

    subjects = len(set(dataset["subject_id"])) if "subject_id" in dataset.column_names else len(dataset)
    if k > subjects:
        raise SystemExit(f"--folds {k} needs at least {k} subjects; the dataset has {subjects}")
    folds = [(np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64)) for tr, te in subject_kfold(dataset, k, seed)]
    for i, (train_idx, test_idx) in enumerate(folds):
        if len(train_idx) == 0 or len(test_idx) == 0:
            raise SystemExit(f"Fold {i + 1} has an empty train or test split ({len(train_idx)}/{len(test_idx)} records)")
    return folds


def check_class_coverage(labels: np.ndarray, label: LabelSpec, folds) -> list[str]:
    """Warnings for classes that cannot be learned or scored fairly (returned, and logged)."""
    messages = []
    present = sorted(set(labels.tolist()))
    if len(present) < 2:
        raise SystemExit(
            f"Label {label.name!r} has a single class in this dataset ({label.class_names[present[0]]!r}): "
            "nothing to classify"
        )
    absent = [label.class_names[i] for i in range(len(label.class_names)) if i not in present]
    if absent:
        messages.append(f"classes never seen in the data (the model will not predict them): {absent}")
    for i, (train_idx, test_idx) in enumerate(folds):
        only_test = sorted(set(labels[test_idx].tolist()) - set(labels[train_idx].tolist()))
        if only_test:
            names = [label.class_names[c] for c in only_test]
            messages.append(f"fold {i + 1}: classes {names} appear only in the test fold (never trained on)")
    for message in messages:
        logger.warning("Label %r: %s", label.name, message)
    return messages


# ------------------------------------------------------------------------------------------------ feature cache
def embedding_column(expert_name: str) -> str:
    return f"embedding_{expert_name}"


def expert_fingerprint(model: EnECGModel) -> str:
    """Hash of everything the frozen part computes with: expert weights and the config fields the experts read."""
    config = model.config
    hasher = hashlib.sha256()
    hasher.update(json.dumps({
        "experts": config.experts, "lead_names": config.lead_names, "normalization": config.normalization,
        "gate_leads": config.gate_leads, "gate_input_length": config.gate_input_length,
        "input_length": config.input_length, "sampling_rate": config.sampling_rate,
    }, sort_keys=True).encode())
    for key, tensor in sorted(model.experts.state_dict().items()):
        hasher.update(key.encode())
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


@torch.no_grad()
def compute_features(model: EnECGModel, input_values: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The frozen part, without gradients and without touching the global RNG (so dropout masks downstream are the
    same whether features come from here or from the cache)."""
    with torch.random.fork_rng(devices=[]):
        features = model.compute_features(input_values)
    return tuple(e.float() for e in features.expert_embeddings), features.gate_inputs.float()


def build_feature_cache(dataset, model: EnECGModel, accelerator, cache_dir: Path, batch_size: int):
    """Expert embeddings and gate inputs of every record, as a dataset in the same order.

    Each process computes one contiguous shard with a `datasets` map written to
    `cache_dir/features-<fingerprint>-<i>of<n>.arrow`; after a barrier every process loads all shards (cache hits).
    The fingerprint covers the records (dataset fingerprint) and the frozen part (`expert_fingerprint`), so a rerun
    with the same data and experts reuses the files, and anything else recomputes."""
    import datasets

    experts = expert_fingerprint(model)
    fingerprint = _hash_json({"data": dataset._fingerprint, "experts": experts, "n": len(dataset)})
    n = accelerator.num_processes
    names = model.expert_names
    feature_spec = datasets.Features({
        **{embedding_column(name): datasets.Sequence(datasets.Value("float32"), length=model.experts[name].embedding_dim)
           for name in names},
        "gate_inputs": datasets.Sequence(datasets.Value("float32"),
                                         length=len(model.config.gate_leads) * model.config.gate_input_length),
    })

    def featurize(batch):
        embeddings, gate_inputs = compute_features(model, torch.as_tensor(np.asarray(batch["signal"], dtype=np.float32)))
        out = {embedding_column(name): e.numpy() for name, e in zip(names, embeddings)}
        out["gate_inputs"] = gate_inputs.numpy()
        return out

    source = dataset.select_columns(["signal"]).with_format("numpy")
    cache_dir.mkdir(parents=True, exist_ok=True)

    def shard_map(index: int, compute: bool):
        file = cache_dir / f"features-{fingerprint}-{index}of{n}.arrow"
        if not compute and not file.exists():
            raise RuntimeError(f"Feature shard {file} is missing after the barrier")
        shard = source.shard(num_shards=n, index=index, contiguous=True)
        return shard.map(
            featurize, batched=True, batch_size=batch_size, remove_columns=["signal"], features=feature_spec,
            cache_file_name=str(file), new_fingerprint=f"{fingerprint}-{index}of{n}", load_from_cache_file=True,
            desc=f"Expert features (shard {index + 1}/{n})",
        )

    start = time.perf_counter()
    model.eval()
    shard_map(accelerator.process_index, compute=True)
    accelerator.wait_for_everyone()
    shards = [shard_map(i, compute=False) for i in range(n)]
    features = datasets.concatenate_datasets(shards) if n > 1 else shards[0]
    if len(features) != len(dataset):
        raise RuntimeError(f"Feature cache has {len(features)} rows for {len(dataset)} records")
    logger.info("Expert features of %d records ready in %.1f s (cache %s)", len(features),
                time.perf_counter() - start, cache_dir)
    return features.with_format(None), experts


# ------------------------------------------------------------------------------------------------ training loop
class EpochShuffleSampler(Sampler[int]):
    """A permutation of the records drawn from a seeded `torch.Generator` per (seed, epoch): the same on every process
    (accelerate shards the batches) and reproducible after a resume. Set `.epoch` before iterating.

    (Deliberately no `set_epoch` method: accelerate would set it to its own iteration counter.)"""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class TrainingProgress:
    """Where a stage is; checkpointed with `accelerator.register_for_checkpointing`."""

    def __init__(self):
        self.reset("")

    def reset(self, stage: str) -> None:
        self.stage, self.epoch, self.step_in_epoch, self.global_step = stage, 0, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage, self.epoch = state["stage"], state["epoch"]
        self.step_in_epoch, self.global_step = state["step_in_epoch"], state["global_step"]


def trainable_parameter_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _install_checkpoint_hooks(accelerator) -> None:
    """`save_state` writes only trainable parameters (LoRA adapters, or heads and gate): the frozen experts are the
    same in every checkpoint and are never written. Loading checks the keys exactly."""
    from safetensors.torch import load_file

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            keep = trainable_parameter_names(accelerator.unwrap_model(model))
            weights[i] = {k: v for k, v in weights[i].items() if k.removeprefix("module.") in keep}

    def load_hook(models, input_dir):
        for i, model in enumerate(list(models)):
            inner = accelerator.unwrap_model(model)
            file = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = {k.removeprefix("module."): v for k, v in load_file(str(file)).items()}
            expected = trainable_parameter_names(inner)
            if set(state) != expected:
                raise RuntimeError(
                    f"Checkpoint {input_dir} does not match the model: missing {sorted(expected - set(state))[:5]}, "
                    f"unexpected {sorted(set(state) - expected)[:5]}"
                )
            inner.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate must not load them again (it would expect full state dicts)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class CheckpointManager:
    """`OUT/checkpoints/<stage>/checkpoint-<global step>` folders, written atomically (temporary folder + rename),
    plus `result.json` per finished CV fold and `run.json` with the arguments that determine the result."""

    def __init__(self, root: Path, accelerator, total_limit: int):
        self.root = root
        self.accelerator = accelerator
        self.total_limit = total_limit

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def checkpoints(self, stage: str) -> list[Path]:
        folder = self.stage_dir(stage)
        if not folder.is_dir():
            return []
        found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save(self, stage: str, global_step: int) -> Path:
        accelerator = self.accelerator
        final = self.stage_dir(stage) / f"checkpoint-{global_step}"
        tmp = self.stage_dir(stage) / f".tmp-checkpoint-{global_step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every process writes its RNG state into the same folder
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints(stage)[: -self.total_limit] if self.total_limit > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def write_json(self, path: Path, data: Any) -> None:
        if self.accelerator.is_main_process:
            write_json_atomic(path, data)

    def result(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_dir(stage) / "result.json"
        return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str  # "fold-1", ..., "final"
    index: int
    train_idx: np.ndarray
    eval_idx: np.ndarray


class Trainer:
    """Runs the stages of one training run on a shared `Accelerator` (see the module docstring)."""

    def __init__(self, args: TrainingArguments, accelerator, config: EnECGConfig, label: LabelSpec,
                 dataset, keep: Sequence[int], labels: np.ndarray, features, checkpoints: CheckpointManager,
                 resume: Path | None,
                 expert_fingerprint: str | None = None):
        self.args = args
        self.accelerator = accelerator
        self.config = config
        self.label = label
        self.labels = labels  # labels of the labelled records; stage indices index them
        self.keep = np.asarray(keep, dtype=np.int64)  # dataset row of each labelled record
        self.features = features  # cached features of every dataset row, or None
        # Inputs and labels in ONE table, so one loader yields them together. Rows without a label get a dummy value
        # and are never selected.
        import datasets

        full_labels = np.zeros(len(dataset), dtype=labels.dtype)
        full_labels[self.keep] = labels
        source = features if features is not None else dataset.select_columns(["signal"])
        self.table = source.add_column("labels", full_labels.tolist(), feature=datasets.Value(
            "float32" if label.is_regression else "int64"))
        self.expert_fingerprint = expert_fingerprint  # of the experts the cache was computed with
        self.checkpoints = checkpoints
        self.resume = resume
        self.progress = TrainingProgress()
        self.steps_run = 0  # optimiser-loop iterations in this process run (for --stop_after_steps)
        self.models_built = 0
        accelerator.register_for_checkpointing(self.progress)

    # ---------------------------------------------------------------- pieces
    def stage_config(self, train_idx: np.ndarray) -> EnECGConfig:
        config = EnECGConfig.from_dict(self.config.to_dict())
        if self.label.is_regression:
            values = self.labels[train_idx].astype(np.float64)
            std = float(values.std())
            config.target_mean = float(values.mean())
            config.target_std = std if std > 1e-8 else 1.0
        return config

    def build_model(self, config: EnECGConfig) -> EnECGModel:
        torch.manual_seed(self.args.seed)  # same frozen experts (the feature cache's) and same initial heads each stage
        modeling_logger = logging.getLogger("enecg_hf.modeling_enecg")
        level = modeling_logger.level
        if self.models_built:
            modeling_logger.setLevel(logging.ERROR)  # the random-weight warnings were logged for the first model
        try:
            model = EnECGModel.from_expert_sources(config)
        finally:
            modeling_logger.setLevel(level)
        self.models_built += 1
        if self.expert_fingerprint is not None and expert_fingerprint(model) != self.expert_fingerprint:
            raise RuntimeError("The frozen experts of this stage differ from those the feature cache was computed with "
                               "(non-deterministic expert construction?); rerun with --no-cache_features")
        if config.gate_type == "uniform":
            for param in model.gate.parameters():
                param.requires_grad_(False)  # unused: nothing to train (and DDP would wait for its gradients)
        return model

    def stage_dataset(self, indices: np.ndarray):
        # An in-memory index mapping into the labelled table (no cache files, no copies of the signals).
        return self.table.select(self.keep[indices], keep_in_memory=True).with_format("torch")

    def model_inputs(self, model, batch) -> dict[str, Any]:
        if self.features is not None:
            embeddings = tuple(batch[embedding_column(name)] for name in self.config.expert_names)
            gate_inputs = batch["gate_inputs"]
        else:  # the research code's way: the frozen experts run on every batch
            embeddings, gate_inputs = compute_features(self.accelerator.unwrap_model(model), batch["signal"])
        return {"expert_embeddings": embeddings, "gate_inputs": gate_inputs}

    def step_seed(self, stage_index: int, global_step: int) -> int:
        """Seed of the global RNG (LoRA/head dropout) for one step: a resumed run draws the same masks."""
        return (self.args.seed * 1_000_003 + stage_index * 10_007 + global_step) * 64 + self.accelerator.process_index

    # ---------------------------------------------------------------- one stage
    def run_stage(self, stage: Stage) -> tuple[EnECGModel, dict[str, np.ndarray] | None]:
        args, accelerator = self.args, self.accelerator
        accelerator.free_memory()  # forget the previous stage's model, optimiser and loaders (and reset the step)
        config = self.stage_config(stage.train_idx)
        model = self.build_model(config)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay
        )
        sampler = EpochShuffleSampler(len(stage.train_idx), seed=args.seed + 1_000 * stage.index)
        train_loader = DataLoader(self.stage_dataset(stage.train_idx), batch_size=args.batch_size, sampler=sampler)
        eval_loader = (
            DataLoader(self.stage_dataset(stage.eval_idx), batch_size=args.batch_size, shuffle=False)
            if len(stage.eval_idx) else None
        )
        if eval_loader is not None:
            model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
        else:
            model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)

        self.progress.reset(stage.name)
        if self.resume is not None and self.resume.parent.name == stage.name:
            accelerator.load_state(str(self.resume))
            if self.progress.stage != stage.name:
                raise RuntimeError(f"{self.resume} holds stage {self.progress.stage!r}, not {stage.name!r}")
            logger.info("%s: resumed from %s (epoch %d, step %d of the epoch)", stage.name, self.resume,
                        self.progress.epoch + 1, self.progress.step_in_epoch)
            self.resume = None

        steps_per_epoch = len(train_loader)
        progress_bar = _tqdm(total=args.epochs * steps_per_epoch, desc=stage.name,
                             initial=self.progress.epoch * steps_per_epoch + self.progress.step_in_epoch,
                             disable=not accelerator.is_local_main_process)
        model.train()
        while self.progress.epoch < args.epochs:
            sampler.epoch = self.progress.epoch
            loader = train_loader
            if self.progress.step_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, self.progress.step_in_epoch)
            for batch in loader:
                torch.manual_seed(self.step_seed(stage.index, self.progress.global_step))
                with accelerator.accumulate(model):
                    output = model(**self.model_inputs(model, batch), labels=batch["labels"])
                    accelerator.backward(output.loss)
                    optimizer.step()
                    optimizer.zero_grad()
                self.progress.step_in_epoch += 1
                self.progress.global_step += 1
                self.steps_run += 1
                progress_bar.update(1)
                if self.progress.global_step % max(args.logging_steps, 1) == 0:
                    loss = output.loss.detach().item()
                    progress_bar.set_postfix(loss=f"{loss:.4f}")
                    accelerator.log({f"{stage.name}/train_loss": loss, "epoch": self.progress.epoch},
                                    step=self.progress.global_step)
                if args.stop_after_steps is not None and self.steps_run >= args.stop_after_steps:
                    # Debugging aid for the resume tests: die like a killed process (no clean-up, no checkpoint).
                    accelerator.wait_for_everyone()
                    logger.warning("--stop_after_steps %d reached: stopping abruptly", args.stop_after_steps)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(75)
                end_of_epoch = self.progress.step_in_epoch == steps_per_epoch
                if (args.save_steps and accelerator.sync_gradients and not end_of_epoch
                        and self.progress.global_step % args.save_steps == 0):
                    self.checkpoints.save(stage.name, self.progress.global_step)
            self.progress.epoch += 1
            self.progress.step_in_epoch = 0
            self.checkpoints.save(stage.name, self.progress.global_step)
        progress_bar.close()

        predictions = self.predict(model, eval_loader) if eval_loader is not None else None
        model = accelerator.unwrap_model(model)
        model.eval()
        return model, predictions

    @torch.no_grad()
    def predict(self, model, loader) -> dict[str, np.ndarray]:
        """Predictions of `model` over `loader`, gathered from all processes in dataset order."""
        model.eval()
        logits, labels = [], []
        for batch in loader:
            output = model(**self.model_inputs(model, batch))
            gathered_logits, gathered_labels = self.accelerator.gather_for_metrics((output.logits, batch["labels"]))
            logits.append(gathered_logits.float().cpu())
            labels.append(gathered_labels.cpu())
        model.train()
        return {"logits": torch.cat(logits).numpy(), "labels": torch.cat(labels).numpy()}


def _tqdm(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


# ------------------------------------------------------------------------------------------------ metrics
def load_metric(problem_type: str):
    """Our local `evaluate` module for the task (Hub metrics need the network)."""
    import evaluate

    name = "regression_metrics" if problem_type == "regression" else "classification_metrics"
    return evaluate.load(str(METRICS_DIR / name))


def score(predictions: dict[str, np.ndarray], label: LabelSpec, metric) -> dict[str, float]:
    logits, references = predictions["logits"], predictions["labels"]
    if label.is_regression:
        return metric.compute(predictions=logits[:, 0].astype(np.float64).tolist(),
                              references=references.astype(np.float64).tolist())
    probabilities = torch.softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    return metric.compute(predictions=logits.argmax(-1).tolist(), references=references.astype(np.int64).tolist(),
                          prediction_scores=probabilities.tolist(), labels=list(range(len(label.class_names))))


def baseline_predictions(train_labels: np.ndarray, eval_labels: np.ndarray, label: LabelSpec) -> dict[str, np.ndarray]:
    """The trivial predictor fitted on the training split: its mean (regression) or its majority class."""
    n = len(eval_labels)
    if label.is_regression:
        logits = np.full((n, 1), float(train_labels.mean()), dtype=np.float64)
    else:
        counts = np.bincount(train_labels.astype(np.int64), minlength=len(label.class_names)).astype(np.float64)
        logits = np.tile(np.log((counts + 1e-3) / (counts + 1e-3).sum()), (n, 1))
    return {"logits": logits, "labels": eval_labels}


def summarize(fold_metrics: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1) over folds of every metric."""
    summary = {}
    for key in fold_metrics[0]:
        values = np.asarray([m[key] for m in fold_metrics], dtype=np.float64)
        summary[key] = {"mean": float(np.mean(values)),
                        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return summary



# ------------------------------------------------------------------------------------------------ processes
def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def use_cpu() -> bool:
    """Run on the CPU: asked for (`accelerate launch --cpu` sets ACCELERATE_USE_CPU), or several processes on a machine
    without CUDA. `Accelerator(cpu=True)` is what makes accelerate pick its MULTI_CPU (gloo) mode for the latter."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return _truthy(os.environ.get("ACCELERATE_USE_CPU")) or (world_size > 1 and not torch.cuda.is_available())


def requested_cpu_processes() -> int | None:
    """The N of `accelerate launch --cpu --num_processes N` when accelerate started only this one process.

    accelerate's plain launcher starts a single process for `--cpu` whatever `--num_processes` says (it expects mpirun
    for multi-CPU runs; huggingface/accelerate#2741). It still exports MASTER_ADDR/MASTER_PORT when N > 1, so a lone
    process with those set and no rank variables was asked for N processes: N is read from the launcher's command
    line, or from the accelerate config file it used."""
    if not _truthy(os.environ.get("ACCELERATE_USE_CPU")) or "MASTER_ADDR" not in os.environ:
        return None
    if any(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        return None
    try:
        launcher = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        launcher = []
    for i, arg in enumerate(launcher):
        if arg == "--num_processes" and i + 1 < len(launcher) and launcher[i + 1].isdigit():
            return int(launcher[i + 1])
        if arg.startswith("--num_processes="):
            return int(arg.split("=", 1)[1])
    try:
        from accelerate.commands.config import default_config_file, load_config_from_file

        config_file = next((launcher[i + 1] for i, a in enumerate(launcher[:-1]) if a == "--config_file"), None)
        if config_file or Path(default_config_file).is_file():
            return int(load_config_from_file(config_file).num_processes or 1)
    except Exception:  # no readable config: fall through to the warning below
        pass
    logger.warning("accelerate launch --cpu started one process; could not tell how many were asked for")
    return None


def relaunch_on_cpu(num_processes: int, argv: Sequence[str]) -> None:
    """Start `num_processes` copies of this script with torch's elastic launcher (what `torchrun` runs): gloo on
    the CPU, rendezvous at the MASTER_ADDR/MASTER_PORT accelerate exported. Exits with the launcher's status."""
    from torch.distributed.run import main as torchrun

    script = sys.argv[0]
    print(f"train.py: accelerate launch --cpu runs one process (huggingface/accelerate#2741); starting "
          f"{num_processes} CPU processes with torch.distributed.run", file=sys.stderr, flush=True)
    torchrun(["--nproc_per_node", str(num_processes), "--master_addr", os.environ["MASTER_ADDR"],
              "--master_port", os.environ.get("MASTER_PORT", "29500"), script, *argv])
    sys.exit(0)


# ------------------------------------------------------------------------------------------------ run
def _setup_logging(accelerator) -> None:
    import datasets
    import transformers

    level = logging.INFO if accelerator.is_main_process else logging.ERROR
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING if accelerator.is_main_process else logging.ERROR, force=True)
    logging.getLogger("enecg_hf").setLevel(level)
    if accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:  # main-process-only logging
        datasets.utils.logging.set_verbosity_error()
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def _resolve_resume(args: TrainingArguments, checkpoint_root: Path, stages: list[str]) -> tuple[Path | None, int]:
    """(checkpoint folder to load, index of the first stage to run)."""
    if not args.resume_from_checkpoint:
        return None, 0
    if not checkpoint_root.is_dir():
        raise SystemExit(f"--resume_from_checkpoint: no checkpoints under {checkpoint_root}")
    manager = CheckpointManager(checkpoint_root, None, 0)
    if args.resume_from_checkpoint == "latest":
        for index, stage in enumerate(stages):
            if stage != "final" and manager.result(stage) is not None:
                continue
            found = manager.checkpoints(stage)
            return (found[-1] if found else None), index
        return None, len(stages)
    path = Path(args.resume_from_checkpoint).resolve()
    if not (path.is_dir() and path.parent.parent == checkpoint_root.resolve() and path.parent.name in stages):
        raise SystemExit(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: not a checkpoint of this run; expected a folder "
            f"{checkpoint_root}/<{'|'.join(stages)}>/checkpoint-<step>, or 'latest'"
        )
    index = stages.index(path.parent.name)
    missing = [s for s in stages[:index] if manager.result(s) is None]
    if missing:
        raise SystemExit(f"--resume_from_checkpoint {path}: earlier stages {missing} never finished")
    return path, index


def run(args: TrainingArguments) -> dict[str, Any]:
    """Run a whole training job (see the module docstring); returns the content of `metrics.json`."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    start_time = time.perf_counter()
    config_path = resolve_config_path(args.config)
    config_dict = json.loads(config_path.read_text())
    label_name = args.label or config_dict.get("label_name")
    if not label_name:
        raise SystemExit("--label is required (the config names no label_name)")
    args.label = label_name
    if args.output_dir is None:
        args.output_dir = str(Path("outputs") / f"enecg-{config_path.stem}-{label_name}")
    output_dir = Path(args.output_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "cache"
    checkpoint_root = output_dir / "checkpoints"

    # Split every batch across processes, so N processes take the same optimiser steps as one (same metrics, up to
    # data-order noise); needs batch_size divisible by the number of processes.
    cpu = use_cpu()
    num_processes = PartialState(cpu=cpu).num_processes
    split_batches = num_processes > 1 and args.batch_size % num_processes == 0
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(split_batches=split_batches, even_batches=True),
        step_scheduler_with_optimizer=False,
    )
    _setup_logging(accelerator)
    if num_processes > 1 and not split_batches:
        logger.warning("--batch_size %d is not divisible by %d processes: each process takes %d records per step "
                       "(an effective batch of %d)", args.batch_size, num_processes, args.batch_size,
                       args.batch_size * num_processes)
    _install_checkpoint_hooks(accelerator)
    logger.info("Arguments: %s", json.dumps(args.to_dict()))

    # ---- data and checks, before any training time is spent
    dataset = load_training_dataset(args, accelerator, cache_dir)
    label = LabelSpec.infer(label_name, dataset, config_dict)
    config = build_config(args, label, config_dict)
    check_signal_compatibility(dataset, config)
    keep, labels = encode_labels(dataset, label)
    records = dataset.select(keep, keep_in_memory=True) if len(keep) < len(dataset) else dataset
    folds = make_folds(records, args.folds, args.seed) if args.folds >= 2 else []
    warnings_ = [] if label.is_regression else check_class_coverage(labels, label, folds)
    stages = [Stage(f"fold-{i + 1}", i, tr, te) for i, (tr, te) in enumerate(folds)]
    stages.append(Stage("final", len(folds), np.arange(len(records)), np.arange(len(records))))
    logger.info("Label %r (%s), %d records, %d folds, experts %s", label.name, label.problem_type, len(records),
                len(folds), config.expert_names)

    # ---- checkpoints: a fresh run starts clean; a resumed one must have the same result-determining arguments
    run_info = {k: v for k, v in args.to_dict().items() if k not in _NON_RESULT_ARGS}
    resume, first_stage = _resolve_resume(args, checkpoint_root, [s.name for s in stages])
    if accelerator.is_main_process:
        if args.resume_from_checkpoint:
            saved = json.loads((checkpoint_root / "run.json").read_text()) if (checkpoint_root / "run.json").is_file() else None
            if saved is not None and saved != json.loads(json.dumps(run_info, default=str)):
                changed = sorted(k for k in run_info if saved.get(k) != json.loads(json.dumps(run_info[k], default=str)))
                raise SystemExit(f"--resume_from_checkpoint: arguments differ from the checkpointed run: {changed}")
        else:
            shutil.rmtree(checkpoint_root, ignore_errors=True)
        write_json_atomic(checkpoint_root / "run.json", run_info)
    accelerator.wait_for_everyone()
    manager = CheckpointManager(checkpoint_root, accelerator, args.save_total_limit)

    # ---- cached features
    features = None
    cached_experts = None
    if args.cache_features:
        torch.manual_seed(args.seed)
        feature_model = EnECGModel.from_expert_sources(config)
        features, cached_experts = build_feature_cache(dataset, feature_model, accelerator, cache_dir,
                                                          args.feature_batch_size)
        del feature_model
    if args.report_to:
        accelerator.init_trackers("enecg", config={k: str(v) for k, v in args.to_dict().items()})

    # ---- stages: CV folds, then the final fit
    trainer = Trainer(args, accelerator, config, label, dataset, keep, labels, features, manager, resume,
                      cached_experts)
    metric = load_metric(label.problem_type) if accelerator.is_main_process else None
    fold_results = []
    final_model = None
    for stage in stages:
        if stage.index < first_stage:
            fold_results.append(manager.result(stage.name))
            logger.info("%s: finished in an earlier run, result reused", stage.name)
            continue
        model, predictions = trainer.run_stage(stage)
        if stage.name == "final":
            final_model = model
            final_predictions = predictions
            continue
        if accelerator.is_main_process:
            fold_metrics = score(predictions, label, metric)
            baseline = score(baseline_predictions(labels[stage.train_idx], labels[stage.eval_idx], label), label, metric)
            result = {"fold": stage.index + 1, "train_records": int(len(stage.train_idx)),
                      "test_records": int(len(stage.eval_idx)), "metrics": fold_metrics, "baseline": baseline}
            manager.write_json(manager.stage_dir(stage.name) / "result.json", result)
            logger.info("%s: %s (baseline %s)", stage.name, _format_metrics(fold_metrics), _format_metrics(baseline))
            accelerator.log({f"{stage.name}/{k}": v for k, v in fold_metrics.items()})
            fold_results.append(result)
        accelerator.wait_for_everyone()
    if final_model is None:
        raise RuntimeError("The final stage did not run")

    # ---- output folder (main process), then the Hub
    metrics = None
    if accelerator.is_main_process:
        final_metrics = score(final_predictions, label, metric)
        metrics = {
            "label": label.name,
            "problem_type": label.problem_type,
            "unit": label.unit,
            "classes": label.class_names,
            "records": len(records),
            "folds": fold_results,
            "cv": summarize([r["metrics"] for r in fold_results]) if fold_results else {},
            "cv_baseline": summarize([r["baseline"] for r in fold_results]) if fold_results else {},
            "final": {"metrics": final_metrics, "note": "the saved model scored on all its training records (in-sample)"},
            "warnings": warnings_,
            "num_processes": accelerator.num_processes,
            "cache_features": args.cache_features,
            "train_seconds": round(time.perf_counter() - start_time, 1),
        }
        save_output_folder(final_model, output_dir, args, metrics, records)
        logger.info("Saved the model folder %s", output_dir.resolve())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        print_summary(metrics, output_dir)
        if args.push_to_hub:
            push_folder(output_dir, args)
    return metrics


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def save_output_folder(model: EnECGModel, output_dir: Path, args: TrainingArguments, metrics: dict[str, Any],
                       records) -> None:
    """The Hub-ready folder: model (merged safetensors + code + adapter/), metrics, arguments, model card, serving."""
    from .model_card import random_weight_experts, render_model_card

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    write_json_atomic(output_dir / "metrics.json", metrics)
    write_json_atomic(output_dir / "training_args.json", {**args.to_dict(), "enecg_hf_version": _version()})
    sources = sorted({str(s) for s in records.unique("source")}) if "source" in records.column_names else []
    card = render_model_card(model, metrics, args.to_dict(), dataset_sources=sources,
                             random_experts=random_weight_experts(model),
                             model_id=args.hub_model_id or output_dir.name)
    tmp = output_dir / ".README.md.tmp"
    tmp.write_text(card)
    os.replace(tmp, output_dir / "README.md")
    try:
        from .serving_export import export_serving_files
    except ImportError as err:
        if "serving_export" not in str(err):
            raise
        logger.info("Serving files not exported: enecg_hf.serving_export is not available in this version")
    else:
        export_serving_files(model, str(output_dir))
        logger.info("Serving files (pipeline, handler.py, requirements) exported to %s", output_dir)


def _version() -> str:
    from . import __version__

    return __version__


# Work folders inside OUT that must never be uploaded.
HUB_IGNORE_PATTERNS = ["checkpoints/*", "checkpoints/**", "cache/*", "cache/**", "logs/*", "logs/**", ".*"]


def push_folder(output_dir: Path, args: TrainingArguments) -> str:
    """Upload the finished folder (without checkpoints, cache and logs). Fails with a clear message, after the local
    folder is complete, when the Hub cannot be reached."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or output_dir.name
    try:
        url = create_repo(repo_id, private=args.hub_private, exist_ok=True)
        upload_folder(repo_id=url.repo_id, folder_path=str(output_dir), ignore_patterns=HUB_IGNORE_PATTERNS,
                      commit_message="Upload EnECG model trained with enecg_hf")
    except Exception as err:  # network, auth, offline mode: all end the same way for the user
        raise SystemExit(
            f"push_to_hub failed for {repo_id!r}: {type(err).__name__}: {err}\n"
            f"The local folder {output_dir.resolve()} is complete; push it later with\n"
            f"  hf upload {repo_id} {output_dir} --exclude 'checkpoints/*' --exclude 'cache/*' --exclude 'logs/*'"
        ) from None
    logger.info("Pushed %s to https://huggingface.co/%s", output_dir, url.repo_id)
    return url.repo_id


def print_summary(metrics: dict[str, Any], output_dir: Path) -> None:
    lines = [f"EnECG training: {metrics['label']} ({metrics['problem_type']}), {metrics['records']} records, "
             f"{len(metrics['folds'])}-fold CV, {metrics['train_seconds']} s"]
    unit = f" {metrics['unit']}" if metrics.get("unit") else ""
    for name, summary in metrics["cv"].items():
        baseline = metrics["cv_baseline"].get(name)
        extra = f"   (baseline {baseline['mean']:.4g} ± {baseline['std']:.3g})" if baseline else ""
        lines.append(f"  CV {name:>9}: {summary['mean']:.4g} ± {summary['std']:.3g}{extra}")
    lines.append("  final (in-sample): " + _format_metrics(metrics["final"]["metrics"]) + unit)
    lines.append(f"  model folder: {output_dir.resolve()}")
    print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)  # errors in the arguments show before any process is started
    processes = requested_cpu_processes()
    if processes and processes > 1:
        relaunch_on_cpu(processes, argv)
    return run(args)


__all__ = ["TrainingArguments", "MAIN_JOB_ARGS", "build_parser", "parse_args", "run", "main", "load_metric",
           "compute_features", "build_feature_cache", "EpochShuffleSampler"]
