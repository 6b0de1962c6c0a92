"""The build report: how many records were read, kept and skipped (with each skipped record and its reason), and
how many kept records carry each label."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .labels import ARRHYTHMIA_CLASSES, LABEL_COLUMNS


REPORT_FILE = "build_report.json"


@dataclass
class BuildReport:
    """What one `build_dataset` call did.

    Attributes:
        format, input, output: the build's arguments (`output` is `None` when nothing was saved).
        sampling_rate, seconds: the stored signal layout.
        records_read: records listed in the input.
        records_kept: rows of the dataset.
        skipped: one `{"record_id", "reason", "detail"}` per record left out, including repeats of a record id
            (`duplicate_record_id`) and later copies of a stored signal (`duplicate_signal`).
        label_notes: one `{"record_id", "label", "reason", "detail"}` per kept record whose label could not be read
            from its source (e.g. a corrupted LUDB annotation: the record is kept without `rr_interval`), or whose
            value is unusable (`not_a_number`, `out_of_range`, `unknown_value`: see `labels`); counted per label and
            reason in the saved report's `label_notes_by_reason`.
        label_coverage: per label column, the number of kept records that have it.
        arrhythmia_counts: kept records per arrhythmia class.
        records_with_missing_leads, records_with_flat_leads: kept records flagged in those columns.
        source_sampling_rates: kept records per rate of their source files (Hz, as a string key), before resampling
            to `sampling_rate` (e.g. PTB-XL `records100/` files: `{"100": n}`).
        seconds_elapsed, records_per_second: build speed.
    """

    format: str
    input: str | None
    output: str | None
    sampling_rate: int
    seconds: float
    records_read: int = 0
    records_kept: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    label_notes: list[dict[str, str]] = field(default_factory=list)
    label_coverage: dict[str, int] = field(default_factory=dict)
    arrhythmia_counts: dict[str, int] = field(default_factory=dict)
    records_with_missing_leads: int = 0
    records_with_flat_leads: int = 0
    source_sampling_rates: dict[str, int] = field(default_factory=dict)
    seconds_elapsed: float = 0.0
    records_per_second: float = 0.0

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(entry["reason"] for entry in self.skipped).most_common())

    @property
    def label_notes_by_reason(self) -> dict[str, dict[str, int]]:
        """`{label: {reason: kept records}}` of `label_notes` (e.g. `{"age": {"out_of_range": 2}}`)."""
        counts: dict[str, dict[str, int]] = {}
        for (label, reason), count in Counter((n["label"], n["reason"]) for n in self.label_notes).most_common():
            counts.setdefault(label, {})[reason] = count
        return counts

    def count_labels(self, dataset: datasets.Dataset) -> None:
        """Fill the label and flag counts from the dataset's Arrow columns (no signal is read)."""
        table = dataset.select_columns([*LABEL_COLUMNS, "missing_leads", "flat_leads", "source_sampling_rate"])
        table = table.with_format("arrow")
        # Through the dataset, not `dataset.data`: that is the table under any `select` (e.g. dropped duplicates).
        self.label_coverage = {name: len(dataset) - table[name].null_count for name in LABEL_COLUMNS}
        feature = dataset.features["arrhythmia"]
        names = feature.int2str if isinstance(feature, datasets.ClassLabel) else str  # a ClassLabel, or strings
        arrhythmia = Counter(names(value) for value in table["arrhythmia"].to_pylist() if value is not None)
        self.arrhythmia_counts = {name: arrhythmia.get(name, 0) for name in ARRHYTHMIA_CLASSES}
        self.records_with_missing_leads = sum(1 for leads in table["missing_leads"].to_pylist() if leads)
        self.records_with_flat_leads = sum(1 for leads in table["flat_leads"].to_pylist() if leads)
        rates = Counter(f"{rate:g}" for rate in table["source_sampling_rate"].to_pylist())
        self.source_sampling_rates = dict(sorted(rates.items(), key=lambda item: -float(item[0])))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped_by_reason"] = self.skipped_by_reason
        data["label_notes_by_reason"] = self.label_notes_by_reason
        return data

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / REPORT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def summary(self, max_examples: int = 3) -> str:
        """A one-screen text summary: counts, skip reasons with a few record ids, label coverage."""
        lines = [
            f"{self.format}: {self.records_read} records read, {self.records_kept} kept, {len(self.skipped)} skipped"
            f" ({self.seconds_elapsed:.1f} s, {self.records_per_second:.1f} records/s)",
            f"signals: 12 leads x {self.sampling_rate} Hz x {self.seconds:g} s"
            + (f" -> {self.output}" if self.output else ""),
        ]
        if self.skipped:
            lines.append("skipped by reason:")
            for reason, count in self.skipped_by_reason.items():
                examples = [entry["record_id"] for entry in self.skipped if entry["reason"] == reason][:max_examples]
                more = ", ..." if count > len(examples) else ""
                lines.append(f"  {reason:<22} {count:>7}  ({', '.join(examples)}{more})")
        if self.label_notes:
            lines.append(f"labels not read from the source ({len(self.label_notes)} kept records, see label_notes):")
            reasons = Counter(f"{note['label']}: {note['reason']}" for note in self.label_notes)
            lines.extend(f"  {reason:<38} {count:>7}" for reason, count in reasons.most_common())
        lines.append("label coverage (kept records with the label):")
        for name, count in self.label_coverage.items():
            share = count / self.records_kept if self.records_kept else 0.0
            lines.append(f"  {name:<16} {count:>7}  {share:6.1%}")
        if any(self.arrhythmia_counts.values()):
            counts = ", ".join(f"{name} {count}" for name, count in self.arrhythmia_counts.items() if count)
            lines.append(f"arrhythmia: {counts}")
        if self.source_sampling_rates:
            rates = ", ".join(f"{rate} Hz {count}" for rate, count in self.source_sampling_rates.items())
            resampled = sum(n for rate, n in self.source_sampling_rates.items() if float(rate) != self.sampling_rate)
            lines.append(f"source rates: {rates} ({resampled} records resampled to {self.sampling_rate} Hz)")
        lines.append(
            f"flags: {self.records_with_missing_leads} records with zero-filled leads,"
            f" {self.records_with_flat_leads} with flat leads"
        )
        return "\n".join(lines)
