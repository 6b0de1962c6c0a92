"""A whole training run: checks, feature cache, CV folds, final fit, output folder (see the package docstring)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..configuration_enecg import EnECGConfig
from ..data.splits import institution, leave_one_source_out, source_groups
from ..data.tasks import TaskError, TaskSpec
from ..modeling_enecg import EnECGModel
from .arguments import NON_RESULT_ARGS, TrainScriptArguments, parse_args
from .configs import build_config, resolve_config_path
from .errors import TrainingSetupError
from ..features.store import feature_store_dir
from .features import build_feature_cache, embedding_column
from .files import write_json_atomic
from .fitting import EnECGFitter, FeatureTable, predict
from .jobs import CheckpointedJobRunner, unexpected_checkpoint_files
from .labels import check_class_coverage, check_repeated_records, encode_labels
from .launch import relaunch_on_cpu, requested_cpu_processes, setup_logging, use_cpu
from .output import print_summary, push_folder, save_output_folder
from .records import check_signal_compatibility, drop_unusable_signals, load_training_dataset, make_folds
from .scoring import baseline_predictions, format_metrics, load_metric, score, summarize

logger = logging.getLogger(__name__)


def build_model_with_experts(config: EnECGConfig) -> EnECGModel:
    """`EnECGModel.from_expert_sources`, with an expert that cannot be loaded (no local folder, Hub unreachable, a
    checkpoint that does not match) ending the run with its message instead of a traceback."""
    try:
        return EnECGModel.from_expert_sources(config)
    except (OSError, ValueError, RuntimeError) as error:
        raise TrainingSetupError(f"Could not build the model: {error}") from error


def _check_resume(args: TrainScriptArguments, checkpoint_root: Path, run_info: dict[str, Any]) -> None:
    """A resumed run must be the same run, and its checkpoint folder must hold only what this package writes."""
    path = checkpoint_root / "run.json"
    if not path.is_file():
        raise TrainingSetupError(f"--resume_from_checkpoint: no checkpoints under {checkpoint_root}")
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not the run's arguments")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        # Not recomputed: it is what says whose checkpoints these are.
        raise TrainingSetupError(f"--resume_from_checkpoint: {path} is unreadable ({error}), so the checkpoints under "
                                 f"{checkpoint_root} cannot be matched to this run; start it again without "
                                 "--resume_from_checkpoint") from None
    if saved != run_info:
        changed = sorted(k for k in {*run_info, *saved} if saved.get(k) != run_info.get(k))
        raise TrainingSetupError(f"--resume_from_checkpoint: arguments differ from the checkpointed run: {changed}")
    unexpected = unexpected_checkpoint_files(checkpoint_root)
    if unexpected:
        raise TrainingSetupError(f"--resume_from_checkpoint: {checkpoint_root} holds files this package never writes "
                         f"(refusing to read them): {[str(p) for p in unexpected[:5]]}")


def load_feature_table(features, keep: np.ndarray, labels: np.ndarray, records, expert_names: list[str]) -> FeatureTable:
    """The labelled records' cached features as in-memory tensors (training reads every row many times), with their
    subjects and source groups."""
    columns = [embedding_column(name) for name in expert_names] + ["gate_inputs"]
    table = features.select(keep, keep_in_memory=True).with_format("torch", columns=columns)[:]
    groups = None
    if "subject_id" in records.column_names:
        groups = np.asarray([f"subject:{s}" if s is not None else f"row:{i}" for i, s in enumerate(records["subject_id"])])
    return FeatureTable([table[embedding_column(n)].float() for n in expert_names], table["gate_inputs"].float(),
                        torch.from_numpy(labels), groups, source_groups(records))


def beats_baseline(cv: dict[str, Any], baseline: dict[str, Any], label: TaskSpec) -> tuple[bool, str]:
    """Whether cross-validation beat the trivial predictor on the task's headline metrics (MAE; AUROC and macro F1)."""
    checks = [("mae", -1)] if label.is_regression else [("auroc", 1), ("f1", 1)]
    verdicts = []
    for name, sign in checks:
        if name in cv and name in baseline:
            better = sign * (cv[name]["mean"] - baseline[name]["mean"]) > 0
            verdicts.append((better, f"{name} {cv[name]['mean']:.4g} vs baseline {baseline[name]['mean']:.4g}"))
    return all(v for v, _ in verdicts), "; ".join(text for _, text in verdicts)


@dataclass
class TaskData:
    """One task of a run: its spec, what it trains (the model, or `model.tasks[name]`), its labelled records."""

    spec: TaskSpec
    keep: np.ndarray  # dataset rows with this task's label (and a usable signal)
    labels: np.ndarray
    records: Any  # those rows as a dataset
    folds: list
    warnings: list[str]
    source_folds: list = field(default_factory=list)  # (source group, train, test) of leave-one-source-out
    target: Any = None
    table: FeatureTable | None = None


def prepare_task(dataset, spec: TaskSpec, args: TrainScriptArguments) -> TaskData:
    """The task's labelled records and folds, checked before any training time is spent."""
    warnings_ = []
    keep, labels = encode_labels(dataset, spec, warnings_)
    keep, labels = drop_unusable_signals(dataset, keep, labels)
    records = dataset.select(keep, keep_in_memory=True) if len(keep) < len(dataset) else dataset
    warnings_ += check_repeated_records(records)
    folds = make_folds(records, args.folds, args.seed) if args.folds >= 2 and "subject" in args.cv_groups else []
    source_folds = []
    if "source" in args.cv_groups:
        groups = source_groups(records)
        source_folds = leave_one_source_out(groups)
        if not source_folds:
            found = sorted({institution(g) for g in groups.tolist()})
            raise TrainingSetupError(f"--cv_groups source: the records with a {spec.name!r} label come from "
                                     f"{len(found)} institution(s) ({', '.join(found)}); leaving one out needs at "
                                     "least two (several --dataset folders, e.g. one per source)")
    if not spec.is_regression:
        warnings_ += check_class_coverage(labels, spec, folds + [f[1:] for f in source_folds])
    return TaskData(spec, np.asarray(keep), labels, records, folds, warnings_, source_folds)


def fit_task(task: TaskData, args: TrainScriptArguments, runner: CheckpointedJobRunner, accelerator,
             expert_names: list[str], log_prefix: str = "") -> dict[str, Any] | None:
    """Cross-validation folds (subject-wise, and leave-one-source-out with `--cv_groups source`), then the final fit
    on every record, of one task; its metrics (main process)."""
    spec, table, labels = task.spec, task.table, task.labels
    fitter = EnECGFitter(task.target, args.fit_settings(), runner, autocast=accelerator.autocast)
    metric = load_metric(spec.problem_type) if accelerator.is_main_process else None

    def run_stage(stage: str, train_idx: np.ndarray, test_idx: np.ndarray, about: dict[str, Any]) -> dict | None:
        """Fit on `train_idx`, score on `test_idx`; the result (main process), or the one of an earlier run."""
        finished = runner.result(stage)
        if finished is not None:
            logger.info("%s%s: finished in an earlier run, result reused", log_prefix, stage)
            return finished
        report = fitter.fit(table, train_idx, name=stage)
        result = None
        if accelerator.is_main_process:
            predictions = predict(task.target, table, test_idx)
            fold_metrics = score(predictions, spec, metric)
            baseline = baseline_predictions(labels[train_idx], labels[test_idx], spec)
            baseline_metrics = score(baseline, spec, metric)
            # Each expert's own head and the heads' plain average on the same records: what the gate must beat.
            labels_test = predictions["labels"]
            expert_metrics = {name: score({"logits": predictions["expert_logits"][:, i], "labels": labels_test},
                                          spec, metric) for i, name in enumerate(expert_names)}
            uniform_metrics = score({"logits": predictions["expert_logits"].mean(1), "labels": labels_test}, spec,
                                    metric)
            result = {**about, "train_records": int(len(train_idx)), "test_records": int(len(test_idx)),
                      "metrics": fold_metrics, "baseline": baseline_metrics, "expert_metrics": expert_metrics,
                      "uniform_metrics": uniform_metrics, "fit": report.to_dict(),
                      "test_gate_weights": dict(zip(expert_names,
                                                    np.round(predictions["gate_weights"].mean(0), 4).tolist()))}
            if "source" in about:  # kept for the scores over every held-out record
                result["test_logits"] = predictions["logits"].tolist()
                result["baseline_logits"] = baseline["logits"].tolist()
            runner.write_result(stage, result)
            logger.info("%s%s: %s (baseline %s)", log_prefix, stage, format_metrics(fold_metrics),
                        format_metrics(baseline_metrics))
            accelerator.log({f"{log_prefix}{stage}/{k}": v for k, v in fold_metrics.items()})
        accelerator.wait_for_everyone()
        return result

    fold_results = [run_stage(f"fold-{i + 1}", train, test, {"fold": i + 1})
                    for i, (train, test) in enumerate(task.folds)]
    source_results = [run_stage(f"source-{group.replace('/', '_')}", train, test,
                                {"source": group, "institution": institution(group)})
                      for group, train, test in task.source_folds]
    final_report = fitter.fit(table, np.arange(len(task.records)), name="final")
    if not accelerator.is_main_process:
        return None
    final_predictions = predict(task.target, table)
    cv = summarize([r["metrics"] for r in fold_results]) if fold_results else {}
    cv_baseline = summarize([r["baseline"] for r in fold_results]) if fold_results else {}
    cv_experts = ({name: summarize([r["expert_metrics"][name] for r in fold_results]) for name in expert_names}
                  if fold_results else {})
    cv_uniform = summarize([r["uniform_metrics"] for r in fold_results]) if fold_results else {}
    cv_source = source_summary(task, source_results, metric) if source_results else None
    verdict = None
    if fold_results or source_results:
        which = "cross-validation" if fold_results else "leave-one-source-out cross-validation"
        better, detail = (beats_baseline(cv, cv_baseline, spec) if fold_results
                          else beats_baseline(cv_source["mean"], cv_source["baseline_mean"], spec))
        verdict = {"beats_baseline": better, "detail": detail}
        if not better:
            task.warnings.append(f"NO BETTER THAN THE TRIVIAL BASELINE in {which} ({detail}): this model has "
                                 f"not learned {spec.name!r} from these records; see docs/training.md before using it")
            logger.warning(task.warnings[-1])
    return {
        "label": spec.name,
        "problem_type": spec.problem_type,
        "unit": spec.unit,
        "classes": list(spec.class_names) if spec.class_names else None,
        "records": len(task.records),
        "strategy": args.strategy,
        "folds": fold_results,
        "cv": cv,
        "cv_baseline": cv_baseline,
        "cv_experts": cv_experts,
        "cv_uniform": cv_uniform,
        "cv_source": cv_source,
        "cv_verdict": verdict,
        "final": {"metrics": score(final_predictions, spec, metric), "fit": final_report.to_dict(),
                  "gate_weights": dict(zip(expert_names,
                                           np.round(final_predictions["gate_weights"].mean(0), 4).tolist())),
                  "note": "the saved model scored on all its training records (in-sample)"},
        "warnings": task.warnings,
    }


def source_summary(task: TaskData, results: list[dict[str, Any]], metric) -> dict[str, Any]:
    """Leave-one-source-out results of a task: each held-out source group's scores (`groups`, without the stored
    predictions), their mean ± std over groups (`mean`, `baseline_mean`), and the scores over every held-out record
    at once (`pooled`, `baseline_pooled`: each record predicted by a model that saw none of its institution)."""
    test = np.concatenate([test for _, _, test in task.source_folds])
    labels = task.labels[test]
    pooled = {"logits": np.concatenate([np.asarray(r["test_logits"]) for r in results]), "labels": labels}
    baseline = {"logits": np.concatenate([np.asarray(r["baseline_logits"]) for r in results]), "labels": labels}
    return {
        "groups": [{k: v for k, v in r.items() if not k.endswith("_logits")} for r in results],
        "mean": summarize([r["metrics"] for r in results]),
        "baseline_mean": summarize([r["baseline"] for r in results]),
        "pooled": score(pooled, task.spec, metric),
        "baseline_pooled": score(baseline, task.spec, metric),
        "records": int(len(test)),
    }


def task_names(args: TrainScriptArguments, config_dict: dict[str, Any], dataset) -> list[str]:
    """The label columns of a multi-task run: `--labels`, or with `--labels all` or none, every task of the config
    (default: of `enecg_hf.data.TASKS`) that the dataset has values for; the others are left out, with a warning."""
    from ..data import TASKS, is_missing

    if args.labels and args.labels != ["all"]:
        if len(set(args.labels)) != len(args.labels):
            raise TrainingSetupError(f"--labels names a task twice: {args.labels}")
        return list(args.labels)
    wanted = [task["name"] for task in config_dict.get("tasks") or []] if not args.labels else []
    wanted = wanted or list(TASKS)
    names = [name for name in wanted if name in dataset.column_names
             and any(not is_missing(value) for value in dataset[name])]
    if not names:
        raise TrainingSetupError(f"The dataset has no values for any of the tasks {wanted}")
    if len(names) < len(wanted):
        logger.warning("Tasks without any label in this dataset are left out of the model: %s",
                       sorted(set(wanted) - set(names)))
    return names


def run(args: TrainScriptArguments) -> dict[str, Any]:
    """Run a whole training job (see the module docstring); returns the content of `metrics.json`."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

    start_time = time.perf_counter()
    config_path = resolve_config_path(args.config)
    config_dict = json.loads(config_path.read_text())
    multitask = bool(args.labels) or bool(config_dict.get("tasks") and not args.label)
    if not multitask:
        args.label = args.label or config_dict.get("label_name")
        if not args.label:
            raise TrainingSetupError("--label is required (the config names no label_name)")
    if args.output_dir is None:
        run_name = "multitask" if multitask else args.label
        args.output_dir = str(Path("outputs") / f"enecg-{config_path.stem}-{run_name}")
    output_dir = Path(args.output_dir)
    # Dataset builds (--data_format) go to --cache_dir or OUT/cache. Expert features go to the shared feature store
    # (feature_store_dir: --cache_dir/features, else $ENECG_HF_CACHE/features or ~/.cache/enecg_hf/features); with
    # --no-cache_features to a temporary store under OUT/.features that is removed at the end.
    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / ("cache" if args.cache_features else ".features")
    store_dir = feature_store_dir(args.cache_dir) if args.cache_features else output_dir / ".features" / "features"
    checkpoint_root = output_dir / "checkpoints"

    cpu = use_cpu()
    PartialState(cpu=cpu)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    setup_logging(accelerator)
    logger.info("Arguments: %s", json.dumps(args.to_dict()))

    # ---- data and checks, before any training time is spent
    dataset = load_training_dataset(args, accelerator, cache_dir)
    names = task_names(args, config_dict, dataset) if multitask else [args.label]
    try:
        specs = [TaskSpec.infer(name, dataset, config_dict) for name in names]
    except TaskError as error:
        raise TrainingSetupError(str(error)) from error
    config = build_config(args, specs if multitask else specs[0], config_dict)
    check_signal_compatibility(dataset, config)
    tasks = [prepare_task(dataset, spec, args) for spec in specs]
    for task in tasks:
        logger.info("Label %r (%s), %d records, %d folds, experts %s, strategy %s", task.spec.name,
                    task.spec.problem_type, len(task.records), len(task.folds), config.expert_names, args.strategy)

    # ---- checkpoints: a fresh run starts clean; a resumed one must be the same run
    # As stored in run.json (JSON types), so a resumed run compares like with like.
    run_info = json.loads(json.dumps({k: v for k, v in args.to_dict().items() if k not in NON_RESULT_ARGS}, default=str))
    if accelerator.is_main_process:
        if args.resume_from_checkpoint:
            _check_resume(args, checkpoint_root, run_info)
        else:
            shutil.rmtree(checkpoint_root, ignore_errors=True)
        write_json_atomic(checkpoint_root / "run.json", run_info)
    accelerator.wait_for_everyone()

    # ---- the model (frozen experts loaded once) and its features, computed once per record for every task
    torch.manual_seed(args.seed)
    model = build_model_with_experts(config)
    model.set_expert_precision(args.expert_precision)
    features, _ = build_feature_cache(dataset, model, accelerator, store_dir, args.feature_batch_size)
    model.set_expert_precision("fp32")  # features are computed: heads and gate train on them, the model saves fp32
    ensembles = model.task_ensembles()
    for task in tasks:
        task.target = ensembles[task.spec.name] if multitask else model
        task.table = load_feature_table(features, task.keep, task.labels, task.records, config.expert_names)
    model.to(accelerator.device)
    if args.report_to:
        accelerator.init_trackers("enecg", config={k: str(v) for k, v in args.to_dict().items()})

    # ---- per task: CV folds, then the final fit on every record. A multi-task run keeps each task's jobs in its own
    # checkpoint folder, under the names (and so the seeds) of a single-task run: each task's heads and gate learn
    # exactly what a single-task run on the same records would.
    task_metrics = {}
    runners = []
    for task in tasks:
        runner = CheckpointedJobRunner(checkpoint_root / task.spec.name if multitask else checkpoint_root, accelerator)
        runners.append(runner)
        task_metrics[task.spec.name] = fit_task(task, args, runner, accelerator, config.expert_names,
                                                log_prefix=f"{task.spec.name}/" if multitask else "")
    logger.info("Jobs of this process: %d run, %d reused from checkpoints", sum(r.jobs_run for r in runners),
                sum(r.jobs_reused for r in runners))

    # ---- output folder (main process), then the Hub
    metrics = None
    if accelerator.is_main_process:
        run_fields = {"num_processes": accelerator.num_processes, "cache_features": args.cache_features,
                      "train_seconds": round(time.perf_counter() - start_time, 1)}
        if multitask:
            metrics = {"labels": names, "records": len(dataset), "strategy": args.strategy, "tasks": task_metrics,
                       "warnings": [f"{name}: {w}" for name, m in task_metrics.items() for w in m["warnings"]],
                       **run_fields}
        else:
            metrics = {**task_metrics[names[0]], **run_fields}
        used = sorted({int(i) for task in tasks for i in task.keep})
        records = dataset if len(used) == len(dataset) else dataset.select(used)
        save_output_folder(model.cpu(), output_dir, args, metrics, records)
        logger.info("Saved the model folder %s", output_dir.resolve())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        if not args.cache_features:
            shutil.rmtree(output_dir / ".features", ignore_errors=True)
        print_summary(metrics, output_dir)
        if args.push_to_hub:
            push_folder(output_dir, args)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)  # errors in the arguments show before any process is started
        processes = requested_cpu_processes()
        if processes and processes > 1:
            relaunch_on_cpu(processes, argv)
        return run(args)
    except TrainingSetupError as error:  # a message for the command line, not a traceback
        raise SystemExit(str(error)) from None

