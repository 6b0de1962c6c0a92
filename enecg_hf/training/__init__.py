"""Training EnECG with 🤗 Accelerate: subject-wise k-fold cross-validation, a final fit, and a Hub-ready output folder.

    python train.py                                   # the main job: simulated ECGs, tiny config, RR interval
    accelerate launch train.py --config hub_configs/tiny.json --dataset DIR --label sex --output_dir OUT
    accelerate launch --num_processes 2 --cpu train.py ...
    python train.py --config multitask --dataset DIR1 DIR2 --labels all   # one model, every labelled task

What a run does, in order (see docs/training.md):

1. Load the dataset (`--dataset`, a folder written by `Dataset.save_to_disk` / `python -m enecg_hf.data`) or build
   it with `enecg_hf.data.build_dataset` (`--data_format/--data_path`). Check the label column, its values, the
   sampling rate and record length against the config, and the class coverage of the folds - before any training.
   With `--labels` (a multi-task model) each task gets the records that carry its label, and its own folds.
2. Expert features: read from the record-level feature store (`enecg_hf.features`, shared by every run: default
   `~/.cache/enecg_hf/features`), where the frozen experts run once per record and expert, only for what is missing,
   in batches dealt to the processes; heads and gate train on them, in memory.
3. For each of the `--folds` subject-wise folds: the heads and gate start again from the same initial weights, are
   fitted on the other folds (`fitting`: by default heads on their own losses with cross-validated early stopping,
   the gate on their out-of-fold predictions) and scored on this one with our local `evaluate` modules, beside the
   trivial baseline; a run that does not beat it says so loudly.
   A multi-task run does this for each task in turn, on the shared features (`model.tasks[name]`).
4. A final model is fitted on all records and saved with `save_pretrained`, with `metrics.json`,
   `training_args.json` and a model card (`README.md`); `--push_to_hub` uploads the folder.

Each job of a fit (an inner-fold head fit, the final heads, the gate) is kept as a safetensors file under
`OUT/checkpoints` and spread over the processes of an `accelerate launch` run (`jobs`); `--resume_from_checkpoint
latest` reuses the finished jobs of a killed run and reaches the same result as an uninterrupted one.

Modules: `arguments` (command line), `errors` (`TrainingSetupError`: the library raises it, `main()` makes it an exit
message), `configs` (the run's config: hub_configs/, task, overrides), `labels` (which records have a label, class
coverage), `records` (data checks and folds), `fitting` (how heads and gate learn: the core, usable in a notebook),
`jobs` (checkpoints and processes), `scoring` (metrics and baselines), `output` (folder, Hub, summary), `model_card`
(the folder's README.md), `serving_export` (its handler.py and requirements.txt), `launch` (processes and their
logging), `run` (a whole run), `trainer` (training with `transformers.Trainer` instead: dataset columns and a
callback). The expert features training reads (the feature store, `FeatureTable`) live one layer down, in
`enecg_hf.features`; `FeatureTable`, `compute_features`, `expert_fingerprint` and `build_feature_cache` are
re-exported here.
"""

from .arguments import DATA_FORMATS, MAIN_JOB_ARGS, TrainScriptArguments, build_parser, parse_args
from .errors import TrainingSetupError
from ..features import FeatureTable, build_feature_cache, compute_features, expert_fingerprint  # their home
from .fitting import EnECGFitter, FitReport, FitSettings, fit_enecg, predict
from .jobs import CheckpointedJobRunner
from .labels import check_class_coverage
from .run import main, run
from .scoring import baseline_predictions, cross_validate, load_metric, score, summarize
from .trainer import EnECGTrainerCallback, fit_label_statistics, model_inputs, regression_metrics


__all__ = [
    "TrainingSetupError", "DATA_FORMATS", "MAIN_JOB_ARGS", "TrainScriptArguments", "build_parser", "parse_args",
    "build_feature_cache", "compute_features", "expert_fingerprint", "EnECGFitter", "FeatureTable", "FitReport", "FitSettings", "fit_enecg",
    "predict", "CheckpointedJobRunner", "check_class_coverage", "main", "run", "baseline_predictions", "cross_validate",
    "load_metric", "score", "summarize", "EnECGTrainerCallback", "fit_label_statistics", "model_inputs",
    "regression_metrics",
]
