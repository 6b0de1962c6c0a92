"""Frozen features: what the model's frozen pass (`EnECGModel.frozen_columns`: each expert's embedding and the gate
input) computes from records, kept in one place, above the model that defines the pass and below training.

- `compute`: running the pass over a batch of records (`compute_feature_batch`: no gradients, the global RNG
  untouched, float32), the one way the store, the table and training compute features;
- `store`: the record-level feature store on disk, computed once per record and shared by every task, label, subset,
  fold, seed and run (see docs/training.md, "The feature store"), with the fingerprints of the columns;
- `table`: `FeatureTable`, the features of n records in memory with their labels, which training fits on.

    python -m enecg_hf.features --config tiny --data_format ludb --data_path path/to/ludb      # fill the store
    accelerate launch --num_processes 2 --cpu -m enecg_hf.features ...                         # two processes

`train.py` reads the same store (default `~/.cache/enecg_hf/features`, or `$ENECG_HF_CACHE/features`, or
`--cache_dir DIR` → `DIR/features`) and computes only what is missing.
"""

from .compute import compute_feature_batch, compute_features
from .store import (
    CACHE_ENV, Column, CorruptShard, FeatureStore, build_feature_cache, build_features, column_fingerprints,
    default_cache_root, embedding_column, expert_fingerprint, feature_store_dir, model_columns, record_keys,
    signal_digest,
)
from .table import FeatureTable
from ..modeling_enecg import GATE_INPUTS_COLUMN

__all__ = [
    "CACHE_ENV", "GATE_INPUTS_COLUMN", "Column", "CorruptShard", "FeatureStore", "FeatureTable", "build_feature_cache",
    "build_features",
    "column_fingerprints", "compute_feature_batch", "compute_features", "default_cache_root", "embedding_column",
    "expert_fingerprint", "feature_store_dir", "model_columns", "record_keys", "signal_digest",
]
