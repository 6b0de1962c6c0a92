"""Checkpoints of a training run: every job of a fit (`fitting.JobRunner`) kept as a safetensors file.

    OUT/checkpoints/run.json                              arguments that determine the result
    OUT/checkpoints/<stage>/<step>/job-<i>.safetensors    output of one job (inner-fold heads, final heads, gate)
    OUT/checkpoints/<stage>/result.json                   scores of a finished CV fold

Jobs are spread round-robin over the processes of an `accelerate launch` run; after a barrier every process reads all
outputs, so N processes end with the model one process would train. A job whose file exists is not run again: a
killed run resumed with `--resume_from_checkpoint latest` reaches the uninterrupted result. Files are written to a
temporary name and renamed, so a half-written file is never read, and nothing here is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .files import write_json_atomic


logger = logging.getLogger(__name__)

# What a checkpoint folder may hold; anything else (a pickle, say) is refused on resume rather than read.
CHECKPOINT_SUFFIXES = (".safetensors", ".json")


class CheckpointedJobRunner:
    """`JobRunner` of a training run (see the module docstring)."""

    def __init__(self, root: Path, accelerator):
        self.root = root
        self.accelerator = accelerator
        self.jobs_run = 0  # jobs computed by this process
        self.jobs_reused = 0  # jobs of this process found finished (a resumed run)

    def map(self, name: str, function: Callable[[Any], dict[str, torch.Tensor]], items: Sequence[Any]
            ) -> list[dict[str, torch.Tensor]]:
        from safetensors.torch import load_file, save_file

        folder = self.root / name
        files = [folder / f"job-{i}.safetensors" for i in range(len(items))]
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        for i, (item, file) in enumerate(zip(items, files)):
            if i % processes != rank:
                continue
            if file.exists():
                self.jobs_reused += 1
                continue
            output = {k: v.detach().contiguous().cpu() for k, v in function(item).items()}
            folder.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f".{file.name}.tmp-{rank}")
            save_file(output, str(tmp))
            os.replace(tmp, file)
            self.jobs_run += 1
        self.accelerator.wait_for_everyone()
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise RuntimeError(f"Job outputs missing after the barrier: {missing[:3]}")
        return [load_file(str(file)) for file in files]

    # ---------------------------------------------------------------------------------------------- results
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def write_result(self, stage: str, result: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            write_json_atomic(self.stage_dir(stage) / "result.json", result)

    def result(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_dir(stage) / "result.json"
        return json.loads(path.read_text()) if path.is_file() else None


def unexpected_checkpoint_files(root: Path) -> list[Path]:
    """Files under `root` that this package never writes (temporary files of a killed run are fine)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix not in CHECKPOINT_SUFFIXES)
