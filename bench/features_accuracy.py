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
from harness import LUDB, REPO, interleaved, median_ms, parser, save


INTERVALS = ("pr", "qrs", "qt", "rr_mean")


def reference(path: str) -> dict[str, float]:
    """Intervals (s) from the lead-II annotations: `(` onset, `p`/`N`/`t` peak, `)` offset of each wave."""
    ann = wfdb.rdann(path, "ii")
    s, sym = ann.sample, ann.symbol
    waves = {k: [] for k in "pNt"}  # (onset, peak, offset), None where the mark is missing
    for i, kind in enumerate(sym):
        if kind in waves:
            onset = s[i - 1] if i > 0 and sym[i - 1] == "(" else None
            offset = s[i + 1] if i + 1 < len(sym) and sym[i + 1] == ")" else None
            waves[kind].append((onset, s[i], offset))
    qrs = waves["N"]
    pr, width, qt = [], [], []
    for j, (on, peak, off) in enumerate(qrs):
        before = qrs[j - 1][1] if j else -np.inf
        after = qrs[j + 1][1] if j + 1 < len(qrs) else np.inf
        p = [w for w in waves["p"] if before < w[1] < peak]
        t = [w for w in waves["t"] if peak < w[1] < after]
        if on is not None and p and p[-1][0] is not None:
            pr.append(on - p[-1][0])
        if on is not None and off is not None:
            width.append(off - on)
        if on is not None and t and t[0][2] is not None:
            qt.append(t[0][2] - on)
    med = lambda v: float(np.median(v)) / ann.fs if v else float("nan")
    rr = float(np.diff([w[1] for w in qrs]).mean()) / ann.fs if len(qrs) >= 2 else float("nan")
    return {"pr": med(pr), "qrs": med(width), "qt": med(qt), "rr_mean": rr}


def lead_ii(expert: EnECGFeaturesExpert, path: str) -> np.ndarray:
    """Lead II of a record as the expert gets it inside the model: record z-score, then resampling."""
    x = torch.tensor(wfdb.rdrecord(path).p_signal.T, dtype=torch.float32)[None]
    x = (x - x.mean()) / x.std()  # the model's default `normalization: record`
    return expert.prepare_inputs(x)[0, 0].double().numpy()


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
        row = {"ms_per_record": median_ms(seconds[m]), "ms_per_record_mean": 1000 * float(np.mean(seconds[m]))}
        for name in INTERVALS:
            got = np.array([v[name] for v in per_record[m]], dtype=float)
            ref = np.array([r[name] for r in refs])
            both = np.isfinite(got) & np.isfinite(ref)
            error = 1000 * (got[both] - ref[both])
            row[name] = {"mae_ms": float(np.abs(error).mean()) if both.any() else None,
                         "bias_ms": float(np.median(error)) if both.any() else None,
                         "measured": float(np.isfinite(got).mean()), "scored": int(both.sum())}
        result[m] = row
    return {"input_length": input_length, "methods": result, "reference_records": {
        name: int(np.isfinite([r[name] for r in refs]).sum()) for name in INTERVALS},
        "per_record": per_record, "records": records}


def table(runs: list[dict], meta: dict) -> str:
    lines = ["| input (rate) | method | PR MAE / bias | QRS MAE / bias | QT MAE / bias | RR MAE / bias | measured PR / QRS / QT | ms per record |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda r: "n/a" if r["mae_ms"] is None else f"{r['mae_ms']:.0f} / {r['bias_ms']:+.0f}"
    for run_ in runs:
        for m, row in run_["methods"].items():
            share = " / ".join(f"{100 * row[n]['measured']:.0f} %" for n in ("pr", "qrs", "qt"))
            rr = f"{row['rr_mean']['mae_ms']:.1f} / {row['rr_mean']['bias_ms']:+.1f}"
            lines.append(f"| {run_['input_length']} ({run_['input_length'] // 10} Hz) | `{m}` | {fmt(row['pr'])} | "
                         f"{fmt(row['qrs'])} | {fmt(row['qt'])} | {rr} | {share} | {row['ms_per_record']:.1f} |")
    ref = runs[0]["reference_records"]
    return "\n".join(lines) + (
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
    import neurokit2

    torch.set_num_threads(1)
    records = (LUDB / "RECORDS").read_text().split()[: args.records]
    load = [os.getloadavg()[0]]
    runs = [run(records, args.methods.split(","), int(n), args.repeats) for n in args.input_lengths.split(",")]
    load.append(os.getloadavg()[0])
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "neurokit2": neurokit2.__version__, "load": load,
            "repeats": args.repeats, "torch_threads": torch.get_num_threads()}
    section = "features_accuracy" if args.update_docs else None
    save({"meta": meta, "runs": runs}, args.output, table(runs, meta), section, REPO / "docs" / "experts.md")


if __name__ == "__main__":
    main()
