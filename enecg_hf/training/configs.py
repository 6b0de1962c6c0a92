"""The config of every model of a run: a file of `hub_configs/` (or any JSON path), the task, and the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..configuration_enecg import SINGLE_TASK_DEFAULTS, EnECGConfig, task_entries
from ..data.tasks import TaskSpec
from .arguments import TrainScriptArguments
from .errors import TrainingSetupError


# The repository's hub_configs/, reached through the package's `hub_configs` link and shipped in wheels as package data.
HUB_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "hub_configs"


def resolve_config_path(config: str) -> Path:
    """A config path, or the name of a file in `hub_configs/` (found in a checkout and in an installed wheel)."""
    for candidate in (Path(config), HUB_CONFIGS_DIR / config, HUB_CONFIGS_DIR / f"{config}.json"):
        if candidate.is_file():
            return candidate
    raise TrainingSetupError(f"Config {config!r} not found (a JSON path, or a name in {HUB_CONFIGS_DIR})")


# The task fields of a config file (of either shape: `tasks`, or one task at the top level); the run's tasks replace
# them.
TASK_FILE_FIELDS = (*SINGLE_TASK_DEFAULTS, "problem_type", "id2label", "label2id", "num_labels", "tasks")


def build_config(args: TrainScriptArguments, labels: TaskSpec | list[TaskSpec], config_dict: dict[str, Any]
                 ) -> EnECGConfig:
    """The config of every model of the run: the file's, with the run's tasks `labels` (one `TaskSpec` is a list of
    one) and the command-line overrides. A task's `loss_weight` in the file is kept."""
    specs = [labels] if isinstance(labels, TaskSpec) else list(labels)
    data = {k: v for k, v in config_dict.items() if k not in TASK_FILE_FIELDS}
    weights = {task["name"]: task.get("loss_weight", 1.0) for task in task_entries(config_dict)}
    data["tasks"] = [{**spec.task_entry(), "loss_weight": weights.get(spec.name, 1.0)} for spec in specs]
    if args.experts:
        known = [e["name"] for e in data["experts"]]
        unknown = [name for name in args.experts if name not in known]
        if unknown:
            raise TrainingSetupError(f"--experts: unknown expert(s) {unknown}; the config has {known}")
        data["experts"] = [e for e in data["experts"] if e["name"] in args.experts]
    if args.gate:
        data["gate_type"] = args.gate
    if args.gate_input:
        data["gate_input"] = args.gate_input
    if args.adaptation:
        data["adaptation"] = args.adaptation
    try:
        return EnECGConfig(**data)
    except ValueError as err:
        raise TrainingSetupError(f"Invalid config: {err}") from err


__all__ = ["HUB_CONFIGS_DIR", "resolve_config_path", "build_config"]
