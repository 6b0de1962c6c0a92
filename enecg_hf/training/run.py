"""A whole training run: checks, feature cache, CV folds, final fit, output folder (see the package docstring)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .arguments import NON_RESULT_ARGS, TrainingArguments, parse_args
from .checkpoints import CheckpointManager, install_checkpoint_hooks
from .features import build_feature_cache
from .files import write_json_atomic
from .labels import LabelSpec, build_config, check_class_coverage, encode_labels, resolve_config_path
from .launch import relaunch_on_cpu, requested_cpu_processes, use_cpu
from .output import print_summary, push_folder, save_output_folder
from .records import check_signal_compatibility, drop_unusable_signals, load_training_dataset, make_folds
from .scoring import baseline_predictions, format_metrics, load_metric, score, summarize
from .trainer import Stage, Trainer, build_model_with_experts


logger = logging.getLogger(__name__)


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
    install_checkpoint_hooks(accelerator)
    logger.info("Arguments: %s", json.dumps(args.to_dict()))

    # ---- data and checks, before any training time is spent
    dataset = load_training_dataset(args, accelerator, cache_dir)
    label = LabelSpec.infer(label_name, dataset, config_dict)
    config = build_config(args, label, config_dict)
    check_signal_compatibility(dataset, config)
    keep, labels = encode_labels(dataset, label)
    keep, labels = drop_unusable_signals(dataset, keep, labels)
    records = dataset.select(keep, keep_in_memory=True) if len(keep) < len(dataset) else dataset
    folds = make_folds(records, args.folds, args.seed) if args.folds >= 2 else []
    warnings_ = [] if label.is_regression else check_class_coverage(labels, label, folds)
    stages = [Stage(f"fold-{i + 1}", i, tr, te) for i, (tr, te) in enumerate(folds)]
    stages.append(Stage("final", len(folds), np.arange(len(records)), np.arange(len(records))))
    logger.info("Label %r (%s), %d records, %d folds, experts %s", label.name, label.problem_type, len(records),
                len(folds), config.expert_names)

    # ---- checkpoints: a fresh run starts clean; a resumed one must have the same result-determining arguments
    # As stored in run.json (JSON types), so a resumed run compares like with like.
    run_info = json.loads(json.dumps({k: v for k, v in args.to_dict().items() if k not in NON_RESULT_ARGS}, default=str))
    resume, first_stage = _resolve_resume(args, checkpoint_root, [s.name for s in stages])
    if accelerator.is_main_process:
        if args.resume_from_checkpoint:
            saved = json.loads((checkpoint_root / "run.json").read_text()) if (checkpoint_root / "run.json").is_file() else None
            if saved is not None and saved != run_info:
                changed = sorted(k for k in run_info if saved.get(k) != run_info[k])
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
        feature_model = build_model_with_experts(config)
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
            logger.info("%s: %s (baseline %s)", stage.name, format_metrics(fold_metrics), format_metrics(baseline))
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)  # errors in the arguments show before any process is started
    processes = requested_cpu_processes()
    if processes and processes > 1:
        relaunch_on_cpu(processes, argv)
    return run(args)

