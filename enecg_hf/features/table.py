"""Frozen features in memory: `FeatureTable`, what the frozen pass computed for n records, with their labels, as
tensors (training reads every row many times).

A table comes from the model (`FeatureTable.from_model`: the frozen pass run over records in memory, with
`compute.compute_feature_batch`, the function the store computes with) or from frozen feature columns by name
(`FeatureTable.from_columns`; `FeatureTable.from_store` for labelled rows of the store's table, as
`store.build_features` returns it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from ..data.splits import source_groups
from ..modeling_enecg import GATE_INPUTS_COLUMN, EnECGModel, embedding_column
from .compute import compute_feature_batch


@dataclass
class FeatureTable:
    """What the frozen part computed for n records, in memory, with their labels.

    Args:
        expert_embeddings: one `(n, embedding_dim)` tensor per expert, in the model's expert order.
        gate_inputs: `(n, gate_leads * gate_input_length)`.
        labels: `(n,)` floats (regression, in the label's unit) or class indices.
        groups: subject of each record (inner folds keep a subject on one side); `None`: each record its own.
        sources: source group of each record (`enecg_hf.data.source_groups`): with records of two or more
            institutions, inner folds hold out whole institutions (`enecg_hf.training.FitSettings.inner_groups`);
            `None`: unknown.
    """

    expert_embeddings: list[torch.Tensor]
    gate_inputs: torch.Tensor
    labels: torch.Tensor
    groups: np.ndarray | None = None
    sources: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.labels)
        sizes = {len(e) for e in self.expert_embeddings} | {len(self.gate_inputs)}
        if sizes != {n}:
            raise ValueError(f"Feature table rows differ: {sorted(sizes)} feature rows for {n} labels")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"{len(self.groups)} groups for {n} records")
        if self.sources is not None and len(self.sources) != n:
            raise ValueError(f"{len(self.sources)} sources for {n} records")

    def __len__(self) -> int:
        return len(self.labels)

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        return self.groups[rows] if self.groups is not None else rows.astype(str)

    def select(self, rows, labels=None, groups=None) -> "FeatureTable":
        """The table of `rows` (e.g. the records that carry a task's label), with new `labels` / `groups` if given."""
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        groups = groups if groups is not None else (None if self.groups is None else self.groups[rows.numpy()])
        sources = None if self.sources is None else self.sources[rows.numpy()]
        return FeatureTable([e[rows] for e in self.expert_embeddings], self.gate_inputs[rows],
                            self.labels[rows] if labels is None else torch.as_tensor(labels), groups, sources)

    @classmethod
    def from_columns(cls, columns: Mapping[str, torch.Tensor], expert_names: Sequence[str], labels, groups=None,
                     sources=None) -> "FeatureTable":
        """A table of frozen feature columns by name: `embedding_<expert>` (taken in `expert_names` order) and
        `gate_inputs`, each `(n, dim)`, as float32."""
        return cls([columns[embedding_column(name)].float() for name in expert_names],
                   columns[GATE_INPUTS_COLUMN].float(), torch.as_tensor(labels),
                   None if groups is None else np.asarray(groups), None if sources is None else np.asarray(sources))

    @classmethod
    def from_store(cls, features, keep: np.ndarray, labels: np.ndarray, records,
                   expert_names: Sequence[str]) -> "FeatureTable":
        """The rows `keep` of the store's table `features` (a `datasets.Dataset`, one row per record of `records`)
        in memory, with their `labels`, subjects (`subject_id`; a record without one is its own) and source groups
        (`enecg_hf.data.source_groups` of `records`, the dataset rows `keep` selected)."""
        columns = [embedding_column(name) for name in expert_names] + [GATE_INPUTS_COLUMN]
        table = features.select(keep, keep_in_memory=True).with_format("torch", columns=columns)[:]
        groups = None
        if "subject_id" in records.column_names:
            groups = [f"subject:{s}" if s is not None else f"row:{i}" for i, s in enumerate(records["subject_id"])]
        return cls.from_columns(table, expert_names, torch.from_numpy(labels), groups, source_groups(records))

    @classmethod
    def from_model(cls, model: EnECGModel, input_values: torch.Tensor, labels, groups=None,
                   batch_size: int = 16, sources=None) -> "FeatureTable":
        """Run the frozen experts once over `input_values` (records, leads, samples), `batch_size` records at a time
        in eval mode (`compute_feature_batch`: the values the feature store holds for these records, computed in
        the same batches)."""
        if len(input_values) == 0:
            raise ValueError("FeatureTable.from_model: no records (input_values is empty)")
        model.eval()
        batches = [compute_feature_batch(model, torch.as_tensor(input_values[start : start + batch_size]))
                   for start in range(0, len(input_values), batch_size)]
        columns = {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}
        return cls.from_columns(columns, list(model.experts), labels, groups, sources)


__all__ = ["FeatureTable"]
