"""The record-level feature store: the frozen experts' outputs, computed once per record and shared by every task,
label, subset, fold, seed and run (see `store` and docs/training.md, "The feature store").

    python -m enecg_hf.features --config tiny --data_format ludb --data_path path/to/ludb      # fill the store
    accelerate launch --num_processes 2 --cpu -m enecg_hf.features ...                         # two processes

`train.py` reads the same store (default `~/.cache/enecg_hf/features`, or `$ENECG_HF_CACHE/features`, or
`--cache_dir DIR` → `DIR/features`) and computes only what is missing.
"""

from .store import (
    CACHE_ENV, Column, CorruptShard, FeatureStore, build_features, column_fingerprints, default_cache_root,
    embedding_column, feature_store_dir, model_columns, record_keys, signal_digest,
)

__all__ = [
    "CACHE_ENV", "Column", "CorruptShard", "FeatureStore", "build_features", "column_fingerprints",
    "default_cache_root", "embedding_column", "feature_store_dir", "model_columns", "record_keys", "signal_digest",
]
