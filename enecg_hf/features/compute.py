"""Computing frozen features: the one way the store (`store`), the in-memory table (`table`) and training run the
model's frozen pass over records.

The model defines the pass (`EnECGModel.frozen_columns`, `compute_frozen_columns`, `compute_features`); this module
runs it as feature computation needs: without gradients, without touching the global RNG (so dropout masks
downstream are the same whether features come from here or from the store), and in float32.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..modeling_enecg import GATE_INPUTS_COLUMN, EnECGModel, embedding_column


@torch.no_grad()
def compute_feature_batch(model: EnECGModel, input_values: torch.Tensor, columns: Sequence[str] | None = None
                          ) -> dict[str, torch.Tensor]:
    """The frozen features of one batch of records: `{column: (batch, dim) float32}`.

    Args:
        model: the `EnECGModel` whose frozen pass to run (in the mode it is in: the callers put it in eval mode).
        input_values: (batch, leads, samples) as the model's `forward` takes them, on the model's device.
        columns: the names of `model.frozen_columns()` to compute (`model.compute_frozen_columns`; `input_values` are
            not checked: the store cleans its records first); None: every column, in that order, with `input_values`
            checked as `model.compute_features` checks them (a `ValueError` for another shape or a NaN).
    """
    with torch.random.fork_rng(devices=[]):
        if columns is None:
            features = model.compute_features(input_values)
            names = [*(embedding_column(name) for name in model.experts), GATE_INPUTS_COLUMN]
            values = dict(zip(names, [*features.expert_embeddings, features.gate_inputs]))
        else:
            values = model.compute_frozen_columns(input_values, columns)
    return {name: value.float() for name, value in values.items()}


def compute_features(model: EnECGModel, input_values: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """[`compute_feature_batch`] of every column as `(expert embeddings in the model's order, gate inputs)`."""
    values = compute_feature_batch(model, input_values)
    return tuple(values[embedding_column(name)] for name in model.experts), values[GATE_INPUTS_COLUMN]


__all__ = ["compute_feature_batch", "compute_features"]
