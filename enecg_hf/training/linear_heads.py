"""The linear paths of the heads (`config.head_type="linear_ffn"`): one regularised convex fit per expert.

A head's linear path maps its standardised embedding `z` to the task's output: `z @ W.T + b`, in the units the heads
learn (the standardised target of a regression, logits of a classification). It is fitted, not trained: for every L2
penalty `l2` of a grid, `W, b = argmin loss(z @ W.T + b, labels) + l2 / 2 * ||W||^2` with the task's own loss
(`model.loss_function`: Huber or MSE of the standardised target, cross-entropy with the class weights, BCE), solved
to convergence by L-BFGS, and each expert keeps the penalty whose out-of-fold loss over the inner folds is lowest.
That is ridge regression (`Ridge(alpha=l2 * n / 2)` with MSE), or the L2-regularised logistic regression of
scikit-learn's `LogisticRegression` (multinomial, `C = 1 / (l2 * n)`), with its penalty chosen by cross-validation
(the Huber loss makes the regression robust to wrong labels), for every expert at once: the
experts' problems are independent, so one solver runs them side by side on embeddings zero-padded to the widest (a
zero column gets a zero weight).

Which inputs a path reads (`selection`): `"ridge"` reads all of them at the chosen L2 penalty. `"sparse"` (for
regressions) is the relaxed lasso: for every L1 penalty of a grid, the lasso (`lasso_supports`: scikit-learn's
`lasso_path`, coordinate descent, on the squared error of the standardised target) gives the inputs it keeps, and
the path is refitted on those inputs alone with the task's loss and the grid's weakest L2 penalty, so that the L1
penalty selects without shrinking what it keeps; each expert keeps the fewest inputs whose out-of-fold loss is within
one paired standard error of the lowest (`fewest_within_paired_error`). `"auto"` (default): for a regression, each
expert's sparse path unless its ridge path's out-of-fold loss is lower by more than one paired standard error over
the same folds (the simpler of two nested candidates, as everywhere in the fitter); ridge for classification.
Why sparse first: an output that must extrapolate carries every correlate's weight times its out-of-range value.
LUDB-trained RR paths of the features expert leaned on `rr_std`, QT and QTc besides `rr_mean` (within the folds'
noise on LUDB), and that cost 2-3 ms on Holter windows of MIT-BIH, where RR varies far more; the sparse path keeps
`rr_mean` alone (MIT-BIH 10.5 -> 8.7 ms, Challenge 7.0 -> 5.5 ms, the linear path alone). Why ridge where it is
clearly better: an answer spread thin over hundreds of weak inputs (age from the median beat's samples) travels
better as ridge's many small weights than as the few inputs the lasso keeps (median-beat age paths trained
without one institution and scored on it, LOSO pooled: sparse 13.7 y, ridge 12.0, this choice 12.2; on the RR
paths above it keeps sparse). Class logits pass through a softmax; a sparse selection was not measured on
classification and is not offered there.

Why: a head that must learn "the answer is this one value" through a frozen random FFN with LoRA learns whatever
correlates on the training records instead, and a ReLU network does not extrapolate beyond them (LUDB-trained RR
heads predicted 928 ms for a 472 ms tachycardia from another hospital). A linear map of the measurement does.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ..modeling_enecg import EnECGTaskEnsemble
from .selection import fewest_within_paired_error


# L2 penalties tried for every linear path (per record, on standardised inputs): from almost none to strong.
DEFAULT_L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
# L1 penalties of the sparse selection (same scale), strongest first: from no input at all to (nearly) every input.
DEFAULT_L1_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3)
LINEAR_SELECTIONS = ("auto", "sparse", "ridge")


def resolve_selection(model: EnECGTaskEnsemble, selection: str) -> tuple[str, ...]:
    """The selections `fit_linear_paths` fits, simplest first: `selection` alone, or with `"auto"` `("sparse",
    "ridge")` for a regression (each expert then keeps the first within one paired standard error of the other) and
    `("ridge",)` otherwise."""
    if selection not in LINEAR_SELECTIONS:
        raise ValueError(f"selection must be one of {LINEAR_SELECTIONS}, got {selection!r}")
    regression = model.task_config.is_regression
    if selection == "sparse" and not regression:
        raise ValueError("the sparse selection of linear paths is for regressions (the lasso of a squared error)")
    if selection == "auto":
        return ("sparse", "ridge") if regression else ("ridge",)
    return (selection,)


def standardized_embeddings(model: EnECGTaskEnsemble, embeddings: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every expert's embedding as its head reads it on the linear path (`EnECGHead.standardize_input`: standardised
    with the head's fitted statistics, unmeasured values at the mean, within +-`linear_clip`; unchanged without
    standardisation)."""
    return [head.clip_for_linear_path(head.standardize_input(embedding.float()))
            for head, embedding in zip(model.heads.values(), embeddings)]


def _padded(embeddings: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """`(rows, dim_e)` per expert -> `(rows, experts, width)`, zero-padded."""
    return torch.stack([F.pad(e, (0, width - e.shape[-1])) for e in embeddings], dim=1)


def _starting_point(model: EnECGTaskEnsemble, inputs: torch.Tensor,
                    start: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A solver's first `(weight, bias)`: a copy of `start`, or zeros shaped for `inputs` `(rows, experts, width)`."""
    if start is not None:
        return start[0].clone(), start[1].clone()
    experts, width = inputs.shape[1], inputs.shape[2]
    num_labels = model.task_config.num_labels
    return torch.zeros(experts, num_labels, width), torch.zeros(experts, num_labels)


def solve_linear_paths(model: EnECGTaskEnsemble, inputs: torch.Tensor, labels: torch.Tensor, l2: float,
                       start: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 100
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit every expert's linear path on `inputs` `(rows, experts, width)`: returns `weight` `(experts, num_labels,
    width)` and `bias` `(experts, num_labels)` minimising the task's loss plus `l2 / 2 * ||weight_e||^2` per expert.

    `start`: the solution for a neighbouring penalty (a warm start along the penalty path)."""
    experts = inputs.shape[1]
    weight, bias = _starting_point(model, inputs, start)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-5, tolerance_change=1e-9)

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("nek,eck->nec", inputs, weight) + bias
        # loss_function means over experts: each expert's problem is scaled by 1/experts, and so is its penalty.
        loss = model.loss_function(logits, labels) + l2 / 2 * weight.pow(2).sum() / experts
        loss.backward()
        return loss

    optimizer.step(objective)
    return weight.detach(), bias.detach()


def lasso_supports(model: EnECGTaskEnsemble, inputs: torch.Tensor, labels: torch.Tensor,
                   l1_grid: Sequence[float]) -> torch.Tensor:
    """Which inputs an L1-penalised fit keeps at each penalty of `l1_grid` (strongest first): `(len(l1_grid), experts,
    width)` booleans. Each expert's path is scikit-learn's `lasso_path` (coordinate descent, warm-started along the
    grid) on `inputs` `(rows, experts, width)` and the task's standardised target, with `alpha = l1 / 2`: the squared
    error of a regression, on the scale of `solve_linear_paths`' penalties. It selects; the refit on the kept inputs
    and the choice among penalties are on the task's own loss (Huber by default)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import lasso_path

    config = model.task_config
    target = ((labels.double() - config.target_mean) / config.target_std).numpy()
    target = target - target.mean()  # lasso_path fits no intercept: centre both sides
    alphas = np.asarray(l1_grid, dtype=np.float64) / 2
    kept = torch.zeros(len(alphas), inputs.shape[1], inputs.shape[2], dtype=torch.bool)
    for e in range(inputs.shape[1]):
        x = inputs[:, e].double().numpy()
        with warnings.catch_warnings():  # the weakest penalties may stop short of full convergence: they select
            warnings.simplefilter("ignore", ConvergenceWarning)
            _, coefs, _ = lasso_path(x - x.mean(axis=0), target, alphas=alphas)
        kept[:, e] = torch.from_numpy(coefs != 0).T
    return kept


def linear_predictions(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`(rows, experts, width)` inputs -> `(rows, experts, num_labels)` outputs of the linear paths."""
    return torch.einsum("nek,eck->nec", inputs, weight) + bias


@torch.no_grad()
def _loss_per_expert(model: EnECGTaskEnsemble, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([model.loss_function(predictions[:, e], labels) for e in range(predictions.shape[1])])


def _fold_losses(model: EnECGTaskEnsemble, candidates: Sequence[torch.Tensor], labels: torch.Tensor,
                 folds: Sequence[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """Each candidate's loss per expert on each fold's held-out rows, `(folds, candidates, experts)`, from the
    candidates' out-of-fold predictions `(rows, experts, num_labels)` each."""
    return torch.stack([torch.stack([_loss_per_expert(model, c[held_out], labels[held_out]) for c in candidates])
                        for _, held_out in folds])


class _PenaltyPath:
    """The linear paths along a grid of penalties: ridge (the grid's L2 penalties) or sparse (the inputs each L1
    penalty keeps, refitted with `refit_l2`)."""

    def __init__(self, model: EnECGTaskEnsemble, selection: str, grid: Sequence[float], refit_l2: float):
        self.model, self.sparse, self.refit_l2 = model, selection == "sparse", refit_l2
        self.grid = sorted(float(v) for v in grid)[::-1]  # strongest first

    def solve(self, inputs: torch.Tensor, labels: torch.Tensor,
              penalties: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(weight, bias)` at each of `penalties` (strongest first), each solution warm-starting the next."""
        solutions, start = [], None
        kept = lasso_supports(self.model, inputs, labels, penalties) if self.sparse else [None] * len(penalties)
        for penalty, mask in zip(penalties, kept):
            if mask is None:
                start = solve_linear_paths(self.model, inputs, labels, penalty, start)
            else:
                weight, bias = solve_linear_paths(self.model, inputs * mask, labels, self.refit_l2, start)
                start = (weight * mask[:, None, :], bias)
            solutions.append(start)
        return solutions


def fit_linear_paths(model: EnECGTaskEnsemble, embeddings: Sequence[torch.Tensor], labels: torch.Tensor,
                     folds: Sequence[tuple[np.ndarray, np.ndarray]], l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                     selection: str = "auto", l1_grid: Sequence[float] = DEFAULT_L1_GRID) -> dict[str, torch.Tensor]:
    """Choose each expert's selection and penalty by the out-of-fold loss over `folds` and fit its linear path.

    Args:
        model: the task's heads (single-task model or `model.tasks[name]`), target scaling and class weights set.
        embeddings: one `(rows, dim_e)` tensor per expert, the records the fit may use.
        labels: `(rows,)` their labels.
        folds: `(train, held_out)` positions into those rows; each fold standardises on its own training part, as
            the heads it is for do.
        l2_grid: the L2 penalties of `"ridge"`; the weakest is the refit penalty of `"sparse"`.
        selection: `"ridge"` (each expert's L2 penalty of lowest out-of-fold loss), `"sparse"` (each expert's L1
            penalty: the fewest inputs within one paired standard error of the lowest out-of-fold loss, refitted
            on them) or `"auto"` (for regression each expert's sparse path unless its ridge path is better by more
            than one paired standard error, ridge otherwise); see the module's docstring.
        l1_grid: the L1 penalties of `"sparse"`.

    Returns:
        `fold-<k>.weight` / `fold-<k>.bias` (fitted on fold k's training part) and `weight` / `bias` (on every row)
        at each expert's chosen penalty, as `(experts, num_labels, width)` / `(experts, num_labels)` in the padded
        layout; `l2` `(experts,)`, the L2 penalties of the paths (the chosen ones; the refit penalty with
        `"sparse"`); `l1` `(experts,)`, the chosen L1 penalties (0 with `"ridge"`); `inputs` `(experts,)`, how many
        inputs each path reads; `out_of_fold_loss` `(len(grid), experts)` in ascending order of the penalty (one
        selection) or `(selections, experts)` at each selection's chosen penalty (`"auto"` of a regression:
        sparse, ridge); and the out-of-fold predictions of the chosen paths, `out_of_fold` `(rows, experts,
        num_labels)`. The standardisation of every fit is the heads' own (`fit_head_standardization` on its
        training rows).
    """
    results = [_fit_selection(model, embeddings, labels, folds, l2_grid, s, l1_grid)
               for s in resolve_selection(model, selection)]
    return results[0] if len(results) == 1 else _simplest_within_paired_error(model, results, labels, folds)


def _simplest_within_paired_error(model: EnECGTaskEnsemble, results: Sequence[dict[str, torch.Tensor]],
                                  labels: torch.Tensor, folds: Sequence[tuple[np.ndarray, np.ndarray]]
                                  ) -> dict[str, torch.Tensor]:
    """Each expert's path from the first of `results` (the fits of nested selections, simplest first) whose
    out-of-fold loss is within one paired standard error of the lowest over `folds` (`fewest_within_paired_error`),
    in `fit_linear_paths`' layout."""
    per_fold = _fold_losses(model, [r["out_of_fold"] for r in results], labels, folds)  # (folds, results, experts)
    chosen = [fewest_within_paired_error(per_fold[:, :, e]) for e in range(per_fold.shape[-1])]
    merged = {"out_of_fold_loss": torch.stack([_loss_per_expert(model, r["out_of_fold"], labels) for r in results])}
    for key in results[0].keys() - merged.keys():  # the experts along dimension 0, `out_of_fold`'s along 1
        dim = 1 if key == "out_of_fold" else 0
        merged[key] = torch.stack([results[c][key].select(dim, e) for e, c in enumerate(chosen)], dim=dim)
    return merged


def _fit_selection(model: EnECGTaskEnsemble, embeddings: Sequence[torch.Tensor], labels: torch.Tensor,
                   folds: Sequence[tuple[np.ndarray, np.ndarray]], l2_grid: Sequence[float], selection: str,
                   l1_grid: Sequence[float]) -> dict[str, torch.Tensor]:
    """`fit_linear_paths` with one selection, `"sparse"` or `"ridge"`."""
    refit_l2 = min(float(v) for v in l2_grid)
    path = _PenaltyPath(model, selection, l1_grid if selection == "sparse" else l2_grid, refit_l2)
    grid = path.grid
    width = max(e.shape[-1] for e in embeddings)
    fits = []  # per fold: {penalty: (weight, bias)}
    out_of_fold = torch.zeros(len(grid), len(labels), len(embeddings), model.task_config.num_labels)
    for train, held_out in folds:
        model.fit_head_standardization([e[train] for e in embeddings])
        inputs = _padded(standardized_embeddings(model, embeddings), width)
        solutions = dict(zip(grid, path.solve(inputs[train], labels[train], grid)))
        for g, penalty in enumerate(grid):
            out_of_fold[g, held_out] = linear_predictions(inputs[held_out], *solutions[penalty])
        fits.append(solutions)
    losses = torch.stack([_loss_per_expert(model, out_of_fold[g], labels) for g in range(len(grid))])  # (grid, E)
    if selection == "sparse":  # the simplest (strongest penalty first) within the paired error, per expert
        per_fold = _fold_losses(model, out_of_fold, labels, folds)  # (folds, grid, E)
        chosen = torch.tensor([fewest_within_paired_error(per_fold[:, :, e]) for e in range(len(embeddings))])
    else:
        chosen = losses.argmin(dim=0)
    experts = torch.arange(len(embeddings))
    result = {"out_of_fold_loss": losses.flip(0),  # in ascending order of the penalty, as `sorted(grid)`
              "out_of_fold": out_of_fold[chosen, :, experts].transpose(0, 1).contiguous()}
    chosen_penalty = torch.tensor([grid[int(g)] for g in chosen], dtype=torch.float64)  # the grid's values exactly
    result["l1"] = chosen_penalty if selection == "sparse" else torch.zeros(len(embeddings), dtype=torch.float64)
    result["l2"] = (torch.full((len(embeddings),), refit_l2, dtype=torch.float64) if selection == "sparse"
                    else chosen_penalty)

    def pick(solutions: dict[float, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.stack([solutions[grid[int(g)]][0][e] for e, g in enumerate(chosen)])
        bias = torch.stack([solutions[grid[int(g)]][1][e] for e, g in enumerate(chosen)])
        return weight, bias

    for k, solutions in enumerate(fits):
        result[f"fold-{k}.weight"], result[f"fold-{k}.bias"] = pick(solutions)
    # Every row: one solve per distinct chosen penalty, strongest first, each warm-starting the next.
    model.fit_head_standardization(list(embeddings))
    inputs = _padded(standardized_embeddings(model, embeddings), width)
    weight = torch.zeros(len(embeddings), model.task_config.num_labels, width)
    bias = torch.zeros(len(embeddings), model.task_config.num_labels)
    distinct = sorted(set(chosen.tolist()))
    for g, (solution_weight, solution_bias) in zip(distinct, path.solve(inputs, labels, [grid[g] for g in distinct])):
        mask = chosen == g
        weight[mask], bias[mask] = solution_weight[mask], solution_bias[mask]
    result["weight"], result["bias"] = weight, bias
    result["inputs"] = (weight != 0).any(dim=1).sum(dim=1)
    return result


__all__ = ["DEFAULT_L1_GRID", "DEFAULT_L2_GRID", "LINEAR_SELECTIONS", "fit_linear_paths", "lasso_supports",
           "resolve_selection", "solve_linear_paths", "standardized_embeddings"]
