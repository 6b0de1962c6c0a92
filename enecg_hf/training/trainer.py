"""The training loop: one stage (a CV fold or the final fit) with a fresh model and optimiser."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ..configuration_enecg import EnECGConfig
from ..modeling_enecg import EnECGModel
from .arguments import TrainingArguments
from .checkpoints import CheckpointManager, TrainingProgress
from .features import compute_features, embedding_column, expert_fingerprint
from .labels import LabelSpec


logger = logging.getLogger(__name__)


def build_model_with_experts(config: EnECGConfig) -> EnECGModel:
    """`EnECGModel.from_expert_sources`, with an expert that cannot be loaded (no local folder, Hub unreachable, a
    checkpoint that does not match) ending the run with its message instead of a traceback."""
    try:
        return EnECGModel.from_expert_sources(config)
    except (OSError, ValueError, RuntimeError) as error:
        raise SystemExit(f"Could not build the model: {error}") from error


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
                 resume: Path | None, cached_experts_fingerprint: str | None = None):
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
        self.cached_experts_fingerprint = cached_experts_fingerprint  # experts the feature cache was computed with
        self.checkpoints = checkpoints
        self.resume = resume
        self.progress = TrainingProgress()
        self.steps_run = 0  # optimiser-loop iterations in this process run (for --stop_after_steps)
        self.models_built = 0
        checkpoints.track(self.progress)  # saved as JSON in each checkpoint: resuming never unpickles

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
            model = build_model_with_experts(config)
        finally:
            modeling_logger.setLevel(level)
        self.models_built += 1
        cached = self.cached_experts_fingerprint
        if cached is not None and expert_fingerprint(model) != cached:
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
            self.checkpoints.load(self.resume)
            if self.progress.stage != stage.name:
                raise RuntimeError(f"{self.resume} holds stage {self.progress.stage!r}, not {stage.name!r}")
            logger.info("%s: resumed from %s (epoch %d, step %d of the epoch)", stage.name, self.resume,
                        self.progress.epoch + 1, self.progress.step_in_epoch)
            self.resume = None

        steps_per_epoch = len(train_loader)
        progress_bar = tqdm(total=args.epochs * steps_per_epoch, desc=stage.name,
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

