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

Modules: `arguments` (command line), `labels` (task and config), `records` (data checks and folds), `features`
(feature cache), `trainer` (the loop of one stage), `checkpoints`, `scoring` (metrics and baselines), `output`
(folder, model card, Hub), `launch` (processes), `run` (a whole run).
"""

from .arguments import DATA_FORMATS, MAIN_JOB_ARGS, TrainingArguments, build_parser, parse_args
from .checkpoints import CheckpointManager
from .features import build_feature_cache, compute_features, expert_fingerprint
from .labels import LabelSpec, check_class_coverage
from .run import main, run
from .scoring import baseline_predictions, load_metric, score, summarize
from .trainer import EpochShuffleSampler, Trainer


__all__ = [
    "DATA_FORMATS", "MAIN_JOB_ARGS", "TrainingArguments", "build_parser", "parse_args", "CheckpointManager",
    "build_feature_cache", "compute_features", "expert_fingerprint", "LabelSpec", "check_class_coverage", "main",
    "run", "baseline_predictions", "load_metric", "score", "summarize", "EpochShuffleSampler", "Trainer",
]
