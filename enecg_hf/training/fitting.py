"""How EnECG learns: fit heads and gate on expert features held in memory (plain PyTorch, usable from a notebook).

The default strategy, `"stacked"`, is the paper's method made to work on a few hundred records:

1. **Heads** (the paper's step 1). Every expert's head is trained on its own loss, so each is a predictor by itself.
   How long is decided by cross-validated early stopping: the heads are trained on k-1 inner folds of the training
   records for up to `epochs` epochs, the held-out inner fold is predicted after every epoch, and each expert trains
   for the epoch count with the lowest loss over those out-of-fold predictions. The final heads are then trained on
   all training records for that many epochs.
2. **Gate** (steps 2-3). It is fitted on the heads' *out-of-fold* predictions: in-sample predictions of a head that
   memorised its training records say nothing about which expert to trust. First its input-independent log-weights
   (`EnECGGate.set_stacked_log_weights`: stacking on the simplex), then its input-dependent part, which starts at
   zero and trains for a number of epochs cross-validated over those records with the one-standard-error rule (0
   included): it moves away from the stacked weights only as far as held-out records clearly confirm.
3. The prediction is `sum_i W_i(x) * head_i(x)`, the model's forward.

`"joint"` is the research code's single stage: heads and gate trained together for `epochs` epochs on the model's
loss (the mixture's loss plus `config.expert_loss_weight` times the heads' own losses).

A fit is a list of independent jobs (inner-fold head fits, then the final heads and the gate) run through a
`runner`: in process by default; the training run's runner spreads them over processes and keeps their outputs as
safetensors checkpoints (`training.jobs`). Every job re-initialises the heads and gate from `settings.seed` (whatever
the model learned before: a fit never starts from another fold's weights) and seeds itself, so a job gives the same
output wherever and whenever it runs.

    from enecg_hf.features import FeatureTable
    from enecg_hf.training.fitting import FitSettings, fit_enecg, predict
    table = FeatureTable.from_model(model, signals, labels, groups)   # runs the frozen experts once
    report = fit_enecg(model, table, train_rows, FitSettings())
    out = predict(model, table, test_rows)                             # logits in the label's unit
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.splits import institution
from ..features.table import FeatureTable  # the table a fit reads (re-exported: its home is enecg_hf.features)
from ..modeling_enecg import EnECGModel, EnECGTaskEnsemble, mix_experts
from .linear_heads import DEFAULT_L2_GRID, LINEAR_SELECTIONS, fit_linear_paths
from .selection import fewest_within_paired_error, one_standard_error_epoch


logger = logging.getLogger(__name__)

FIT_STRATEGIES = ("stacked", "joint")
# What a fit trains: one task of a model (`model.tasks[name]`): its `heads`, `gate`, `task_config` and forward on
# expert features. `fit_enecg` and `predict` also take a single-task `EnECGModel` for its only task (`task_of`).
TaskModel = EnECGTaskEnsemble
CLASS_WEIGHTINGS = ("balanced", "none")
INNER_GROUPS = ("source", "subject")
STACKINGS = ("sparse", "lowest", "full")
FFN_EPOCHS = ("one_standard_error", "lowest")
CALIBRATIONS = ("temperature", "none")
# The log-weight of an expert the stacking leaves out: softmax gives it exactly 0 (also in float16).
EXCLUDED_LOG_WEIGHT = -1e4


@dataclass
class FitSettings:
    """Hyperparameters of one fit (`train.py` exposes each as a flag of the same name).

    Args:
        strategy: `"stacked"` (default, see the module docstring) or `"joint"` (the research code's single stage).
        epochs: most epochs of a head fit (`stacked`: early-stopped by the inner folds; `joint`: all of them).
        learning_rate, weight_decay, batch_size: AdamW and minibatches of the head (and joint) fits.
        inner_folds: subject-wise inner folds that give the out-of-fold predictions (`stacked`).
        gate_epochs, gate_learning_rate: most epochs and learning rate of the gate's input-dependent part (its
            epoch count is cross-validated over the out-of-fold predictions, 0 included; `gate_epochs=0` keeps only
            the stacked weights).
        gate_weight_floor: where the input-dependent part starts: the stacked weights with every expert at least
            this weight (renormalised). Sparse stacking gives a left-out expert a weight of exactly 0, where the
            softmax passes it no gradient, so a gate started there could never route to it (0: start at the stacked
            weights themselves). Epoch 0 of the cross-validation - what the gate keeps unless held-out records ask
            for more - is always the stacked weights without the floor.
        class_weighting: `"balanced"` weighs each class of single-label classification by the inverse of its
            frequency in the training records (so a rare rhythm is not ignored), `"none"` weighs records equally.
        early_stopping: `False` trains every head for all `epochs` (an ablation; the inner folds still give the
            gate its out-of-fold predictions).
        patience: an inner-fold head fit (or a cross-validation fit of the gate) ends once no held-out loss improved
            for this many epochs; 0 trains every fit for all its epochs. Only saves time: the chosen epoch counts
            are the same unless a curve improves again after `patience` flat epochs.
        gate_predictions: `"out_of_fold"` (default) or `"in_sample"`: the gate is fitted on the final heads'
            predictions of their own training records (an ablation: it shows why out-of-fold predictions matter).
        inner_groups: `"subject"` (default): subject-wise inner folds. `"source"`: when the training records come
            from two or more institutions (`FeatureTable.sources`, `enecg_hf.data.institution`), the inner folds hold
            out whole institutions, so that the heads' penalties and epochs, the stacked gate weights and the gate's
            input-dependent part are all chosen on records from elsewhere (an expert that only recognises the
            source earns nothing there; from one institution, or without sources, subject-wise). On the few
            institutions of ../shared/data it lost on leave-one-source-out (docs/benchmarks.md): held-out
            institutions of 20-300 records make noisy choices.
        stacking: which experts the gate's stacked weights may go to. The experts enter in the order of their own
            out-of-fold loss, and each number of them is stacked and scored over the inner folds. `"sparse"`
            (default): the fewest whose mixture's loss is within one standard error of the lowest, the error of
            their per-fold differences (`fewest_within_paired_error`); `"lowest"`: the number of lowest mean loss;
            `"full"`: every expert. The others get weight exactly 0.
        ffn_epochs: how many epochs the FFN of a linear-path head trains on top of its linear path:
            `"one_standard_error"` (default), the fewest whose out-of-fold loss over the inner folds is within one
            standard error of the lowest (0 included); `"lowest"`, the epoch count with the lowest out-of-fold loss.
        calibration: `"temperature"` (default): classification logits are divided by a temperature fitted on the
            training records' out-of-fold mixture (unweighted negative log-likelihood; `logit_temperature` of the
            task's config), so that the probabilities match how often the model is right (balanced class weights and
            averaging experts make them too soft or too sharp); no predicted class changes. `"none"`: 1.
            The joint strategy has no out-of-fold predictions and keeps 1. Not a `train.py` flag.
        linear_l2: the L2 penalties tried for the heads' linear paths (`head_type="linear_ffn"`); each expert's is
            chosen by its out-of-fold loss over the inner folds (`linear_heads`). Not a `train.py` flag.
        linear_selection: which inputs each linear path reads (`linear_heads`): `"auto"` (default; for regression
            each expert's sparse path unless its ridge path's out-of-fold loss is lower by more than one paired
            standard error, ridge for classification), `"sparse"` (relaxed lasso: the fewest inputs within one
            paired standard error of the lowest out-of-fold loss) or `"ridge"` (all inputs). Not a `train.py` flag.
        seed: every job's seed derives from it.
    """

    strategy: str = "stacked"
    epochs: int = 100
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    inner_folds: int = 5
    gate_epochs: int = 100
    gate_learning_rate: float = 3e-3
    gate_weight_floor: float = 0.01
    class_weighting: str = "balanced"
    early_stopping: bool = True
    patience: int = 20
    gate_predictions: str = "out_of_fold"
    inner_groups: str = "subject"
    stacking: str = "sparse"
    ffn_epochs: str = "one_standard_error"
    calibration: str = "temperature"
    linear_l2: tuple[float, ...] = DEFAULT_L2_GRID
    linear_selection: str = "auto"
    seed: int = 42

    def __post_init__(self):
        if self.strategy not in FIT_STRATEGIES:
            raise ValueError(f"strategy must be one of {FIT_STRATEGIES}, got {self.strategy!r}")
        if self.gate_predictions not in ("out_of_fold", "in_sample"):
            raise ValueError(f"gate_predictions must be 'out_of_fold' or 'in_sample', got {self.gate_predictions!r}")
        if self.ffn_epochs not in FFN_EPOCHS:
            raise ValueError(f"ffn_epochs must be one of {FFN_EPOCHS}, got {self.ffn_epochs!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.stacking not in STACKINGS:
            raise ValueError(f"stacking must be one of {STACKINGS}, got {self.stacking!r}")
        if self.inner_groups not in INNER_GROUPS:
            raise ValueError(f"inner_groups must be one of {INNER_GROUPS}, got {self.inner_groups!r}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {self.class_weighting!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.strategy == "stacked" and self.inner_folds < 2:
            raise ValueError(f"inner_folds must be at least 2, got {self.inner_folds}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.gate_epochs < 0:
            raise ValueError(f"gate_epochs must be >= 0, got {self.gate_epochs}")
        if not 0 <= self.gate_weight_floor < 1:
            raise ValueError(f"gate_weight_floor must be in [0, 1), got {self.gate_weight_floor}")
        for name in ("learning_rate", "gate_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.linear_selection not in LINEAR_SELECTIONS:
            raise ValueError(f"linear_selection must be one of {LINEAR_SELECTIONS}, got {self.linear_selection!r}")
        self.linear_l2 = tuple(float(v) for v in self.linear_l2)
        if not self.linear_l2 or not all(v > 0 for v in self.linear_l2):
            raise ValueError(f"linear_l2 must be positive penalties, got {self.linear_l2}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobRunner(Protocol):
    """Runs the independent jobs of a fit and returns their outputs in order (see `training.jobs`)."""

    def map(self, name: str, function: Callable[[Any], dict[str, torch.Tensor]], items: Sequence[Any]
            ) -> list[dict[str, torch.Tensor]]: ...


class InProcessRunner:
    """Every job in this process, one after another."""

    def map(self, name, function, items):
        return [function(item) for item in items]


@dataclass
class FitReport:
    """What a fit decided: epochs per expert (of the FFN on top of the linear path, for `linear_ffn` heads: 0 is the
    linear path alone), out-of-fold losses, the stacked gate weights and the gate's epochs, each linear path's L2 and
    L1 penalties and how many inputs it reads, and the temperature of the classification logits
    (`logit_temperature`, 1.0 when not calibrated).
    `out_of_fold_predictions` (`stacked`): the heads' predictions of every training record by heads
    that never saw it, `(rows, experts, num_labels)` on the heads' scale (what the gate is fitted on; not saved),
    and `inner_folds`, the folds they come from (positions into the fit's rows; not saved)."""

    strategy: str
    expert_epochs: dict[str, int] = field(default_factory=dict)
    out_of_fold_loss: dict[str, float] = field(default_factory=dict)
    stacked_weights: dict[str, float] = field(default_factory=dict)
    gate_epochs: int = 0
    linear_l2: dict[str, float] = field(default_factory=dict)
    linear_l1: dict[str, float] = field(default_factory=dict)
    linear_inputs: dict[str, int] = field(default_factory=dict)
    logit_temperature: float = 1.0
    out_of_fold_predictions: torch.Tensor | None = field(default=None, repr=False)
    inner_folds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("out_of_fold_predictions", "inner_folds")}


def subject_folds(groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k folds of positions 0..n-1 with each group on one side (sklearn's shuffled `GroupKFold`)."""
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    k = min(k, len(set(groups.tolist())))
    if k < 2:
        raise ValueError("the training records come from a single subject: at least 2 are needed for inner folds")
    splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(te)) for tr, te in splitter.split(np.arange(len(groups)), groups=groups)]


def task_of(model: EnECGModel | TaskModel) -> TaskModel:
    """What a fit trains: a task of a model (`model.tasks[name]`) as it is, or a single-task model's only task."""
    if isinstance(model, EnECGTaskEnsemble):
        return model
    if len(model.tasks) != 1:
        raise ValueError(f"This model has several tasks ({model.config.task_names}): fit and predict each one, "
                         "model.tasks[name]")
    return next(iter(model.tasks.values()))


def reset_heads_and_gate(model: TaskModel, seed: int) -> None:
    """Draw the heads' and gate's initial weights again from `seed` (LoRA adapters: A random, B zero)."""
    torch.manual_seed(seed)
    model.init_heads_and_gate()


def head_and_gate_state(model: TaskModel) -> dict[str, torch.Tensor]:
    """Copy of everything but the frozen experts: heads (with standardisation buffers and LoRA) and gate."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("experts.")}


def job_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def prepare_targets(model: TaskModel, labels: torch.Tensor, weighting: str) -> None:
    """Set what the training records determine in the task's config: target scaling (regression) and class weights."""
    config = task_of(model).task_config
    if config.is_regression:
        values = labels.double()
        std = float(values.std(unbiased=False)) if len(values) > 1 else 0.0
        config.target_mean, config.target_std = float(values.mean()), std if std > 1e-8 else 1.0
    elif config.problem_type == "single_label_classification":
        config.class_weights = None
        config.logit_temperature = 1.0
        if weighting == "balanced":
            counts = torch.bincount(labels.long(), minlength=config.num_labels).double()
            present = counts > 0
            weights = torch.where(present, counts.sum() / (present.sum() * counts.clamp_min(1)), torch.ones_like(counts))
            config.class_weights = [round(float(w), 6) for w in weights]


def floored_log_weights(log_weights: torch.Tensor, floor: float) -> torch.Tensor:
    """The log-weights `(experts,)` of `softmax(log_weights)` with every weight raised to at least `floor` and
    renormalised (`floor=0`: `log_weights` unchanged)."""
    if floor <= 0:
        return log_weights
    weights = torch.softmax(log_weights.double(), 0).clamp_min(floor)
    return torch.log(weights / weights.sum()).to(log_weights.dtype)


def stack_experts(loss_function: Callable, predictions: torch.Tensor, labels: torch.Tensor,
                  folds: Sequence[tuple[np.ndarray, np.ndarray]], rule: str = "sparse") -> torch.Tensor:
    """Stacking on the simplex: the experts' log-weights `(experts,)` whose softmax mixes their out-of-fold
    predictions `predictions` `(rows, experts, labels)` at the lowest `loss_function(mixture, labels)`, a convex
    problem; an expert left out gets `EXCLUDED_LOG_WEIGHT` (weight exactly 0).

    The experts enter in the order of their own loss; each number of them is stacked on all rows and its mixture
    scored on each of `folds` (positions of held-out rows). `rule="sparse"` (default) keeps the fewest whose loss is
    within one standard error of the lowest (`fewest_within_paired_error`), `"lowest"` the number of lowest mean
    loss, `"full"` every expert (also with one expert or fewer than two folds). A weak or source-specific expert then
    earns weight only where held-out records clearly ask for it: mixing a constant-ish head into a measurement shrinks
    every prediction towards the training mean (RR: 1 % of weight on random experts cost 1.2 ms on records from other
    hospitals; 2.6 % on the median-beat head, 0.8 ms)."""

    def fit(included: torch.Tensor) -> torch.Tensor:
        weights = torch.zeros(predictions.shape[1], requires_grad=True)
        optimizer = torch.optim.Adam([weights], lr=0.05)
        for _ in range(300):
            log_weights = torch.where(included, weights, torch.full_like(weights, EXCLUDED_LOG_WEIGHT))
            loss = loss_function(mix_experts(predictions, torch.softmax(log_weights, 0).expand(len(labels), -1)),
                                 labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return torch.where(included, weights, torch.full_like(weights, EXCLUDED_LOG_WEIGHT)).detach()

    experts = predictions.shape[1]
    if rule == "full" or experts == 1 or len(folds) < 2:
        return fit(torch.ones(experts, dtype=torch.bool))
    with torch.no_grad():
        own = torch.stack([loss_function(predictions[:, e], labels) for e in range(experts)])
    order = own.argsort()
    candidates, curves = [], []
    for count in range(1, experts + 1):
        included = torch.zeros(experts, dtype=torch.bool)
        included[order[:count]] = True
        log_weights = fit(included)
        with torch.no_grad():
            mixture = mix_experts(predictions, torch.softmax(log_weights, 0).expand(len(labels), -1))
            curves.append(torch.stack([loss_function(mixture[held_out], labels[held_out]) for _, held_out in folds]))
        candidates.append(log_weights)
    curves = torch.stack(curves, dim=1)  # (folds, number of experts)
    return candidates[int(curves.mean(0).argmin()) if rule == "lowest" else fewest_within_paired_error(curves)]


class Patience:
    """Stop a training loop once no held-out loss (one per expert, or one) improved for `patience` epochs (0: never).

    The loop then reports its last state for the remaining epochs, so out-of-fold curves keep their length; the
    epochs chosen from them are those before the stop in practice, as patience only ends a loop past its best."""

    def __init__(self, patience: int, initial: torch.Tensor | None = None):
        self.patience = patience
        self.best = None if initial is None else torch.as_tensor(initial).clone()
        self.last_improvement = 0

    def should_stop(self, epoch: int, losses: torch.Tensor) -> bool:
        losses = torch.as_tensor(losses).detach()
        if self.best is None or bool((losses < self.best).any()):
            self.last_improvement = epoch
        self.best = losses.clone() if self.best is None else torch.minimum(self.best, losses)
        return self.patience > 0 and epoch - self.last_improvement >= self.patience


class EnECGFitter:
    """Fits the heads and gate of one task on a `FeatureTable` (see the module docstring): `model.tasks[name]`, or a
    single-task model (its only task; `task_of`). Every task's heads and gate read the same shared features."""

    def __init__(self, model: EnECGModel | TaskModel, settings: FitSettings, runner: JobRunner | None = None,
                 autocast=None):
        self.model = task_of(model)
        self.settings = settings
        self.runner = runner or InProcessRunner()
        self.autocast = autocast  # a context-manager factory (accelerate's mixed precision), or None

    # ---------------------------------------------------------------------------------------------- the fit
    def fit(self, table: FeatureTable, rows: np.ndarray, name: str = "fit") -> FitReport:
        """Train on `table` rows `rows`; leaves the model fitted (heads, gate, target scaling, class weights).

        Runs on one CPU thread: head and gate tensors are far too small for intra-op threads to pay, and on a busy
        machine OpenMP's spinning threads made a fit 30x slower (80 s instead of 2.8 s on 2 shared cores)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._fit(table, rows, name)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, table: FeatureTable, rows: np.ndarray, name: str) -> FitReport:
        settings, model = self.settings, self.model
        rows = np.asarray(rows, dtype=np.int64)
        self._reset()
        prepare_targets(model, table.labels[rows], settings.class_weighting)
        report = FitReport(settings.strategy)
        inner = settings.strategy == "stacked" or self.model.has_linear_paths
        folds = self._inner_folds(table, rows, name) if inner else []
        report.inner_folds = folds
        linear = None
        if self.model.has_linear_paths:  # first the linear paths, on the same inner folds: cheap convex fits
            linear = self.runner.map(f"{name}/linear-paths", lambda _: self._linear_job(table, rows, folds), [None])[0]
            report.linear_l2 = dict(zip(model.expert_names, linear["l2"].tolist()))
            report.linear_l1 = dict(zip(model.expert_names, linear["l1"].tolist()))
            report.linear_inputs = dict(zip(model.expert_names, linear["inputs"].tolist()))
        if settings.strategy == "joint":
            state = self.runner.map(f"{name}/joint", lambda _: self._joint_job(table, rows, name, linear), [None])[0]
            self._reset(state)
            return report

        histories = self.runner.map(
            f"{name}/inner-heads",
            lambda fold: self._heads_job(table, rows[fold[1][0]], rows[fold[1][1]], f"{name}/inner-{fold[0]}",
                                         linear=self._fold_linear(linear, fold[0])),
            list(enumerate(folds)),
        )
        predictions = self._choose_head_epochs(table, rows, folds, histories, linear is not None, report)
        final_linear = None if linear is None else (linear["weight"], linear["bias"])
        predictions = self._fit_final(table, rows, folds, predictions, final_linear, name, report)
        if settings.calibration == "temperature" and model.task_config.problem_type == "single_label_classification":
            report.logit_temperature = self._calibrate(table, rows, predictions)
        logger.info("%s: head epochs %s; linear paths: L2 %s, L1 %s, inputs read %s; out-of-fold losses %s; stacked "
                    "gate weights %s; gate epochs %d", name, report.expert_epochs, report.linear_l2, report.linear_l1,
                    report.linear_inputs,
                    {k: round(v, 4) for k, v in report.out_of_fold_loss.items()},
                    {k: round(v, 3) for k, v in report.stacked_weights.items()}, report.gate_epochs)
        if report.logit_temperature != 1.0:
            logger.info("%s: logit temperature %.4g (fitted on the out-of-fold mixture)", name,
                        report.logit_temperature)
        return report

    def _choose_head_epochs(self, table: FeatureTable, rows: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                            histories: Sequence[dict[str, torch.Tensor]], linear_path: bool, report: FitReport
                            ) -> torch.Tensor:
        """Each expert's epoch count from the inner-fold heads' predictions of their held-out records after every
        epoch (`histories`, one per fold of `folds`); sets the report's `expert_epochs`, `out_of_fold_loss` and
        `out_of_fold_predictions`, and returns those predictions at the chosen epochs, `(rows, experts, labels)`."""
        settings, model = self.settings, self.model
        # Out-of-fold predictions of every epoch: (epochs, rows, experts, labels); with linear paths epoch 0 (the
        # linear path alone) is the first.
        first = histories[0]["predictions"]
        out_of_fold = first.new_zeros(first.shape[0], len(rows), *first.shape[2:])
        for (_, held_out), history in zip(folds, histories):
            out_of_fold[:, held_out] = history["predictions"]
        labels = table.labels[rows]
        experts = range(out_of_fold.shape[2])
        curves = torch.stack([torch.stack([model.loss_function(out_of_fold[epoch, :, e], labels) for e in experts])
                              for epoch in range(out_of_fold.shape[0])])  # (epochs, experts)
        if not linear_path or settings.ffn_epochs == "lowest":  # the epoch with the lowest out-of-fold loss
            best = curves.argmin(dim=0)  # epoch index per expert (epoch count = index + 1 without linear paths)
        else:  # the FFN on top of a linear path: only as many epochs as held-out records clearly confirm
            fold_curves = torch.stack([  # (folds, epochs + 1, experts)
                torch.stack([torch.stack([model.loss_function(history["predictions"][epoch, :, e],
                                                              table.labels[rows[held_out]]) for e in experts])
                             for epoch in range(first.shape[0])])
                for (_, held_out), history in zip(folds, histories)])
            best = torch.tensor([one_standard_error_epoch(fold_curves[:, :, e]) for e in experts])
        if not settings.early_stopping:
            best = torch.full_like(best, curves.shape[0] - 1)
        predictions = out_of_fold[best, :, torch.arange(out_of_fold.shape[2])].transpose(0, 1)  # (rows, experts, labels)
        report.out_of_fold_predictions = predictions.detach().clone()
        names = model.expert_names
        report.expert_epochs = dict(zip(names, [int(b) + (not linear_path) for b in best]))
        report.out_of_fold_loss = {n: float(curves[b, e]) for e, (n, b) in enumerate(zip(names, best.tolist()))}
        return predictions

    def _fit_final(self, table: FeatureTable, rows: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                   predictions: torch.Tensor, linear: tuple[torch.Tensor, torch.Tensor] | None, name: str,
                   report: FitReport) -> torch.Tensor:
        """The final heads (each expert for its `report.expert_epochs`, on the fitted `linear` paths) and the gate, on
        all `rows`, loaded into the model; sets the report's `stacked_weights` and `gate_epochs`. The gate is fitted on
        `predictions` `(rows, experts, labels)`, or with `gate_predictions="in_sample"` on the final heads' own: returns
        what it was fitted on."""
        model = self.model
        epochs = list(report.expert_epochs.values())
        jobs = [("heads", None)]
        if model.task_config.gate_type == "learned":
            jobs.append(("gate", None))
        if self.settings.gate_predictions == "in_sample" and len(jobs) > 1:
            heads = self.runner.map(f"{name}/final-heads", lambda _: self._heads_job(
                table, rows, None, f"{name}/heads", epochs, linear), [None])[0]
            self._reset(heads)
            predictions = self._expert_logits(table, rows)
        outputs = self.runner.map(
            f"{name}/final",
            lambda job: (self._heads_job(table, rows, None, f"{name}/heads", epochs, linear) if job[0] == "heads"
                         else self._gate_job(table, rows, predictions, f"{name}/gate", folds)),
            jobs,
        )
        state = {}
        for output in outputs:
            state.update({k: v for k, v in output.items() if not k.startswith("report.")})
        self._reset(state)
        if len(outputs) > 1:
            report.stacked_weights = dict(zip(model.expert_names, outputs[1]["report.stacked_weights"].tolist()))
            report.gate_epochs = int(outputs[1]["report.gate_epochs"])
        return predictions

    # ---------------------------------------------------------------------------------------------- jobs
    def _heads_job(self, table: FeatureTable, train_rows: np.ndarray, eval_rows: np.ndarray | None, name: str,
                   expert_epochs: Sequence[int] | None = None,
                   linear: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Train every head on its own loss. With `eval_rows`: the heads' predictions on them after every epoch,
        `{"predictions": (epochs, eval rows, experts, labels)}` (`epochs + 1` with linear paths: epoch 0 first). With
        `expert_epochs`: the head weights, each expert's taken after its own number of epochs. `linear`: the linear
        paths' padded weight and bias, fitted on `train_rows` (`linear_heads`); the FFN learns on top of them."""
        model = self._start_job(name)
        model.fit_head_standardization([e[train_rows] for e in table.expert_embeddings])
        if linear is not None:
            model.set_linear_paths(*linear)
        heads = model.stacked_heads()  # all heads in one batched pass (same arithmetic as the modules, far faster)
        optimizer = torch.optim.AdamW(heads.parameters, lr=self.settings.learning_rate,
                                      weight_decay=self.settings.weight_decay, foreach=True)
        eval_inputs = heads.stack_inputs([e[eval_rows] for e in table.expert_embeddings]) if eval_rows is not None else None
        eval_labels = table.labels[eval_rows] if eval_rows is not None else None
        total = max(expert_epochs) if expert_epochs is not None else self.settings.epochs
        history, kept = [], {}

        def evaluate() -> torch.Tensor:
            with torch.no_grad():
                history.append(heads.forward(eval_inputs).float())
                return torch.stack([model.loss_function(history[-1][:, e], eval_labels)
                                    for e in range(history[-1].shape[1])])

        def keep(epoch: int) -> None:
            for expert, count in zip(model.expert_names, expert_epochs):
                if count == epoch:
                    kept.update(heads.head_state(expert))

        patience = Patience(self.settings.patience)
        if heads.has_linear_paths:  # epoch 0, the linear path alone, is a candidate too
            if eval_inputs is not None:
                patience = Patience(self.settings.patience, evaluate())
            if expert_epochs is not None:
                keep(0)
        for epoch in range(1, total + 1):
            for batch in self._batches(train_rows, name, epoch):
                with self._autocast():
                    logits = heads.forward(heads.stack_inputs([e[batch] for e in table.expert_embeddings]), True)
                    loss = model.loss_function(logits, table.labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if eval_inputs is not None and patience.should_stop(epoch, evaluate()):
                break
            if expert_epochs is not None:
                keep(epoch)
        if eval_rows is not None:
            length = self.settings.epochs + heads.has_linear_paths
            history += [history[-1]] * (length - len(history))  # stopped early: the heads stay as they are
            return {"predictions": torch.stack(history)}
        return kept

    def _linear_job(self, table: FeatureTable, rows: np.ndarray, folds) -> dict[str, torch.Tensor]:
        """The heads' linear paths: each expert's L2 penalty by its out-of-fold loss over `folds` (positions into
        `rows`), the fits of every inner fold's training part and of all `rows` (`linear_heads.fit_linear_paths`)."""
        model = self._start_job("linear-paths")
        result = fit_linear_paths(model, [e[rows] for e in table.expert_embeddings], table.labels[rows], folds,
                                  self.settings.linear_l2, self.settings.linear_selection)
        return {k: v for k, v in result.items() if k != "out_of_fold"}

    @staticmethod
    def _fold_linear(linear: dict[str, torch.Tensor] | None, fold: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if linear is None else (linear[f"fold-{fold}.weight"], linear[f"fold-{fold}.bias"])

    def _fold_groups(self, table: FeatureTable, rows: np.ndarray) -> np.ndarray:
        """What inner folds keep on one side: the institution of each row when `inner_groups="source"` and the rows
        come from two or more institutions, else the subject."""
        if self.settings.inner_groups == "source" and table.sources is not None:
            institutions = np.array([institution(str(g)) for g in table.sources[rows]])
            if len(set(institutions.tolist())) >= 2:
                return institutions
        return table.group_of(rows)

    def _inner_folds(self, table: FeatureTable, rows: np.ndarray, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """The inner folds of a fit, as positions into `rows` (`_fold_groups`: by institution or by subject)."""
        return subject_folds(self._fold_groups(table, rows), self.settings.inner_folds,
                             job_seed(self.settings.seed, f"{name}/folds"))

    def _gate_job(self, table: FeatureTable, rows: np.ndarray, predictions: torch.Tensor, name: str,
                  folds: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> dict[str, torch.Tensor]:
        """Fit the gate on out-of-fold head predictions `(rows, experts, labels)` of the records `rows`; `folds`
        (positions into `rows`) are the inner folds those predictions came from."""
        model = self._start_job(name)
        labels = table.labels[rows]
        # 1. Input-independent log-weights (stacking), on the fewest experts that held-out records allow.
        log_weights = self._stacking(predictions, labels, folds)
        model.gate.set_stacked_log_weights(log_weights)
        stacked = torch.softmax(log_weights, 0)
        # What the gate reads per record: the gate leads, or these out-of-fold predictions (standardised by them).
        model.fit_gate_input_standardization(predictions)
        inputs = model.gate_features(table.gate_inputs[rows], predictions).float()

        # 2. The input-dependent part, from zero, on top of the stacked weights with a floor (`gate_weight_floor`).
        # Its number of epochs is cross-validated over these records (by subject, or by institution:
        # `_fold_groups`), with the one-standard-error rule: the fewest epochs whose held-out loss is within one
        # standard error of the best, where epoch 0 is the stacked weights alone. 0 unless held-out records clearly
        # say otherwise: on a few hundred records a gate reading raw leads mostly learns noise (docs/benchmarks.md,
        # ablations).
        best_epoch = 0
        groups = self._fold_groups(table, rows)
        if self.settings.gate_epochs > 0 and len(set(groups.tolist())) >= 2:
            gate_start = {k: v.detach().clone() for k, v in model.gate.state_dict().items()}
            floored = floored_log_weights(log_weights, self.settings.gate_weight_floor)
            curves = []
            for fold, (fit_part, check_part) in enumerate(
                    subject_folds(groups, self.settings.inner_folds, job_seed(self.settings.seed, name))):
                model.gate.load_state_dict(gate_start)
                curves.append(self._train_gate(inputs, predictions, labels, fit_part, self.settings.gate_epochs,
                                               f"{name}/cv-{fold}", check_part, start_log_weights=floored))
            best_epoch = one_standard_error_epoch(torch.stack(curves))
            model.gate.load_state_dict(gate_start)
            if best_epoch:
                self._train_gate(inputs, predictions, labels, np.arange(len(rows)), best_epoch, f"{name}/all",
                                 start_log_weights=floored)
        state = model.gate_state()
        state["report.stacked_weights"] = stacked
        state["report.gate_epochs"] = torch.tensor(best_epoch)
        return state

    @torch.no_grad()
    def _calibrate(self, table: FeatureTable, rows: np.ndarray, predictions: torch.Tensor) -> float:
        """Set the task's `logit_temperature` from the fitted gate's mixture of the out-of-fold head predictions
        `(rows, experts, labels)` of the records `rows`: the temperature of lowest unweighted cross-entropy."""
        model = self.model
        weights = model.compute_gate_weights(table.gate_inputs[torch.as_tensor(rows)], len(rows), predictions).float()
        logits = mix_experts(predictions.float(), weights).double()
        labels = table.labels[torch.as_tensor(rows)].long()
        present = labels >= 0
        log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_temperature], max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            with torch.enable_grad():
                loss = F.cross_entropy(logits[present] / log_temperature.exp(), labels[present])
                loss.backward()
            return loss

        if bool(present.any()):
            optimizer.step(closure)
        temperature = round(float(log_temperature.detach().exp()), 6)
        model.task_config.logit_temperature = temperature if math.isfinite(temperature) and temperature > 0 else 1.0
        return model.task_config.logit_temperature

    def _stacking(self, predictions: torch.Tensor, labels: torch.Tensor,
                  folds: Sequence[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
        """The gate's input-independent log-weights ([`stack_experts`] by the settings' rule)."""
        return stack_experts(self.model.loss_function, predictions, labels, folds, self.settings.stacking)

    def _train_gate(self, inputs: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor,
                    fit_part: np.ndarray, epochs: int, name: str, check_part: np.ndarray | None = None,
                    start_log_weights: torch.Tensor | None = None) -> torch.Tensor | None:
        """Train the gate on positions `fit_part` of its records for `epochs` epochs, reading `inputs` (records,
        gate input size; `EnECGTaskEnsemble.gate_features`) and mixing `predictions`; with `check_part`, the loss on
        those positions before training (the gate as it is) and after every epoch, `(epochs + 1,)`. With
        `start_log_weights` `(experts,)`, training starts from those input-independent log-weights."""
        model = self.model

        def check_loss() -> torch.Tensor:
            model.gate.eval()
            with torch.no_grad():
                weights = model.gate(inputs[check_part])
                return model.loss_function(mix_experts(predictions[check_part], weights), labels[check_part]).float()

        optimizer = torch.optim.AdamW(self._trainable("gate."), lr=self.settings.gate_learning_rate,
                                      weight_decay=self.settings.weight_decay, foreach=True)
        curve = [check_loss()] if check_part is not None else []
        if start_log_weights is not None and epochs > 0:
            model.gate.set_stacked_log_weights(start_log_weights)
        patience = Patience(self.settings.patience, curve[0] if curve else None)
        for epoch in range(1, epochs + 1):
            model.gate.train()  # the gate alone: model.train() walks every expert's modules (a 20 ms tree walk)
            for batch in self._batches(fit_part, name, epoch):
                with self._autocast():
                    weights = model.gate(inputs[batch])
                    loss = model.loss_function(mix_experts(predictions[batch], weights), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if check_part is not None:
                curve.append(check_loss())
                if patience.should_stop(epoch, curve[-1]):
                    break
        if check_part is not None:
            curve += [curve[-1]] * (epochs + 1 - len(curve))  # stopped early: the gate stays as it is
        return torch.stack(curve) if curve else None

    def _joint_job(self, table: FeatureTable, rows: np.ndarray, name: str,
                   linear: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The research code's stage: heads and gate together on the model's loss for `epochs` epochs (on top of the
        fitted linear paths, which stay as they are)."""
        model = self._start_job(f"{name}/joint")
        model.fit_head_standardization([e[rows] for e in table.expert_embeddings])
        if linear is not None:
            model.set_linear_paths(linear["weight"], linear["bias"])
        optimizer = torch.optim.AdamW(model.trained_parameters(),
                                      lr=self.settings.learning_rate, weight_decay=self.settings.weight_decay, foreach=True)
        for epoch in range(1, self.settings.epochs + 1):
            model.heads.train()
            model.gate.train()
            for batch in self._batches(rows, name, epoch):
                with self._autocast():
                    loss = model(expert_embeddings=[e[batch] for e in table.expert_embeddings],
                                 gate_inputs=table.gate_inputs[batch], labels=table.labels[batch]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return head_and_gate_state(model)

    # ---------------------------------------------------------------------------------------------- pieces
    def _reset(self, state: dict[str, torch.Tensor] | None = None) -> None:
        """The initial heads and gate, with `state` (job outputs) loaded over them."""
        reset_heads_and_gate(self.model, job_seed(self.settings.seed, "initial-weights"))
        if state:
            unexpected = self.model.load_state_dict(state, strict=False).unexpected_keys
            if unexpected:
                raise RuntimeError(f"Job outputs do not match the model: unexpected {unexpected[:5]}")

    def _start_job(self, name: str) -> TaskModel:
        """Every job starts from the initial heads and gate and seeds itself: its output depends on nothing else."""
        self._reset()
        torch.manual_seed(job_seed(self.settings.seed, name))  # dropout masks
        return self.model

    def _trainable(self, prefix: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if p.requires_grad and n.startswith(prefix)]

    def _batches(self, rows: np.ndarray, name: str, epoch: int):
        generator = torch.Generator().manual_seed(job_seed(self.settings.seed, f"{name}/epoch-{epoch}"))
        order = torch.as_tensor(rows)[torch.randperm(len(rows), generator=generator)]
        for start in range(0, len(order), self.settings.batch_size):
            yield order[start : start + self.settings.batch_size]

    def _autocast(self):
        import contextlib

        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    @torch.no_grad()
    def _expert_logits(self, table: FeatureTable, rows: np.ndarray) -> torch.Tensor:
        self.model.heads.eval()
        return self.model.compute_expert_logits([e[rows] for e in table.expert_embeddings]).float()


def fit_enecg(model: EnECGModel | TaskModel, table: FeatureTable, rows: np.ndarray, settings: FitSettings | None = None,
              runner: JobRunner | None = None, name: str = "fit") -> FitReport:
    """Fit the heads and gate of `model` (a task, `model.tasks[name]`, or a single-task model) on `table` rows `rows`
    (see the module docstring); returns what was decided."""
    return EnECGFitter(model, settings or FitSettings(), runner).fit(table, rows, name)


@torch.no_grad()
def predict(model: EnECGModel | TaskModel, table: FeatureTable, rows: np.ndarray | None = None, batch_size: int = 256
            ) -> dict[str, np.ndarray]:
    """Predictions of `model` (a task, `model.tasks[name]`, or a single-task model) for `table` rows (default all):
    `logits` (rows, labels) in the label's unit, `expert_logits` (rows, experts, labels), `gate_weights` (rows,
    experts), and the `labels`."""
    model = task_of(model)
    model.eval()
    rows = np.arange(len(table)) if rows is None else np.asarray(rows, dtype=np.int64)
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "expert_logits": [], "gate_weights": []}
    for start in range(0, len(rows), batch_size):
        batch = torch.as_tensor(rows[start : start + batch_size])
        out = model(expert_embeddings=[e[batch] for e in table.expert_embeddings], gate_inputs=table.gate_inputs[batch])
        for key in parts:
            parts[key].append(getattr(out, key).float().cpu())
    result = {k: torch.cat(v).numpy() for k, v in parts.items()}
    result["labels"] = table.labels[torch.as_tensor(rows)].numpy()
    return result


__all__ = ["FitSettings", "FeatureTable", "FitReport", "EnECGFitter", "InProcessRunner", "fit_enecg", "predict", "task_of",
           "subject_folds", "FIT_STRATEGIES"]
