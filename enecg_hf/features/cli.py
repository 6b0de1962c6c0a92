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

from ..training.arguments import DATA_FORMATS, TrainScriptArguments, comma_list, fit_setting, option
from .store import CACHE_ENV, build_features, feature_store_dir


logger = logging.getLogger(__name__)


@dataclass
class FeatureScriptArguments:
    """The options of `python -m enecg_hf.features` (the data and model options mean what they mean in train.py)."""

    config: str = field(default="tiny", metadata=option(
        "EnECG config JSON, or the name of one in hub_configs/ (tiny)"))
    dataset: list[str] | None = field(default=None, metadata=option(
        "dataset folder(s) written by `Dataset.save_to_disk` / `python -m enecg_hf.data` (several, as train.py "
        "takes them)", metavar="DATASET"))
    data_format: str | None = field(default=None, metadata=option(
        "build the dataset on the fly with enecg_hf.data.build_dataset", choices=DATA_FORMATS))
    data_path: str | None = field(default=None, metadata=option("input of --data_format (a folder of records)"))
    num_records: int | None = field(default=None, metadata=option("records to simulate (--data_format simulated)"))
    limit: int | None = field(default=None, metadata=option("use only the first N records"))
    experts: list[str] | None = field(default=None, metadata=option(
        "comma-separated subset of the config's experts (default: all)", metavar="EXPERTS"))
    expert_precision: str = field(default="fp32", metadata=option(
        "precision of the experts' pass, as train.py --expert_precision (its values are stored apart from fp32 ones)",
        choices=["fp32", "bf16", "fp16", "int8"]))
    seed: int = fit_setting("seed", help=(
        "seed of train.py's run: random-weight experts are initialised from it (and simulated records made with it)"))
    cache_dir: str | None = field(default=None, metadata=option(
        f"cache folder; the store is CACHE_DIR/features (default ${CACHE_ENV}/features, else ~/.cache/enecg_hf/features)"))
    feature_batch_size: int = field(default=16, metadata=option("records per forward pass of the experts"))
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
    parser = build_parser()
    (args, unknown) = parser.parse_args_into_dataclasses(list(sys.argv[1:] if argv is None else argv),
                                                         return_remaining_strings=True, look_for_args_file=False)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name in ("experts", "dataset"):  # "a,b" and "a b" alike, as train.py
        if getattr(args, name) is not None:
            setattr(args, name, [item for value in getattr(args, name) for item in comma_list(value)])
    if args.dataset and args.data_format:
        parser.error("pass either --dataset or --data_format/--data_path, not both")
    if not args.dataset and not args.data_format:
        parser.error("no data: pass --dataset DIR, or --data_format FORMAT [--data_path PATH]")
    if args.num_records is not None and args.data_format != "simulated":
        parser.error("--num_records is for --data_format simulated; use --limit to read fewer real records")
    for name in ("feature_batch_size", "shard_size", "torch_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not args.shard_seconds > 0:
        parser.error("--shard_seconds must be positive")
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
    from ..training.errors import TrainingSetupError
    from ..training.launch import relaunch_on_cpu, requested_cpu_processes

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    processes = requested_cpu_processes()
    if processes and processes > 1:
        relaunch_on_cpu(processes, argv, module="enecg_hf.features")
    try:
        return run(args)
    except TrainingSetupError as error:
        raise SystemExit(str(error)) from None
