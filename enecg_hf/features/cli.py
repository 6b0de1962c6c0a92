"""`python -m enecg_hf.features`: fill the feature store ahead of training.

    python -m enecg_hf.features --config tiny --data_format ludb --data_path path/to/ludb
    python -m enecg_hf.features --config hub_configs/offline_pretrained.json --dataset data/ptbxl --experts deepfade
    accelerate launch --num_processes 2 --cpu -m enecg_hf.features ...     # two CPU processes (gloo)
    torchrun --nproc_per_node 2 -m enecg_hf.features ...                   # the same without accelerate

It builds the model as `train.py` does (same config, `--experts` and `--seed`, so random-weight experts get the same
weights and the same fingerprints), reads the same data arguments, and computes every record's expert embeddings and
gate input that the store does not hold yet. `train.py` then finds them all. A killed run is completed by a rerun;
N processes compute exactly the batches one process would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..training.arguments import (
    TrainScriptArguments, check_data_arguments, comma_list, option, train_option,
)
from ..training.errors import TrainingSetupError
from .store import CACHE_ENV, build_features, feature_store_dir


logger = logging.getLogger(__name__)


@dataclass
class FeatureScriptArguments:
    """The options of `python -m enecg_hf.features`: train.py's data and model options (declared there, with their
    defaults and help), and the store's own."""

    config: str = train_option("config")
    dataset: list[str] | None = train_option("dataset")
    data_format: str | None = train_option("data_format")
    data_path: str | None = train_option("data_path")
    num_records: int | None = train_option("num_records")
    limit: int | None = train_option("limit")
    experts: list[str] | None = train_option("experts")
    expert_precision: str = train_option("expert_precision", help=(
        "precision of the experts' pass, as train.py --expert_precision (its values are stored apart from fp32 ones)"))
    seed: int = train_option("seed", help=(
        "seed of train.py's run: random-weight experts are initialised from it (and simulated records made with it)"))
    cache_dir: str | None = train_option("cache_dir")
    feature_batch_size: int = train_option("feature_batch_size")
    shard_size: int = field(default=256, metadata=option(
        "each process writes a shard file every N records of an expert (a killed run loses at most this many)..."))
    shard_seconds: float = field(default=60.0, metadata=option(
        "... or every N seconds of computing, whichever comes first (a killed run of a slow expert loses at most "
        "this much work)"))
    torch_threads: int = field(default=1, metadata=option(
        "torch threads per process on the CPU (parallelism comes from processes: accelerate launch --num_processes N)"))


def build_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(
        FeatureScriptArguments, prog="python -m enecg_hf.features",
        description="Compute the frozen experts' outputs of every record into the shared feature store, where "
        "train.py finds them (only missing values are computed). See docs/training.md, 'The feature store'.",
        formatter_class=argparse.HelpFormatter)


def parse_args(argv: Sequence[str] | None = None) -> FeatureScriptArguments:
    """The command's arguments (`sys.argv` by default). Argparse's own errors and `--help` exit as argparse does;
    arguments that cannot go together raise `TrainingSetupError`, which `main()` turns into an exit message."""
    parser = build_parser()
    (args, unknown) = parser.parse_args_into_dataclasses(list(sys.argv[1:] if argv is None else argv),
                                                         return_remaining_strings=True, look_for_args_file=False)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name in ("experts", "dataset"):  # "a,b" and "a b" alike, as train.py
        if getattr(args, name) is not None:
            setattr(args, name, [item for value in getattr(args, name) for item in comma_list(value)])
    check_data_arguments(args)
    for name in ("feature_batch_size", "shard_size", "torch_threads"):
        if getattr(args, name) < 1:
            raise TrainingSetupError(f"--{name} must be at least 1")
    if not args.shard_seconds > 0:
        raise TrainingSetupError("--shard_seconds must be positive")
    return args


def run(args: FeatureScriptArguments) -> dict[str, Any]:
    """Fill the store for `args`; returns `{"records", "seconds", "store", "columns": {column: counts}}`."""
    import torch
    from accelerate import PartialState

    from ..data.tasks import TASKS
    from ..training.configs import build_config, resolve_config_path
    from ..training.launch import setup_logging, use_cpu
    from ..training.records import check_signal_compatibility, load_training_dataset
    from ..training.run import build_model_with_experts

    start = time.perf_counter()
    state = PartialState(cpu=use_cpu())
    setup_logging(state)
    if state.device.type == "cpu":
        torch.set_num_threads(args.torch_threads)
    store_dir = feature_store_dir(args.cache_dir)
    logger.info("Arguments: %s; %d processes, %d torch threads each", json.dumps(dataclasses.asdict(args)),
                state.num_processes, torch.get_num_threads())

    # Data: --dataset, or built once into --cache_dir (as train.py does) or a work folder in the store removed after.
    work = [None]
    if args.data_format and not args.cache_dir and state.is_main_process:
        store_dir.mkdir(parents=True, exist_ok=True)
        work = [tempfile.mkdtemp(prefix=".work-", dir=store_dir)]
    if args.data_format and not args.cache_dir and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(work, from_process=0)
    try:
        dataset = load_training_dataset(args, state, Path(args.cache_dir or work[0] or store_dir))
        config_dict = json.loads(resolve_config_path(args.config).read_text())
        # The experts do not depend on the task (building the heads does not move the RNG that random-weight experts
        # are drawn from): any task gives the experts, and so the store columns, of every model train.py builds.
        config = build_config(TrainScriptArguments(experts=args.experts), TASKS["rr_interval"], config_dict)
        check_signal_compatibility(dataset, config)
        torch.manual_seed(args.seed)  # as train.py does before building its model
        model = build_model_with_experts(config).to(state.device)
        model.set_expert_precision(args.expert_precision)
        _, stats = build_features(dataset, model, state, store_dir, batch_size=args.feature_batch_size,
                                  shard_size=args.shard_size, shard_seconds=args.shard_seconds)
    finally:
        state.wait_for_everyone()
        if work[0] and state.is_main_process:
            shutil.rmtree(work[0], ignore_errors=True)
    summary = {"records": len(dataset), "seconds": round(time.perf_counter() - start, 1), "store": str(store_dir),
               "processes": state.num_processes, "columns": stats}
    if state.is_main_process:
        print(f"{len(dataset)} records, {state.num_processes} processes, {summary['seconds']} s; store {store_dir}")
        for column, s in stats.items():
            print(f"  {column:28s} {s['folder']:32s} found {s['found']:6d}  computed {s['computed']:6d}")
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    from ..training.launch import run_command

    return run_command(argv, parse_args, run, module="enecg_hf.features")
