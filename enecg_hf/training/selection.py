"""Rules that pick the simplest of nested candidates from their held-out losses over the same folds.

The fitter chooses head epochs, stacked experts and the inputs of the linear paths with them: in-source folds reward
what correlates with the answer on the training records, so a candidate more complex than the simplest one must
earn its place by more than the folds' noise.
"""

from __future__ import annotations

import torch


def one_standard_error_epoch(curves: torch.Tensor) -> int:
    """The fewest epochs whose mean held-out loss is within one standard error of the lowest (Breiman's rule), from
    per-fold loss curves `(folds, epochs + 1)` whose column 0 is the untrained start."""
    mean = curves.mean(dim=0)
    best = int(mean.argmin())
    standard_error = float(curves[:, best].std(unbiased=True)) / len(curves) ** 0.5 if len(curves) > 1 else 0.0
    return int(torch.nonzero(mean <= mean[best] + standard_error)[0])


def fewest_within_paired_error(curves: torch.Tensor) -> int:
    """The first column of `curves` `(folds, candidates)` - held-out losses of nested candidates, simplest first -
    whose mean loss exceeds the lowest mean by at most one standard error of their per-fold differences.

    The standard error of the differences, not of the best candidate's losses (`one_standard_error_epoch`): the
    candidates are scored on the same folds, so how hard a fold is cancels out. On rhythm (3 classes) the inner
    folds' losses spread by 20-50 % from the easiest to the hardest, and the unpaired error let one expert stand for
    two whose mixture was better on most folds."""
    mean = curves.mean(dim=0)
    best = int(mean.argmin())
    differences = curves - curves[:, best : best + 1]
    error = differences.std(dim=0, unbiased=True) / len(curves) ** 0.5 if len(curves) > 1 else torch.zeros_like(mean)
    return int(torch.nonzero(differences.mean(dim=0) <= error)[0])


__all__ = ["fewest_within_paired_error", "one_standard_error_epoch"]
