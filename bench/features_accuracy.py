"""The ECG-features expert's wave delineation on LUDB: for each neurokit2 method, the accuracy of the expert's PR, QRS,
QT and mean RR against the cardiologists' lead-II wave annotations, and the expert's time per record.

Each record goes through what the model does: whole-record z-score, Fourier resampling to the expert's input length,
then `EnECGFeaturesExpert.measure` on lead II. The reference per record is the median over annotated beats of
PR = QRS onset - P onset, QRS = QRS offset - QRS onset, QT = T offset - QRS onset (the expert's medians), and the mean
interval between annotated R peaks. Error = expert - reference; MAE and bias (median error) over the records where both
exist. Time: `measure` (clean, R peaks, delineation) per record, median of `--repeats` runs, one thread, after a
warm-up, the methods interleaved record by record so that load from other jobs hits them alike.

    python bench/features_accuracy.py --update-docs         # 200 records at 250 Hz, as in hub_configs/tiny.json
    python bench/features_accuracy.py --input-lengths 5000,2500 --methods dwt,prominence,peak,cwt  # more
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import wfdb

from enecg_hf.configuration_enecg import STANDARD_LEAD_NAMES, EnECGExpertConfig
from enecg_hf.expert_features import EnECGFeaturesExpert
from enecg_hf.signal_enecg import normalize_ecg
from harness import LUDB, REPO, interleaved, markdown_table, median_ms, parser, render_only, require_data, save


EXPERTS_DOCS = REPO / "docs" / "experts.md"
INTERVALS = ("pr", "qrs", "qt", "rr_mean")


def reference(path: str) -> dict[str, float]:
    """Intervals (s) from the lead-II annotations, where a wave is `(` onset, `p`/`N`/`t` peak, `)` offset. Per QRS:
    PR from the onset of the last P wave since the previous QRS, QT to the offset of the first T wave after it."""
    ann = wfdb.rdann(path, "ii")
    marks = [("", None), *zip(ann.symbol, ann.sample), ("", None)]
    intervals = {"pr": [], "qrs": [], "qt": []}
    peaks, p_onset, qrs_onset = [], None, None
    for (before, onset), (kind, peak), (after, offset) in zip(marks, marks[1:], marks[2:]):
        onset, offset = (onset if before == "(" else None), (offset if after == ")" else None)
        if kind == "p":
            p_onset = onset
        elif kind == "N":
            peaks.append(peak)
            if p_onset is not None and onset is not None:
                intervals["pr"].append(onset - p_onset)
            if onset is not None and offset is not None:
                intervals["qrs"].append(offset - onset)
            p_onset, qrs_onset = None, onset
        elif kind == "t":
            if qrs_onset is not None and offset is not None:
                intervals["qt"].append(offset - qrs_onset)
            qrs_onset = None
    result = {name: float(np.median(v)) / ann.fs if v else float("nan") for name, v in intervals.items()}
    return {**result, "rr_mean": float(np.diff(peaks).mean()) / ann.fs if len(peaks) >= 2 else float("nan")}


def lead_ii(expert: EnECGFeaturesExpert, path: str) -> np.ndarray:
    """Lead II of a record as the expert gets it inside the model: record z-score, then resampling."""
    x = torch.tensor(wfdb.rdrecord(path).p_signal.T, dtype=torch.float32)[None]
    return expert.prepare_inputs(normalize_ecg(x, "record"))[0, 0].double().numpy()  # the model's default


def run(records: list[str], methods: list[str], input_length: int, repeats: int) -> dict:
    experts = {m: EnECGFeaturesExpert(EnECGExpertConfig("features", "features", input_length, ["II"],
                                                        settings={"delineation": m}), STANDARD_LEAD_NAMES)
               for m in methods}
    paths = [str(LUDB / record) for record in records]
    leads = [lead_ii(experts[methods[0]], path) for path in paths]
    refs = [reference(path) for path in paths]
    measured = {m: [None] * len(records) for m in methods}

    def measure(m):
        def call(k):
            measured[m][k] = experts[m].measure(leads[k])
        return call

    seconds = interleaved({m: measure(m) for m in methods}, range(len(records)), repeats)
    # NaN (not measured) as null, so that the results are valid JSON
    per_record = {m: [{name: float(v[name]) if np.isfinite(v[name]) else None for name in INTERVALS}
                      for v in measured[m]] for m in methods}
    result = {}
    for m in methods:
        result[m] = {"ms_per_record": median_ms(seconds[m]), "ms_per_record_mean": 1000 * float(np.mean(seconds[m]))}
        for name in INTERVALS:
            got, ref = (np.array([v[name] for v in values], dtype=float) for values in (per_record[m], refs))
            both = np.isfinite(got) & np.isfinite(ref)
            error = 1000 * (got[both] - ref[both])
            result[m][name] = {"mae_ms": float(np.abs(error).mean()) if both.any() else None,
                               "bias_ms": float(np.median(error)) if both.any() else None,
                               "measured": float(np.isfinite(got).mean()), "scored": int(both.sum())}
    return {"input_length": input_length, "methods": result, "per_record": per_record, "records": records,
            "reference_records": {name: int(np.isfinite([r[name] for r in refs]).sum()) for name in INTERVALS}}


def table(results: dict) -> str:
    """One row per input length and method, then how it was measured."""
    runs, meta = results["runs"], results["meta"]

    def error(r, digits=0):
        return "n/a" if r["mae_ms"] is None else f"{r['mae_ms']:.{digits}f} / {r['bias_ms']:+.{digits}f}"

    rows = [[f"{run_['input_length']} ({run_['input_length'] // 10} Hz)", f"`{m}`",
             *(error(row[name]) for name in ("pr", "qrs", "qt")), error(row["rr_mean"], 1),
             " / ".join(f"{100 * row[name]['measured']:.0f} %" for name in ("pr", "qrs", "qt")),
             f"{row['ms_per_record']:.1f}"]
            for run_ in runs for m, row in run_["methods"].items()]
    header = ["input (rate)", "method", "PR MAE / bias", "QRS MAE / bias", "QT MAE / bias", "RR MAE / bias",
              "measured PR / QRS / QT", "ms per record"]
    ref = runs[0]["reference_records"]
    return markdown_table(header, rows, "llrrrrrr") + (
        f"\n\nLUDB, {len(runs[0]['records'])} records, lead II; errors in ms (expert - cardiologists), bias = median "
        f"error; annotated records: PR {ref['pr']}, QRS {ref['qrs']}, QT {ref['qt']}, RR {ref['rr_mean']}. "
        f"Time: `measure` on one thread, median of {meta['repeats']} runs per record, median over records; "
        f"run {meta['created']}, neurokit2 {meta['neurokit2']}, load average {meta['load'][0]:.2f} at start, "
        f"{meta['load'][1]:.2f} at end (2 shared cores). `python bench/features_accuracy.py --update-docs`.")


def main() -> None:
    p = parser(__doc__, "features_accuracy.json")
    p.add_argument("--methods", default="dwt,prominence", help="neurokit2 methods (also peak, cwt)")
    p.add_argument("--input-lengths", default="2500", help="expert input lengths (10 s records), e.g. 5000,2500")
    p.add_argument("--records", type=int, default=200, help="the first N LUDB records")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if render_only(args, table, "features_accuracy", EXPERTS_DOCS):
        return
    import neurokit2

    torch.set_num_threads(1)
    records = (require_data("ludb") / "RECORDS").read_text().split()[: args.records]
    load = [os.getloadavg()[0]]
    runs = [run(records, args.methods.split(","), int(n), args.repeats) for n in args.input_lengths.split(",")]
    load.append(os.getloadavg()[0])
    results = {"meta": {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "neurokit2": neurokit2.__version__,
                        "load": load, "repeats": args.repeats, "torch_threads": torch.get_num_threads()}, "runs": runs}
    save(results, args.output, table(results), "features_accuracy" if args.update_docs else None, EXPERTS_DOCS)


if __name__ == "__main__":
    main()
