"""Checkpoints of a training run: every job of a fit (`fitting.JobRunner`) kept as a safetensors file.

    OUT/checkpoints/run.json                              arguments that determine the result
    OUT/checkpoints/<stage>/<step>/job-<i>.safetensors    output of one job (inner-fold heads, final heads, gate)
    OUT/checkpoints/<stage>/result.json                   scores of a finished CV fold

Jobs are spread round-robin over the processes of an `accelerate launch` run; after a barrier every process reads all
outputs, so N processes end with the model one process would train. A job whose file exists is not run again: a
killed run resumed with `--resume_from_checkpoint latest` reaches the uninterrupted result. Files are written to a
temporary name and renamed, so a half-written file is never read, and nothing here is ever unpickled.

A job file carries the digest of its tensors (`features.store.tensors_digest`, in the safetensors metadata). On resume
a job file that cannot be read or whose tensors no longer match it (truncated, overwritten) is named in a warning and
the job is computed again, as is a fold whose `result.json` cannot be read: a job's output depends only on the run's
arguments and its name (its seed), so the run still reaches the uninterrupted result. `run.json` is not recomputed:
it is what says the checkpoints are this run's (`run._check_resume` refuses an unreadable one).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..features.store import tensors_digest
from .errors import TrainingSetupError
from .files import write_json_atomic


logger = logging.getLogger(__name__)

# What a checkpoint folder may hold; anything else (a pickle, say) is refused on resume rather than read.
CHECKPOINT_SUFFIXES = (".safetensors", ".json")
DIGEST_KEY = "enecg_tensors_digest"  # safetensors metadata of a job file


class CorruptCheckpoint(Exception):
    pass


def save_job(output: dict[str, torch.Tensor], file: Path, rank: int) -> None:
    """Write a job's tensors with their digest, under a temporary name renamed into place."""
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp-{rank}")
    save_file(output, str(tmp), metadata={DIGEST_KEY: tensors_digest(output)})
    os.replace(tmp, file)


def load_job(file: Path) -> dict[str, torch.Tensor]:
    """A job's tensors, checked against the digest written with them. Raises `CorruptCheckpoint` with the reason."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            expected = (handle.metadata() or {}).get(DIGEST_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ValueError...
        raise CorruptCheckpoint(f"{type(error).__name__}: {error}") from error
    if expected is None:
        raise CorruptCheckpoint("it carries no digest of its tensors")
    if tensors_digest(tensors) != expected:
        raise CorruptCheckpoint("its tensors do not match the digest written with them")
    return tensors


class CheckpointedJobRunner:
    """`JobRunner` of a training run (see the module docstring)."""

    def __init__(self, root: Path, accelerator):
        self.root = root
        self.accelerator = accelerator
        self.jobs_run = 0  # jobs computed by this process
        self.jobs_reused = 0  # jobs of this process found finished (a resumed run)

    def map(self, name: str, function: Callable[[Any], dict[str, torch.Tensor]], items: Sequence[Any]
            ) -> list[dict[str, torch.Tensor]]:
        folder = self.root / name
        files = [folder / f"job-{i}.safetensors" for i in range(len(items))]
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        for i, (item, file) in enumerate(zip(items, files)):
            if i % processes != rank:
                continue
            if file.exists():
                try:
                    load_job(file)
                    self.jobs_reused += 1
                    continue
                except CorruptCheckpoint as error:
                    logger.warning("Checkpoint %s is corrupt (%s): its job is computed again", file, error)
            output = {k: v.detach().contiguous().cpu() for k, v in function(item).items()}
            save_job(output, file, rank)
            self.jobs_run += 1
        self.accelerator.wait_for_everyone()
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise RuntimeError(f"Job outputs missing after the barrier: {missing[:3]}")
        outputs = []
        for file in files:
            try:
                outputs.append(load_job(file))
            except CorruptCheckpoint as error:  # written and checked in this run: changed by something else since
                raise TrainingSetupError(f"Checkpoint {file} is corrupt ({error}) although this run wrote it: is "
                                         "another run writing to the same --output_dir?") from None
        return outputs

    # ---------------------------------------------------------------------------------------------- results
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def write_result(self, stage: str, result: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            write_json_atomic(self.stage_dir(stage) / "result.json", result)

    def result(self, stage: str) -> dict[str, Any] | None:
        """The scores of a finished CV fold, or None (not finished, or its file is unreadable: it is scored again)."""
        path = self.stage_dir(stage) / "result.json"
        if not path.is_file():
            return None
        try:
            result = json.loads(path.read_text())
            if not isinstance(result, dict) or not all(isinstance(result.get(k), dict) for k in ("metrics",
                                                                                                 "baseline")):
                raise ValueError("not the result of a fold (no 'metrics' and 'baseline')")
        except (OSError, UnicodeDecodeError, ValueError) as error:
            logger.warning("Checkpoint %s is unreadable (%s): the fold is fitted (from its checkpointed jobs) and "
                           "scored again", path, error)
            return None
        return result


def unexpected_checkpoint_files(root: Path) -> list[Path]:
    """Files under `root` that this package never writes (temporary files of a killed run are fine)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix not in CHECKPOINT_SUFFIXES)
