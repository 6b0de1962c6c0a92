"""EnECG model configuration."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any, Sequence

from transformers import PreTrainedConfig

from .preprocessing_enecg import STANDARD_LEAD_NAMES

# The expert types a config may name; `expert_registry.expert_class` maps each to the class that implements it.
EXPERT_TYPES = ("moment", "dlinear", "timesnet", "tempo", "ecgfm", "features", "openecg", "deepfade", "median_beat")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
HEAD_TYPES = ("linear_ffn", "ffn")
REGRESSION_LOSSES = ("huber", "mse")
ADAPTATIONS = ("lora", "full")
NORMALIZATIONS = ("record", "lead", "none")


@dataclass
class EnECGExpertConfig:
    """Settings of one expert, stored in `EnECGConfig.experts` as a plain dict.

    Args:
        name: Unique name of the expert in the ensemble (used in outputs and weight keys).
        type: One of `EXPERT_TYPES`.
        input_length: Samples per lead the backbone receives; the record is resampled to it.
        leads: Lead names (from `EnECGConfig.lead_names`) the expert reads, in order.
        pretrained: Where the backbone weights come from: a Hub repo id, a local folder, a file shipped in an
            installed package (`"package:openecg/models/codec_v6.pt"`, for the experts that read one), or `None` for
            random weights (allowed, and logged loudly).
        settings: Architecture settings of the backbone (see each expert's `PRESETS`); a `preset` key picks
            named defaults that the other keys override.
    """

    name: str
    type: str
    input_length: int
    leads: list[str] = field(default_factory=lambda: list(STANDARD_LEAD_NAMES))
    pretrained: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], index: int = 0) -> "EnECGExpertConfig":
        if isinstance(data, EnECGExpertConfig):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"experts[{index}] must be a dict, got {type(data).__name__}")
        unknown = set(data) - {"name", "type", "input_length", "leads", "pretrained", "settings"}
        if unknown:
            raise ValueError(f"experts[{index}] has unknown keys {sorted(unknown)}")
        for key in ("name", "type", "input_length"):
            if key not in data:
                raise ValueError(f"experts[{index}].{key} is required")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# What the learned gate reads per record (`EnECGConfig.gate_input`).
GATE_INPUTS = ("leads", "predictions")
# Fields of one entry of `EnECGConfig.tasks`; `name` and `problem_type` are required (and `class_names` for a
# classification). `num_labels` is only written for a regression with several outputs (a folder of an earlier release).
TASK_FIELDS = ("name", "problem_type", "unit", "class_names", "target_mean", "target_std", "class_weights",
               "loss_weight", "logit_temperature", "num_labels")
# The fields of a config saved before every model was a list of tasks (its one task at the top level), with their
# defaults; `EnECGConfig` maps them into its one task (`single_task_entry`). `PreTrainedConfig`'s own `problem_type`,
# `id2label`, `label2id` and `num_labels` are read for it too, and otherwise unused.
SINGLE_TASK_DEFAULTS = {"label_name": None, "label_unit": None, "target_mean": 0.0, "target_std": 1.0,
                        "class_weights": None, "logit_temperature": 1.0}
# The name of the one task of an earlier single-task config that named no label.
UNNAMED_TASK = "label"


class EnECGTaskConfig:
    """One task of a model: a live view of its entry in `EnECGConfig.tasks` (a plain dict, so the config saves as
    JSON), which reads the task's own fields (`problem_type`, `num_labels`, `id2label`, `label_name`, `label_unit`,
    `target_mean`, `target_std`, `class_weights`, `logit_temperature`, `loss_weight`) and falls back to the model
    config for what all tasks share (`gate_type`, `expert_loss_weight`, `adaptation`...). Setting a task field writes
    the entry.

    Entry fields: `name` (a dataset column, e.g. one of `enecg_hf.data.TASKS`), `problem_type`, `unit` (regression),
    `class_names` (classification), `target_mean` / `target_std` (regression target scaling, set by training),
    `class_weights` (cross-entropy weights, set by training), `logit_temperature` (calibration, set by training),
    `loss_weight` (weight of this task's loss in the sum, default 1.0: every task's loss on its standardised scale,
    weighted equally).
    """

    def __init__(self, entry: dict[str, Any], config: "EnECGConfig"):
        object.__setattr__(self, "_entry", entry)
        object.__setattr__(self, "_config", config)

    @property
    def label_name(self) -> str:
        return self._entry["name"]

    @property
    def label_unit(self) -> str | None:
        return self._entry.get("unit")

    @property
    def is_regression(self) -> bool:
        return self._entry["problem_type"] == "regression"

    @property
    def target_scaling_is_set(self) -> bool:
        """Whether a regression's target scaling was set from training labels (it is not the defaults 0 and 1); a
        classification has none to set."""
        return not self.is_regression or (self.target_mean, self.target_std) != (0.0, 1.0)

    @property
    def num_labels(self) -> int:
        if self.is_regression:
            return int(self._entry.get("num_labels", 1))
        return len(self._entry["class_names"])

    @property
    def id2label(self) -> dict[int, str]:
        names = self._entry.get("class_names") or [f"LABEL_{i}" for i in range(self.num_labels)]
        return dict(enumerate(names))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # (copy and pickle probe for dunders before `_config` exists)
            raise AttributeError(name)
        if name in TASK_FIELDS:
            return self._entry.get(name, TASK_DEFAULTS.get(name))
        return getattr(self._config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in TASK_FIELDS:
            raise AttributeError(f"{name!r} is shared by every task: set it on the model config")
        self._entry[name] = value

    def __repr__(self) -> str:
        return f"EnECGTaskConfig({self._entry})"


TASK_DEFAULTS = {"unit": None, "class_names": None, "target_mean": 0.0, "target_std": 1.0, "class_weights": None,
                 "loss_weight": 1.0, "logit_temperature": 1.0}


# What a saved config without the key meant when it was written (see `EnECGConfig.from_dict`).
SAVED_BEFORE_DEFAULTS = {"head_standardize": False, "head_type": "ffn", "regression_loss": "mse"}


def single_task_entry(fields: dict[str, Any]) -> dict[str, Any]:
    """The `tasks` entry of a config written before every model was a list of tasks, from its top-level
    `label_name`, `problem_type`, `label_unit`, `id2label` (or `num_labels`), `target_mean`, `target_std`,
    `class_weights` and `logit_temperature` (a task named `label` if it named none). Also what
    `EnECGConfig(label_name=..., problem_type=...)` builds."""
    get = {**SINGLE_TASK_DEFAULTS, **{k: v for k, v in fields.items() if v is not None}}.get
    problem_type = get("problem_type") or "regression"
    entry = {"name": get("label_name") or UNNAMED_TASK, "problem_type": problem_type}
    id2label = get("id2label")
    count = len(id2label) if id2label else get("num_labels")
    if problem_type == "regression":
        entry["unit"] = get("label_unit")
        if count is not None and int(count) != 1:
            entry["num_labels"] = int(count)
    else:
        names = {int(k): v for k, v in id2label.items()} if id2label else {}
        entry["class_names"] = [names.get(i, f"LABEL_{i}") for i in range(int(count if count is not None else 2))]
    entry.update({k: get(k) for k in ("target_mean", "target_std", "class_weights", "logit_temperature")})
    return entry


def task_entries(config_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """The task entries of a config dict of either shape: its `tasks`, or its one task at the top level."""
    return list(config_dict.get("tasks") or [single_task_entry(config_dict)])


class EnECGConfig(PreTrainedConfig):
    r"""
    Configuration of an [`EnECGModel`]: frozen expert backbones, one FFN head per expert and a gating network.

    Args:
        experts (`list[dict]`):
            One dict per expert with the fields of [`EnECGExpertConfig`]: `name`, `type`, `input_length`, `leads`,
            `pretrained` and `settings`.
        sampling_rate (`int`, defaults to 500):
            Sampling rate (Hz) of `input_values`.
        input_length (`int`, defaults to 5000):
            Samples per lead of `input_values` (10 s at 500 Hz).
        lead_names (`list[str]`):
            Names of the rows of `input_values`, defaults to the 12 standard leads.
        normalization (`str`, defaults to `"record"`):
            Applied by the model to every input: `"record"` z-scores the whole record at once (the research code),
            `"lead"` z-scores each lead, `"none"` leaves it alone.
        head_hidden_size (`int`, defaults to 256):
            Width of the two hidden layers of each expert head.
        head_dropout (`float`, defaults to 0.0):
            Dropout between head layers.
        head_standardize (`bool`, defaults to `True`):
            Each head standardises its expert's embedding with a per-column mean and standard deviation fitted on the
            training records (stored in the head as `input_mean` / `input_std`) and clips it to +-`head_input_clip`.
            Folders saved before this option existed load with `False` (their heads never standardised).
        head_input_clip (`float`, defaults to 6.0):
            Bound of a standardised embedding value entering the FFN.
        head_linear_clip (`float`, defaults to 24.0):
            Bound of a standardised embedding value entering a head's linear path: four times the FFN's, far beyond
            the training records' range (a measurement keeps extrapolating: RR of 2 s is 6 standard deviations out on
            LUDB), but finite, so that one broken embedding column of one record cannot produce an absurd prediction
            (unbounded, an openecg age head predicted thousands of years for one PTB-XL record).
        head_type (`str`, defaults to `"linear_ffn"`):
            `"linear_ffn"`: each head is a linear map of the standardised embedding plus the FFN, whose output layer
            starts at zero: training fits the linear path as a convex problem (its L2 penalty chosen by inner
            cross-validation) and the FFN only learns what is left, for as many epochs as held-out records confirm
            (often none). A measurement that carries the answer then passes through linearly and extrapolates.
            `"ffn"`: the paper's FFN alone. Folders saved before this option existed load with `"ffn"`.
        regression_loss (`str`, defaults to `"huber"`):
            Loss of a regression on its standardised target: `"huber"` (quadratic within `huber_delta`, linear
            beyond: a few wrong labels or failed measurements do not pull the fit, and its minimiser is close to the
            median, which the MAE scores) or `"mse"`. Folders saved before this option existed load with `"mse"`.
        huber_delta (`float`, defaults to 0.05):
            Where the Huber loss turns from quadratic to linear, in standard deviations of the target; the loss is
            divided by it, so that beyond it the loss is the absolute error.
        expert_loss_weight (`float`, defaults to 1.0):
            `forward`'s loss is the mixture's loss plus this weight times the mean of every head's own loss on its
            prediction (the paper's step 1: each head is a predictor by itself); 0 supervises only the mixture.
        gate_leads (`list[str]`, defaults to `["II"]`):
            Leads the gating network reads.
        gate_input_length (`int`, defaults to 5000):
            Samples per lead the gate reads after resampling.
        gate_hidden_size (`int`, defaults to 256):
            Width of the gate's hidden layer.
        gate_type (`str`, defaults to `"learned"`):
            `"learned"` (the MLP gate) or `"uniform"` (plain average of the experts, the ablation).
        gate_input (`str`, defaults to `"leads"`):
            What the learned gate reads per record: `"leads"`, the samples of `gate_leads` (the paper); or
            `"predictions"`, every head's prediction of the task (standardised with the statistics of the
            out-of-fold predictions the gate was fitted on), so that the weights can follow what the experts say
            about the record (`train.py --gate_input predictions`). The shipped model (`enecg-base`, 1,628 records)
            uses it: RR 12.5 against 16.3 ms and age 10.21 against 10.28 y with the stacked weights alone, sex and
            rhythm the same (docs/training.md, "Routing at this size").
        adaptation (`str`, defaults to `"lora"`):
            `"lora"`: heads and gate frozen, PEFT LoRA adapters on their linear layers are trained (the paper).
            `"full"`: heads and gate are trained directly.
        lora_r, lora_alpha, lora_dropout (defaults 8, 32, 0.05):
            LoRA rank, scaling and dropout.
        save_backbones (`bool`, defaults to `True`):
            Save expert backbone weights inside the model folder (self-contained). With `False`, experts that have
            a `pretrained` source are left out and re-attached from it on load.
        max_input_seconds (`float`, defaults to 60.0):
            Longest record the serving code accepts before cropping.
        tasks (`list[dict]`):
            What the model predicts: one dict per task, with its `name` (the dataset column), `problem_type`
            (`"regression"` (Huber or MSE), `"single_label_classification"` (cross-entropy) or
            `"multi_label_classification"` (BCE)), `unit` (regression) or `class_names` (classification), and what
            training sets: `target_mean` / `target_std` (a regression's heads learn `(label - target_mean) /
            target_std`; the model reports predictions in the label's unit), `class_weights` (cross-entropy
            weights), `logit_temperature` (temperature scaling: a classification's mixed logits are divided by it;
            it changes no predicted class, and the heads' own `expert_logits` are not scaled), and `loss_weight`
            (see [`EnECGTaskConfig`]). Every task has its own head per expert and its own gate over the shared
            frozen experts, which run once per record for all tasks; a single-task model is a model with one task.

            A config of an earlier release, which held its one task at the top level (`label_name`, `problem_type`,
            `label_unit`, `id2label` / `num_labels`, `target_mean`, `target_std`, `class_weights`,
            `logit_temperature`), loads as a one-task model, and `EnECGConfig(label_name=..., problem_type=...)`
            still builds one; both save as `tasks`. With neither, the model has one regression task named `label`.
    """

    model_type = "enecg"

    experts: list[dict[str, Any]] | None = None
    sampling_rate: int = 500
    input_length: int = 5000
    lead_names: list[str] | None = None
    normalization: str = "record"
    head_hidden_size: int = 256
    head_dropout: float = 0.0
    head_standardize: bool = True
    head_input_clip: float = 6.0
    head_linear_clip: float = 24.0
    head_type: str = "linear_ffn"
    regression_loss: str = "huber"
    huber_delta: float = 0.05
    expert_loss_weight: float = 1.0
    gate_leads: list[str] | None = None
    gate_input_length: int = 5000
    gate_hidden_size: int = 256
    gate_type: str = "learned"
    gate_input: str = "leads"
    adaptation: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    save_backbones: bool = True
    max_input_seconds: float = 60.0
    tasks: list[dict[str, Any]] | None = None

    def __post_init__(self, **kwargs):
        if self.experts is None:
            self.experts = [
                {"name": "dlinear", "type": "dlinear", "input_length": 500, "leads": ["II"], "settings": {"preset": "tiny"}}
            ]
        if self.lead_names is None:
            self.lead_names = list(STANDARD_LEAD_NAMES)
        if self.gate_leads is None:
            self.gate_leads = ["II"]
        self._tasks_from_single_task_fields(kwargs)
        super().__post_init__(**kwargs)
        self.experts = [EnECGExpertConfig.from_dict(e, i).to_dict() for i, e in enumerate(self.experts)]
        self._validate()

    def _tasks_from_single_task_fields(self, kwargs: dict[str, Any]) -> None:
        """Map the single-task fields of an earlier release (in `kwargs`, and `PreTrainedConfig`'s `problem_type`
        and `id2label`) into `tasks` (`single_task_entry`); `PreTrainedConfig`'s label fields are then left at
        their defaults, which are not saved."""
        fields = {name: kwargs.pop(name) for name in [*SINGLE_TASK_DEFAULTS, "num_labels", "label2id"]
                  if name in kwargs}
        fields.update(problem_type=self.problem_type, id2label=self.id2label)
        if self.tasks is None:
            self.tasks = [single_task_entry(fields)]
        else:
            given = [name for name, default in {**SINGLE_TASK_DEFAULTS, "problem_type": None}.items()
                     if fields.get(name, default) != default]
            if given:
                raise ValueError(f"EnECGConfig.{given[0]}: the config has `tasks`, which hold each task's fields "
                                 f"(the single-task fields {given} would be ignored)")
        self.tasks = [{**TASK_DEFAULTS, **dict(task)} if isinstance(task, dict) else task for task in self.tasks]
        self.problem_type, self.id2label, self.label2id = None, None, None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "EnECGConfig":
        # Folders saved before an option existed load as they were saved: options added later default to what the
        # code did then (no head standardisation, the FFN head alone, MSE), not to today's defaults.
        config_dict = {**SAVED_BEFORE_DEFAULTS, **config_dict}
        return super().from_dict(config_dict, **kwargs)

    @property
    def expert_configs(self) -> list[EnECGExpertConfig]:
        return [EnECGExpertConfig(**e) for e in self.experts]

    @property
    def expert_names(self) -> list[str]:
        return [e["name"] for e in self.experts]

    @property
    def task_configs(self) -> list[EnECGTaskConfig]:
        """One config view per task (a single-task model has one)."""
        return [EnECGTaskConfig(task, self) for task in self.tasks]

    @property
    def task_names(self) -> list[str]:
        return [task.label_name for task in self.task_configs]

    def _validate(self) -> None:
        """Fail at construction, naming the field, rather than deep inside a forward pass."""

        def fail(field_name: str, message: str) -> None:
            raise ValueError(f"EnECGConfig.{field_name}: {message}")

        if not self.experts:
            fail("experts", "at least one expert is required")
        self._validate_tasks(fail)
        if self.adaptation not in ADAPTATIONS:
            fail("adaptation", f"must be one of {ADAPTATIONS}, got {self.adaptation!r}")
        if self.normalization not in NORMALIZATIONS:
            fail("normalization", f"must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.head_type not in HEAD_TYPES:
            fail("head_type", f"must be one of {HEAD_TYPES}, got {self.head_type!r}")
        if self.regression_loss not in REGRESSION_LOSSES:
            fail("regression_loss", f"must be one of {REGRESSION_LOSSES}, got {self.regression_loss!r}")
        if not float(self.huber_delta) > 0.0:
            fail("huber_delta", f"must be positive, got {self.huber_delta}")
        if self.gate_type not in ("learned", "uniform"):
            fail("gate_type", f"must be 'learned' or 'uniform', got {self.gate_type!r}")
        if self.gate_input not in GATE_INPUTS:
            fail("gate_input", f"must be one of {GATE_INPUTS}, got {self.gate_input!r}")
        for name in ("sampling_rate", "input_length", "head_hidden_size", "gate_input_length", "gate_hidden_size", "lora_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            fail("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= float(self.head_dropout) < 1.0:
            fail("head_dropout", f"must be in [0, 1), got {self.head_dropout}")
        if not float(self.head_input_clip) > 0.0:
            fail("head_input_clip", f"must be positive, got {self.head_input_clip}")
        if not float(self.head_linear_clip) > 0.0:
            fail("head_linear_clip", f"must be positive, got {self.head_linear_clip}")
        if not float(self.expert_loss_weight) >= 0.0:
            fail("expert_loss_weight", f"must be >= 0, got {self.expert_loss_weight}")
        if len(set(self.lead_names)) != len(self.lead_names):
            fail("lead_names", f"duplicate lead names in {self.lead_names}")
        unknown_gate = [lead for lead in self.gate_leads if lead not in self.lead_names]
        if not self.gate_leads or unknown_gate:
            fail("gate_leads", f"unknown or empty leads {unknown_gate or self.gate_leads}; known: {self.lead_names}")
        names = self.expert_names
        if len(set(names)) != len(names):
            fail("experts", f"expert names must be unique, got {names}")
        for i, expert in enumerate(self.expert_configs):
            where = f"experts[{i}] ({expert.name!r})"
            if expert.type not in EXPERT_TYPES:
                fail("experts", f"{where}.type must be one of {EXPERT_TYPES}, got {expert.type!r}")
            if not isinstance(expert.input_length, int) or expert.input_length <= 0:
                fail("experts", f"{where}.input_length must be a positive integer, got {expert.input_length!r}")
            unknown = [lead for lead in expert.leads if lead not in self.lead_names]
            if not expert.leads or unknown:
                fail("experts", f"{where}.leads has unknown or no leads {unknown or expert.leads}")
            if not isinstance(expert.settings, dict):
                fail("experts", f"{where}.settings must be a dict")
            # Checks of one expert type's own settings are its class's `validate_config`, run when the model is built.

    def _validate_tasks(self, fail) -> None:
        if not isinstance(self.tasks, list) or not self.tasks:
            fail("tasks", f"must be a non-empty list of task dicts, got {self.tasks!r}")
        for i, task in enumerate(self.tasks):
            if not isinstance(task, dict):
                fail("tasks", f"tasks[{i}] must be a dict, got {type(task).__name__}")
            unknown = set(task) - set(TASK_FIELDS)
            if unknown:
                fail("tasks", f"tasks[{i}] has unknown keys {sorted(unknown)}; known: {list(TASK_FIELDS)}")
            where = f"tasks[{i}] ({task.get('name')!r})"
            if not isinstance(task.get("name"), str) or not task["name"] or "." in task["name"]:
                fail("tasks", f"tasks[{i}].name is required, without dots (it names the task's modules), got "
                     f"{task.get('name')!r}")
            if task.get("problem_type") not in PROBLEM_TYPES:
                fail("tasks", f"{where}.problem_type must be one of {PROBLEM_TYPES}, got {task.get('problem_type')!r}")
            classes = task.get("class_names")
            if task["problem_type"] != "regression" and (not isinstance(classes, list) or len(classes) < 2):
                fail("tasks", f"{where}.class_names must list at least 2 classes, got {classes!r}")
            outputs = task.get("num_labels", 1)
            if "num_labels" in task and (task["problem_type"] != "regression" or not isinstance(outputs, int)
                                         or isinstance(outputs, bool) or outputs < 1):
                fail("tasks", f"{where}.num_labels is a regression's number of outputs (a positive integer; a "
                     f"classification's are its class_names), got {outputs!r}")
            if not float(task["target_std"]) > 0.0:
                fail("tasks", f"{where}.target_std must be positive, got {task['target_std']}")
            temperature = float(task.get("logit_temperature", 1.0))
            if not (math.isfinite(temperature) and temperature > 0.0):
                fail("tasks", f"{where}.logit_temperature must be a positive number, got {temperature}")
            if not float(task["loss_weight"]) >= 0.0:
                fail("tasks", f"{where}.loss_weight must be >= 0, got {task['loss_weight']}")
            weights = task["class_weights"]
            if weights is not None and (task["problem_type"] != "single_label_classification"
                                        or len(weights) != len(classes) or not all(float(w) > 0 for w in weights)):
                fail("tasks", f"{where}.class_weights needs single-label classification and one positive weight "
                     f"per class, got {weights}")
        names = [task["name"] for task in self.tasks]
        if len(set(names)) != len(names):
            fail("tasks", f"task names must be unique, got {names}")


def declared_fields(config: EnECGConfig, names: Sequence[str]) -> SimpleNamespace:
    """The fields `names` of `config` and nothing else: reading another one is an `AttributeError`.

    Code whose output is stored under a fingerprint of the fields it reads (the frozen pass,
    `EnECGModel.frozen_columns`) reads the config through this view of its declared fields, so that a field it reads
    is a field the fingerprint covers."""
    return SimpleNamespace(**{name: getattr(config, name) for name in names})


__all__ = ["EnECGConfig", "EnECGExpertConfig", "EnECGTaskConfig", "STANDARD_LEAD_NAMES", "EXPERT_TYPES",
           "declared_fields", "single_task_entry", "task_entries"]
