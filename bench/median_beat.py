"""The median-beat expert on LUDB: the accuracy of the wave boundaries and intervals it measures, against the
cardiologists' per-lead annotations (all 12 leads), and its time per record side by side with the ECG-features expert.

Each record goes through what the model does: whole-record z-score, Fourier resampling to the expert's input length,
then `EnECGMedianBeatExpert.analyze` (`measurements: true`). Reference per record and lead
(`enecg_hf.data.ludb.wave_boundaries`): the median over the annotated beats of each boundary (P, QRS and T onsets and
offsets) in ms from the beat's R peak as the expert detected it, the same R peaks its median beat is aligned on, so
the error is that of the boundaries alone. Intervals (P duration, PR, QRS, QT) per lead are free of alignment.
Error = expert - reference, over the (record, lead) pairs where both exist; MAE and bias (median error).

Time: one thread, one record at a time, the expert's whole forward (`expert(x)`, what the model runs per record) for
the median-beat expert (default, and with measurements) and the features expert (its shipped `dwt`, and
`prominence`), interleaved record by record (`harness.interleaved`), median of `--repeats` runs, median over records.

    python bench/median_beat.py --update-docs                 # 200 records at 500 and 250 Hz
    python bench/median_beat.py --quick                       # 12 records at 500 Hz, 1 run each
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
import wfdb

from enecg_hf.configuration_enecg import STANDARD_LEAD_NAMES, EnECGExpertConfig
from enecg_hf.data.ludb import wave_boundaries
from enecg_hf.expert_features import EnECGFeaturesExpert
from enecg_hf.expert_median_beat import WAVE_MARKS, EnECGMedianBeatExpert
from enecg_hf.signal_enecg import normalize_ecg
from harness import LUDB, REPO, interleaved, markdown_table, median_ms, parser, require_data, save


EXPERTS_DOCS = REPO / "docs" / "experts.md"
LEADS = list(STANDARD_LEAD_NAMES)
# Intervals of one lead from its boundaries: name -> (first, last).
INTERVALS = {"p_dur": ("p_on", "p_off"), "pr": ("p_on", "qrs_on"), "qrs": ("qrs_on", "qrs_off"),
             "qt": ("qrs_on", "t_off")}
LABELS = {"p_on": "P onset", "p_off": "P offset", "qrs_on": "QRS onset", "qrs_off": "QRS offset", "t_on": "T onset",
          "t_off": "T offset", "p_dur": "P duration", "pr": "PR", "qrs": "QRS", "qt": "QT"}


def experts(input_length: int) -> dict:
    """The timed experts at one input length: median-beat (default, measurements) and features (dwt, prominence)."""
    def median_beat(**settings):
        return EnECGMedianBeatExpert(EnECGExpertConfig("median_beat", "median_beat", input_length, LEADS,
                                                       settings=settings), LEADS).eval()

    def features(method):
        return EnECGFeaturesExpert(EnECGExpertConfig("features", "features", input_length, ["II"],
                                                     settings={"delineation": method}), LEADS).eval()

    return {"median_beat": median_beat(), "median_beat+measurements": median_beat(measurements=True),
            "features (dwt)": features("dwt"), "features (prominence)": features("prominence")}


def intervals(boundaries: dict[str, float]) -> dict[str, float]:
    return {name: boundaries[last] - boundaries[first] for name, (first, last) in INTERVALS.items()}


def errors(measured: list[dict], reference: list[dict], names) -> dict:
    """MAE and bias (ms) of every name over the pairs where both are finite; how often the expert gave a value where
    the reference has one."""
    out = {}
    for name in names:
        got = np.array([m.get(name, math.nan) for m in measured], dtype=float)
        ref = np.array([r[name] for r in reference], dtype=float)
        both, annotated = np.isfinite(got) & np.isfinite(ref), np.isfinite(ref)
        error = 1000 * (got[both] - ref[both])
        out[name] = {"mae_ms": float(np.abs(error).mean()) if both.any() else None,
                     "bias_ms": float(np.median(error)) if both.any() else None,
                     "measured": float(both.sum() / max(annotated.sum(), 1)), "scored": int(both.sum())}
    return out


def run(records: list[str], input_length: int, repeats: int) -> dict:
    timed = experts(input_length)
    expert = timed["median_beat+measurements"]
    paths = [str(LUDB / record) for record in records]
    inputs = []
    for path in paths:
        x = torch.tensor(wfdb.rdrecord(path).p_signal.T, dtype=torch.float32)[None]
        inputs.append(expert.prepare_inputs(normalize_ecg(x, "record")))  # the model's default normalisation
    with torch.no_grad():
        seconds = interleaved({name: (lambda k, e=e: e(inputs[k])) for name, e in timed.items()},
                              range(len(records)), repeats)
    measured, reference, per_lead = [], [], {lead: ([], []) for lead in LEADS}
    detection = {}
    for path, x in zip(paths, inputs):
        analysis = expert.analyze(x[0].double().numpy())
        detection[analysis.detection_lead] = detection.get(analysis.detection_lead, 0) + 1
        for lead in LEADS:
            ref = wave_boundaries(path, lead.lower(), analysis.r_peaks, expert.sampling_rate)
            got = analysis.waves.get(lead, dict.fromkeys(WAVE_MARKS, math.nan))
            for pair, values in ((measured, got), (reference, ref)):
                pair.append({**values, **intervals(values)})
            per_lead[lead][0].append(measured[-1])
            per_lead[lead][1].append(reference[-1])
    names = [*WAVE_MARKS, *INTERVALS]
    return {"input_length": input_length, "records": records, "detection_leads": {str(k): v for k, v in detection.items()},
            "ms_per_record": {name: median_ms(s) for name, s in seconds.items()},
            "ms_per_record_mean": {name: 1000 * float(np.mean(s)) for name, s in seconds.items()},
            "all_leads": errors(measured, reference, names),
            "per_lead": {lead: errors(got, ref, names) for lead, (got, ref) in per_lead.items()},
            "reference_pairs": {name: int(np.isfinite([r[name] for r in reference]).sum()) for name in names}}


def _cell(row: dict) -> str:
    return "n/a" if row["mae_ms"] is None else f"{row['mae_ms']:.0f} / {row['bias_ms']:+.0f}"


def accuracy_table(results: dict) -> str:
    """Per boundary and interval, all 12 leads pooled; then the MAE of each lead."""
    run_, meta = results["runs"][0], results["meta"]
    names = [*WAVE_MARKS, *INTERVALS]
    rows = [[LABELS[n], _cell(run_["all_leads"][n]), f"{100 * run_['all_leads'][n]['measured']:.0f} %",
             run_["reference_pairs"][n]] for n in names]
    pooled = markdown_table(["boundary / interval", "MAE / bias (ms)", "measured", "annotated (record, lead)"], rows,
                            "lrrr")
    lead_rows = [[lead, *(f"{r[n]['mae_ms']:.0f}" if r[n]["mae_ms"] is not None else "n/a" for n in names)]
                 for lead, r in run_["per_lead"].items()]
    by_lead = markdown_table(["lead", *(LABELS[n] for n in names)], lead_rows, "l" + "r" * len(names))
    return (f"{pooled}\n\nMAE (ms) by lead:\n\n{by_lead}\n\nLUDB, {len(run_['records'])} records at "
            f"{run_['input_length'] // 10} Hz, every lead's median beat (`measurements: true`, delineation "
            f"`prominence`) against that lead's annotation; boundaries in ms from the detected R peak (expert - "
            f"cardiologists), bias = median error. Detection lead: {run_['detection_leads']}. Run {meta['created']}, "
            f"neurokit2 {meta['neurokit2']}. `python bench/median_beat.py --update-docs`.")


def speed_table(results: dict) -> str:
    """ms per record of every timed expert at every input length."""
    runs, meta = results["runs"], results["meta"]
    names = list(runs[0]["ms_per_record"])
    rows = [[name, *(f"{r['ms_per_record'][name]:.1f}" for r in runs)] for name in names]
    header = ["expert (12 leads; features: lead II)", *(f"{r['input_length']} ({r['input_length'] // 10} Hz)"
                                                       for r in runs)]
    return markdown_table(header, rows, "l" + "r" * len(runs)) + (
        f"\n\nms per record: the expert's forward on one LUDB record, one thread, median of {meta['repeats']} runs per "
        f"record, median over {len(runs[0]['records'])} records, the experts interleaved record by record; load "
        f"average {meta['load'][0]:.2f} at start, {meta['load'][1]:.2f} at end (2 shared cores). Run "
        f"{meta['created']}.")


TABLES = {"median_beat_accuracy": accuracy_table, "median_beat_speed": speed_table}


def main() -> None:
    p = parser(__doc__, "median_beat.json")
    p.add_argument("--quick", action="store_true", help="12 records at 500 Hz, 1 run each")
    p.add_argument("--input-lengths", default="5000,2500", help="expert input lengths (10 s records); the first is "
                   "the accuracy table's")
    p.add_argument("--records", type=int, default=200, help="the first N LUDB records")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.render_only:
        import json

        results = json.loads(args.output.read_text())
        for section, table in TABLES.items():
            save(results, None, table(results), section if args.update_docs else None, EXPERTS_DOCS)
        return
    if args.quick:
        args.records, args.repeats, args.input_lengths = 12, 1, "5000"
    import neurokit2

    torch.set_num_threads(1)
    records = (require_data("ludb") / "RECORDS").read_text().split()[: args.records]
    load = [os.getloadavg()[0]]
    runs = [run(records, int(n), args.repeats) for n in args.input_lengths.split(",")]
    load.append(os.getloadavg()[0])
    results = {"meta": {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "neurokit2": neurokit2.__version__,
                        "load": load, "repeats": args.repeats, "torch_threads": torch.get_num_threads()}, "runs": runs}
    save(results, args.output, accuracy_table(results), "median_beat_accuracy" if args.update_docs else None,
         EXPERTS_DOCS)
    save(results, None, speed_table(results), "median_beat_speed" if args.update_docs else None, EXPERTS_DOCS)


if __name__ == "__main__":
    main()
