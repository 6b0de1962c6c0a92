"""Checkpoints: atomic `accelerator.save_state` folders holding only trainable parameters, and run progress.

Resuming never unpickles: the progress is a JSON file (`training_progress.json`), and a checkpoint folder holding any
pickle-capable file other than those `accelerator.save_state` writes (which `load_state` reads with
`torch.load(weights_only=True)`) is refused, naming the files. accelerate itself loads registered custom objects
(`custom_checkpoint_<i>.pkl`) with `weights_only=False`, which would run any code a crafted file holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .files import write_json_atomic


PROGRESS_FILE = "training_progress.json"
# What `accelerator.save_state` writes; everything here that is not safetensors or JSON is read back with
# `torch.load(weights_only=True)`.
CHECKPOINT_FILES = re.compile(
    r"(model(_\d+)?\.safetensors|(optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.bin|random_states_\d+\.pkl"
    r"|scaler\.pt|" + re.escape(PROGRESS_FILE) + ")"
)
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".joblib")


class TrainingProgress:
    """Where a stage is; saved as JSON in every checkpoint (`CheckpointManager.track`)."""

    def __init__(self):
        self.reset("")

    def reset(self, stage: str) -> None:
        self.stage, self.epoch, self.step_in_epoch, self.global_step = stage, 0, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counters = ("epoch", "step_in_epoch", "global_step")
        if (not isinstance(state, dict) or not isinstance(state.get("stage"), str)
                or not all(type(state.get(key)) is int and state[key] >= 0 for key in counters)):
            raise ValueError(f"not a training progress record: {str(state)[:200]}")
        self.stage, self.epoch = state["stage"], state["epoch"]
        self.step_in_epoch, self.global_step = state["step_in_epoch"], state["global_step"]


def check_checkpoint_files(folder: Path) -> None:
    """Refuse a checkpoint folder that holds pickle-capable files `save_state` does not write (e.g. a crafted
    `custom_checkpoint_0.pkl`, which accelerate would unpickle), or that lacks the progress file."""
    unexpected = sorted(path.name for path in folder.iterdir()
                        if path.suffix.lower() in PICKLE_SUFFIXES and not CHECKPOINT_FILES.fullmatch(path.name))
    if unexpected:
        raise SystemExit(f"Refusing to resume from {folder}: it holds {unexpected}, which this trainer never writes "
                         "and which could run code when loaded (resuming never unpickles). Remove them if you trust "
                         "the folder, or resume from another checkpoint.")
    if not (folder / PROGRESS_FILE).is_file():
        raise SystemExit(f"Cannot resume from {folder}: no {PROGRESS_FILE} (a checkpoint of an older version, or an "
                         "incomplete one)")


def trainable_parameter_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def install_checkpoint_hooks(accelerator) -> None:
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
        self.progress: TrainingProgress | None = None

    def track(self, progress: TrainingProgress) -> None:
        """Save `progress` in every checkpoint as JSON, and restore it in `load`."""
        self.progress = progress

    def load(self, folder: Path) -> None:
        """`accelerator.load_state(folder)` after checking its files, then the tracked progress from its JSON file."""
        check_checkpoint_files(folder)
        self.accelerator.load_state(str(folder))
        if self.progress is not None:
            try:
                self.progress.load_state_dict(json.loads((folder / PROGRESS_FILE).read_text()))
            except ValueError as error:  # also json.JSONDecodeError
                raise SystemExit(f"Cannot resume from {folder}: {PROGRESS_FILE}: {error}") from error

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
        if accelerator.is_main_process and self.progress is not None:
            write_json_atomic(tmp / PROGRESS_FILE, self.progress.state_dict())
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
