"""A whole training run: checks, feature cache, CV folds, final fit, output folder (see the package docstring)."""

from __future__ import annotations

import json
import logging
import shutil
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
from ..features import build_feature_cache
from .files import write_json_atomic
from .fitting import EnECGFitter, FeatureTable, predict
from .jobs import CheckpointedJobRunner, unexpected_checkpoint_files
from .labels import check_class_coverage, check_repeated_records, encode_labels
from .launch import run_command, setup_logging, use_cpu
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
    # An option left unset (None) that the checkpointed run did not know yet (a later release added it) is the same
    # run: unset options keep the behaviour the earlier release had.
    changed = sorted(k for k in {*run_info, *saved}
                     if saved.get(k) != run_info.get(k) and not (k not in saved and run_info.get(k) is None))
    if changed:
        raise TrainingSetupError(f"--resume_from_checkpoint: arguments differ from the checkpointed run: {changed}")
    unexpected = unexpected_checkpoint_files(checkpoint_root)
    if unexpected:
        raise TrainingSetupError(f"--resume_from_checkpoint: {checkpoint_root} holds files this package never writes "
                         f"(refusing to read them): {[str(p) for p in unexpected[:5]]}")


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
    """One task of a run: its spec, what it trains (`model.tasks[name]`), its labelled records."""

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


def gate_weights_by_expert(predictions: dict[str, Any], expert_names: list[str]) -> dict[str, float]:
    """The mean gate weight of each expert over the predicted records, rounded to 4 digits."""
    return dict(zip(expert_names, np.round(predictions["gate_weights"].mean(0), 4).tolist()))


def score_held_out(task: TaskData, predictions: dict[str, Any], train_idx: np.ndarray, test_idx: np.ndarray, metric,
                   expert_names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scores of a fold's held-out records (`metrics`, `baseline`, `expert_metrics`, `uniform_metrics`), and the
    trivial baseline's predictions (fitted on the fold's training labels). Each expert's own head and the heads' plain
    average are scored on the same records: what the gate must beat."""
    spec, labels_test = task.spec, predictions["labels"]
    baseline = baseline_predictions(task.labels[train_idx], task.labels[test_idx], spec)
    scores = {
        "metrics": score(predictions, spec, metric),
        "baseline": score(baseline, spec, metric),
        "expert_metrics": {name: score({"logits": predictions["expert_logits"][:, i], "labels": labels_test}, spec,
                                       metric) for i, name in enumerate(expert_names)},
        "uniform_metrics": score({"logits": predictions["expert_logits"].mean(1), "labels": labels_test}, spec, metric),
    }
    return scores, baseline


def cross_validation_summary(task: TaskData, fold_results: list[dict[str, Any]], source_results: list[dict[str, Any]],
                             metric, expert_names: list[str]) -> dict[str, Any]:
    """A task's scores over its folds (`cv`, beside the baseline's, each expert's and the uniform average's), over its
    held-out sources (`cv_source`), and whether they beat the trivial baseline (`cv_verdict`; a warning when not)."""
    spec = task.spec
    summary = {
        "cv": summarize([r["metrics"] for r in fold_results]) if fold_results else {},
        "cv_baseline": summarize([r["baseline"] for r in fold_results]) if fold_results else {},
        "cv_experts": ({name: summarize([r["expert_metrics"][name] for r in fold_results]) for name in expert_names}
                       if fold_results else {}),
        "cv_uniform": summarize([r["uniform_metrics"] for r in fold_results]) if fold_results else {},
        "cv_source": source_summary(task, source_results, metric) if source_results else None,
        "cv_verdict": None,
    }
    if fold_results or source_results:
        which = "cross-validation" if fold_results else "leave-one-source-out cross-validation"
        by_source = summary["cv_source"]
        better, detail = (beats_baseline(summary["cv"], summary["cv_baseline"], spec) if fold_results
                          else beats_baseline(by_source["mean"], by_source["baseline_mean"], spec))
        summary["cv_verdict"] = {"beats_baseline": better, "detail": detail}
        if not better:
            task.warnings.append(f"NO BETTER THAN THE TRIVIAL BASELINE in {which} ({detail}): this model has "
                                 f"not learned {spec.name!r} from these records; see docs/training.md before using it")
            logger.warning(task.warnings[-1])
    return summary


def fit_task(task: TaskData, args: TrainScriptArguments, runner: CheckpointedJobRunner, accelerator,
             expert_names: list[str], log_prefix: str = "") -> dict[str, Any] | None:
    """Cross-validation folds (subject-wise, and leave-one-source-out with `--cv_groups source`), then the final fit
    on every record, of one task; its metrics (main process)."""
    spec, table = task.spec, task.table
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
            scores, baseline = score_held_out(task, predictions, train_idx, test_idx, metric, expert_names)
            result = {**about, "train_records": int(len(train_idx)), "test_records": int(len(test_idx)), **scores,
                      "fit": report.to_dict(), "test_gate_weights": gate_weights_by_expert(predictions, expert_names)}
            if "source" in about:  # kept for the scores over every held-out record
                result["test_logits"] = predictions["logits"].tolist()
                result["baseline_logits"] = baseline["logits"].tolist()
            runner.write_result(stage, result)
            logger.info("%s%s: %s (baseline %s)", log_prefix, stage, format_metrics(scores["metrics"]),
                        format_metrics(scores["baseline"]))
            accelerator.log({f"{log_prefix}{stage}/{k}": v for k, v in scores["metrics"].items()})
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
    return {
        "label": spec.name,
        "problem_type": spec.problem_type,
        "unit": spec.unit,
        "classes": list(spec.class_names) if spec.class_names else None,
        "records": len(task.records),
        "strategy": args.strategy,
        "folds": fold_results,
        **cross_validation_summary(task, fold_results, source_results, metric, expert_names),
        "final": {"metrics": score(final_predictions, spec, metric), "fit": final_report.to_dict(),
                  "gate_weights": gate_weights_by_expert(final_predictions, expert_names),
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
    """The label columns of the run: `--label`, `--labels`, or with `--labels all` or neither, every task of the
    config (default: of `enecg_hf.data.TASKS`) that the dataset has values for; the others are left out, with a
    warning."""
    from ..data import TASKS, is_missing

    if args.label:
        return [args.label]
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


def resolve_run_config(args: TrainScriptArguments) -> dict[str, Any]:
    """The run's config (the content of its JSON file). Fills in `args.label` when neither `--label` nor `--labels`
    names the task and the config holds one task at the top level (its `label_name`; a config with `tasks` trains
    them all), and `args.output_dir` (default outputs/enecg-<config>-<label>, or -multitask)."""
    config_path = resolve_config_path(args.config)
    config_dict = json.loads(config_path.read_text())
    if not (args.label or args.labels or config_dict.get("tasks")):
        args.label = config_dict.get("label_name")
        if not args.label:
            raise TrainingSetupError("--label is required (the config names no label_name)")
    if args.output_dir is None:
        run_name = args.label or "multitask"
        args.output_dir = str(Path("outputs") / f"enecg-{config_path.stem}-{run_name}")
    return config_dict


@dataclass
class RunFolders:
    """Where a run writes. Dataset builds (--data_format) go to --cache_dir or OUT/cache. Expert features go to the
    shared feature store (feature_store_dir: --cache_dir/features, else $ENECG_HF_CACHE/features or
    ~/.cache/enecg_hf/features); with --no-cache_features to a temporary store under OUT/.features that is removed at
    the end."""

    output: Path
    cache: Path
    store: Path
    checkpoints: Path

    @classmethod
    def from_args(cls, args: TrainScriptArguments) -> "RunFolders":
        output = Path(args.output_dir)
        cache = Path(args.cache_dir) if args.cache_dir else output / ("cache" if args.cache_features else ".features")
        store = feature_store_dir(args.cache_dir) if args.cache_features else output / ".features" / "features"
        return cls(output, cache, store, output / "checkpoints")


def start_accelerator(args: TrainScriptArguments, output_dir: Path):
    """The run's `Accelerator` (on the CPU for multi-process CPU runs, trackers of --report_to logging to OUT/logs),
    with each process's logging set up and the arguments logged."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

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
    return accelerator


def load_tasks(args: TrainScriptArguments, accelerator, cache_dir: Path, config_dict: dict[str, Any]
               ) -> tuple[Any, EnECGConfig, list[TaskData]]:
    """The dataset, the run's config and each task's labelled records and folds: all checked before any training
    time is spent."""
    dataset = load_training_dataset(args, accelerator, cache_dir)
    names = task_names(args, config_dict, dataset)
    try:
        specs = [TaskSpec.infer(name, dataset, config_dict) for name in names]
    except TaskError as error:
        raise TrainingSetupError(str(error)) from error
    config = build_config(args, specs, config_dict)
    check_signal_compatibility(dataset, config)
    tasks = [prepare_task(dataset, spec, args) for spec in specs]
    for task in tasks:
        logger.info("Label %r (%s), %d records, %d folds, experts %s, strategy %s", task.spec.name,
                    task.spec.problem_type, len(task.records), len(task.folds), config.expert_names, args.strategy)
    return dataset, config, tasks


def start_checkpoints(args: TrainScriptArguments, accelerator, checkpoint_root: Path) -> None:
    """A fresh run starts with no checkpoints; a resumed one must be the same run. Either way `run.json` holds the
    arguments that change the result."""
    # As stored in run.json (JSON types), so a resumed run compares like with like.
    run_info = json.loads(json.dumps({k: v for k, v in args.to_dict().items() if k not in NON_RESULT_ARGS}, default=str))
    if accelerator.is_main_process:
        if args.resume_from_checkpoint:
            _check_resume(args, checkpoint_root, run_info)
        else:
            shutil.rmtree(checkpoint_root, ignore_errors=True)
        write_json_atomic(checkpoint_root / "run.json", run_info)
    accelerator.wait_for_everyone()


def build_model_and_features(args: TrainScriptArguments, config: EnECGConfig, dataset, tasks: list[TaskData],
                             accelerator, store_dir: Path) -> EnECGModel:
    """The model (its frozen experts loaded once) on the run's device, and each task's `target`
    (`model.tasks[name]`) and `table` (its records' features, computed once per record for every task)."""
    torch.manual_seed(args.seed)
    model = build_model_with_experts(config)
    model.set_expert_precision(args.expert_precision)
    features, _ = build_feature_cache(dataset, model, accelerator, store_dir, args.feature_batch_size)
    model.set_expert_precision("fp32")  # features are computed: heads and gate train on them, the model saves fp32
    for task in tasks:
        task.target = model.tasks[task.spec.name]
        task.table = FeatureTable.from_store(features, task.keep, task.labels, task.records, config.expert_names)
    return model.to(accelerator.device)


def fit_tasks(args: TrainScriptArguments, tasks: list[TaskData], accelerator, checkpoint_root: Path,
              expert_names: list[str]) -> dict[str, Any]:
    """Each task's CV folds, then its final fit on every record; its metrics by name (main process). A run of
    several tasks keeps each task's jobs in its own checkpoint folder (and its log lines prefixed with its name),
    under the names (and so the seeds) of a single-task run: each task's heads and gate learn exactly what a
    single-task run on the same records would."""
    task_metrics = {}
    runners = []
    several = len(tasks) > 1
    for task in tasks:
        runner = CheckpointedJobRunner(checkpoint_root / task.spec.name if several else checkpoint_root, accelerator)
        runners.append(runner)
        task_metrics[task.spec.name] = fit_task(task, args, runner, accelerator, expert_names,
                                                log_prefix=f"{task.spec.name}/" if several else "")
    logger.info("Jobs of this process: %d run, %d reused from checkpoints", sum(r.jobs_run for r in runners),
                sum(r.jobs_reused for r in runners))
    return task_metrics


def run_metrics(args: TrainScriptArguments, dataset, task_metrics: dict[str, Any], accelerator, train_seconds: float
                ) -> dict[str, Any]:
    """The content of `metrics.json`: the task's metrics (several tasks: every task's, under `tasks`), with the
    run's processes, feature caching and time."""
    run_fields = {"num_processes": accelerator.num_processes, "cache_features": args.cache_features,
                  "train_seconds": train_seconds}
    if len(task_metrics) == 1:
        return {**next(iter(task_metrics.values())), **run_fields}
    return {"labels": list(task_metrics), "records": len(dataset), "strategy": args.strategy, "tasks": task_metrics,
            "warnings": [f"{name}: {w}" for name, m in task_metrics.items() for w in m["warnings"]], **run_fields}


def training_records(dataset, tasks: list[TaskData]):
    """The records some task trained on (the model card's data section describes these)."""
    used = sorted({int(i) for task in tasks for i in task.keep})
    return dataset if len(used) == len(dataset) else dataset.select(used)


def run(args: TrainScriptArguments) -> dict[str, Any]:
    """Run a whole training job (see the module docstring); returns the content of `metrics.json`."""
    start_time = time.perf_counter()
    config_dict = resolve_run_config(args)
    folders = RunFolders.from_args(args)
    accelerator = start_accelerator(args, folders.output)
    dataset, config, tasks = load_tasks(args, accelerator, folders.cache, config_dict)
    start_checkpoints(args, accelerator, folders.checkpoints)
    model = build_model_and_features(args, config, dataset, tasks, accelerator, folders.store)
    if args.report_to:
        accelerator.init_trackers("enecg", config={k: str(v) for k, v in args.to_dict().items()})
    task_metrics = fit_tasks(args, tasks, accelerator, folders.checkpoints, config.expert_names)

    # ---- output folder (main process), then the Hub
    metrics = None
    if accelerator.is_main_process:
        metrics = run_metrics(args, dataset, task_metrics, accelerator,
                              round(time.perf_counter() - start_time, 1))
        save_output_folder(model.cpu(), folders.output, args, metrics, training_records(dataset, tasks))
        logger.info("Saved the model folder %s", folders.output.resolve())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        if not args.cache_features:
            shutil.rmtree(folders.output / ".features", ignore_errors=True)
        print_summary(metrics, folders.output)
        if args.push_to_hub:
            push_folder(folders.output, args)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    return run_command(argv, parse_args, run)

