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

Why: a head that must learn "the answer is this one value" through a frozen random FFN with LoRA learns whatever
correlates on the training records instead, and a ReLU network does not extrapolate beyond them (LUDB-trained RR
heads predicted 928 ms for a 472 ms tachycardia from another hospital). A linear map of the measurement does.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ..modeling_enecg import EnECGTaskEnsemble


# L2 penalties tried for every linear path (per record, on standardised inputs): from almost none to strong.
DEFAULT_L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


def standardized_embeddings(model: EnECGTaskEnsemble, embeddings: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every expert's embedding as its head reads it on the linear path (`EnECGHead.standardize_input`: standardised
    with the head's fitted statistics, unmeasured values at the mean, within +-`linear_clip`; unchanged without
    standardisation)."""
    return [head.clip_for_linear_path(head.standardize_input(embedding.float()))
            for head, embedding in zip(model.heads.values(), embeddings)]


def _padded(embeddings: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """`(rows, dim_e)` per expert -> `(rows, experts, width)`, zero-padded."""
    return torch.stack([F.pad(e, (0, width - e.shape[-1])) for e in embeddings], dim=1)


def solve_linear_paths(model: EnECGTaskEnsemble, inputs: torch.Tensor, labels: torch.Tensor, l2: float,
                       start: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 100
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit every expert's linear path on `inputs` `(rows, experts, width)`: returns `weight` `(experts, num_labels,
    width)` and `bias` `(experts, num_labels)` minimising the task's loss plus `l2 / 2 * ||weight_e||^2` per expert.

    `start`: the solution for a neighbouring penalty (a warm start along the penalty path)."""
    experts, width = inputs.shape[1], inputs.shape[2]
    num_labels = model.task_config.num_labels
    if start is None:
        weight, bias = torch.zeros(experts, num_labels, width), torch.zeros(experts, num_labels)
    else:
        weight, bias = start[0].clone(), start[1].clone()
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


def linear_predictions(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`(rows, experts, width)` inputs -> `(rows, experts, num_labels)` outputs of the linear paths."""
    return torch.einsum("nek,eck->nec", inputs, weight) + bias


@torch.no_grad()
def _loss_per_expert(model: EnECGTaskEnsemble, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([model.loss_function(predictions[:, e], labels) for e in range(predictions.shape[1])])


def fit_linear_paths(model: EnECGTaskEnsemble, embeddings: Sequence[torch.Tensor], labels: torch.Tensor,
                     folds: Sequence[tuple[np.ndarray, np.ndarray]], l2_grid: Sequence[float] = DEFAULT_L2_GRID
                     ) -> dict[str, torch.Tensor]:
    """Choose each expert's L2 penalty by the out-of-fold loss over `folds` and fit its linear path.

    Args:
        model: the task's heads (single-task model or `model.tasks[name]`), target scaling and class weights set.
        embeddings: one `(rows, dim_e)` tensor per expert, the records the fit may use.
        labels: `(rows,)` their labels.
        folds: `(train, held_out)` positions into those rows; each fold standardises on its own training part, as
            the heads it is for do.

    Returns:
        `fold-<k>.weight` / `fold-<k>.bias` (fitted on fold k's training part) and `weight` / `bias` (on every row)
        at each expert's chosen penalty, as `(experts, num_labels, width)` / `(experts, num_labels)` in the padded
        layout; `l2` `(experts,)`, the chosen penalties; `out_of_fold_loss` `(len(l2_grid), experts)`; and the
        out-of-fold predictions at the chosen penalties, `out_of_fold` `(rows, experts, num_labels)`. The
        standardisation of every fit is the heads' own (`fit_head_standardization` on its training rows).
    """
    width = max(e.shape[-1] for e in embeddings)
    grid = sorted(float(v) for v in l2_grid)[::-1]  # strongest first: each solution warm-starts the next
    fits = []  # per fold: {l2: (weight, bias)}
    out_of_fold = torch.zeros(len(grid), len(labels), len(embeddings), model.task_config.num_labels)
    for train, held_out in folds:
        model.fit_head_standardization([e[train] for e in embeddings])
        inputs = _padded(standardized_embeddings(model, embeddings), width)
        solutions, start = {}, None
        for g, l2 in enumerate(grid):
            start = solve_linear_paths(model, inputs[train], labels[train], l2, start)
            solutions[l2] = start
            out_of_fold[g, held_out] = linear_predictions(inputs[held_out], *start)
        fits.append(solutions)
    losses = torch.stack([_loss_per_expert(model, out_of_fold[g], labels) for g in range(len(grid))])  # (grid, E)
    chosen = losses.argmin(dim=0)
    experts = torch.arange(len(embeddings))
    result = {"l2": torch.tensor([grid[int(g)] for g in chosen]),
              "out_of_fold_loss": losses.flip(0),  # in ascending order of the penalty, as `sorted(l2_grid)`
              "out_of_fold": out_of_fold[chosen, :, experts].transpose(0, 1).contiguous()}

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
    start = None
    for g in sorted(set(chosen.tolist())):
        start = solve_linear_paths(model, inputs, labels, grid[g], start)
        mask = chosen == g
        weight[mask], bias[mask] = start[0][mask], start[1][mask]
    result["weight"], result["bias"] = weight, bias
    return result


__all__ = ["DEFAULT_L2_GRID", "fit_linear_paths", "solve_linear_paths", "standardized_embeddings"]
