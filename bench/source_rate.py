"""What PTB-XL's 100 Hz files cost each expert and task: the native 500 Hz records of ../shared/data/ptbxl_sample500
against the same records taken down to 100 Hz and back up to 500 Hz, by subject-wise CV on the same folds.

The `100 Hz` version is what a user who downloaded only `records100/` gets: each record's 500 Hz file is resampled to
100 Hz with the package's `preprocessing_enecg.resample` (scipy `resample_poly`; PhysioNet's own 100 Hz file of
ecg_id 599, the one record here in both forms, matches this to 3 µV RMS once shifted by 1.2 ms), written as a
`records100/` tree (WFDB format 16 at 1 µV, as PhysioNet's) and read back by the `ptb-xl` builder, which resamples it
to 500 Hz. Everything else is bench/quality.py's: the same builder, expert features from the package's feature store,
`run_task` with the default EnECG (each expert's own head scored as well), folds from the subject ids (identical for
both versions), the same seeds and initial weights. Results: bench/results/source_rate.json; the table goes to
docs/data.md ("PTB-XL at 100 Hz").

    python bench/source_rate.py --update-docs          # 306 records, 5 folds x 3 seeds, tiny experts (~1 h, 2 cores)
    python bench/source_rate.py --pretrained ...       # also offline_pretrained.json's real openecg/DeepFADE
    python bench/source_rate.py --quick                # 40 records, 2 folds, few epochs
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import wfdb

import quality
from enecg_hf.features import GATE_INPUTS_COLUMN
from enecg_hf.io_enecg import read_record
from enecg_hf.preprocessing_enecg import resample
from harness import DATA_DIR, machine_info, markdown_table, parser, render_only, require_data, save


FOLDER = "ptbxl_sample500"
TASKS = ("age", "sex", "arrhythmia")
VERSIONS = ("native", "via_100hz")
QUICK_RECORDS = 40
DATA_DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def write_100hz_tree(source: Path, target: Path, limit: int | None) -> Path:
    """`target/FOLDER`: the PTB-XL tables of `source` and, for each of its first `limit` records with a 500 Hz file,
    that file resampled to 100 Hz as `records100/…/<ecg_id>_lr` (format 16, 1000/mV); no `records500/`."""
    folder = target / FOLDER
    folder.mkdir(parents=True)
    for name in ("ptbxl_database.csv", "scp_statements.csv"):
        shutil.copy(source / name, folder / name)
    table = pd.read_csv(source / "ptbxl_database.csv")
    for row in table.iloc[:limit].itertuples():
        if not (source / f"{row.filename_hr}.hea").is_file():
            continue
        recording = read_record(str(source / row.filename_hr))
        low = resample(recording.signal, recording.sampling_rate, 100).astype(np.float64)
        directory, name = (folder / row.filename_lr).parent, Path(row.filename_lr).name
        directory.mkdir(parents=True, exist_ok=True)
        leads = len(recording.lead_names)
        wfdb.wrsamp(name, fs=100, units=["mV"] * leads, sig_name=list(recording.lead_names), p_signal=low.T,
                    fmt=["16"] * leads, adc_gain=[1000.0] * leads, baseline=[0] * leads, write_dir=str(directory))
    return target


def embedding_drift(native: torch.Tensor, low: torch.Tensor, seed: int = 0) -> float:
    """How far 100 Hz input moves an expert's embedding, against how far apart two records' embeddings are: the
    median over records of |e_100 - e_native| divided by the median over random pairs of records of |e_i - e_j|
    (0: unchanged; 1: as different as another record)."""
    native, low = native.double(), low.double()
    moved = (low - native).norm(dim=1).median().item()
    generator = torch.Generator().manual_seed(seed)
    other = torch.randperm(len(native), generator=generator)
    apart = (native - native[other]).norm(dim=1)[other != torch.arange(len(native))].median().item()
    return moved / apart if apart > 0 else float("nan")


def headline(spec_problem_type: str) -> tuple[str, int]:
    return ("mae", -1) if spec_problem_type == "regression" else ("auroc", 1)


def compare(blocks: dict[str, dict]) -> dict:
    """Per row of a task: the headline metric of both versions (mean, std over folds x seeds) and the paired
    difference fold by fold (100 Hz minus native; the folds are the same)."""
    native, low = blocks["native"], blocks["via_100hz"]
    key, _ = headline(native["problem_type"])
    rows = {}
    for row, values in native["rows"].items():
        if row not in low["rows"]:
            continue
        a = np.array([fold.get(key, np.nan) for fold in values["per_fold"]], float)
        b = np.array([fold.get(key, np.nan) for fold in low["rows"][row]["per_fold"]], float)
        both = np.isfinite(a) & np.isfinite(b)
        difference = b[both] - a[both]
        rows[row] = {"label": values["label"], "native": values["metrics"][key],
                     "via_100hz": low["rows"][row]["metrics"][key], "difference_mean": float(difference.mean()),
                     "difference_std": float(difference.std()), "folds": int(both.sum())}
    return {"metric": key, "records": native["records"], "subjects": native["subjects"],
            "class_counts": native["class_counts"], "rows": rows}


def measure(args, store: str | None) -> dict:
    torch.set_num_threads(1)
    started, load = time.perf_counter(), os.getloadavg()
    source = require_data(FOLDER)
    limit = QUICK_RECORDS if args.quick else None
    with tempfile.TemporaryDirectory(prefix="enecg-source-rate-") as tmp:
        write_100hz_tree(source, Path(tmp), limit)
        loaded = {"native": quality.load_records({FOLDER: limit} if limit else None, {FOLDER: "ptb-xl"}, DATA_DIR),
                  "via_100hz": quality.load_records({FOLDER: limit} if limit else None, {FOLDER: "ptb-xl"}, Path(tmp))}
    (records, labels), (low_records, low_labels) = loaded["native"], loaded["via_100hz"]
    # The same records, labels and subjects in the same order: the folds of both versions are the same. (Their source
    # group differs by design: `ptb-xl@100Hz` for the records read from 100 Hz files.)
    pd.testing.assert_frame_equal(labels.drop(columns="group"), low_labels.drop(columns="group"))
    features = {version: quality.expert_features(loaded[version][0], store, args.pretrained) for version in VERSIONS}
    configs = features["native"][0]
    feature_seconds = time.perf_counter() - started
    print(f"[source_rate] expert features of {len(labels)} records x 2 versions ready after {feature_seconds:.0f} s",
          flush=True)
    experts = [name for name in features["native"][1] if name != GATE_INPUTS_COLUMN]
    drift = {name: embedding_drift(features["native"][1][name], features["via_100hz"][1][name]) for name in experts}
    runs = {version: {task: quality.run_task(task, loaded[version][0], loaded[version][1], features[version][1],
                                             configs, args) for task in TASKS} for version in VERSIONS}
    return {
        "benchmark": "source_rate", "quick": args.quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(torch_threads=1),
        "data": {"folder": FOLDER, "records": len(labels), "subjects": int(labels["subject"].nunique()),
                 "via_100hz": "records500 -> preprocessing_enecg.resample to 100 Hz -> WFDB format 16, 1000/mV -> "
                              "ptb-xl builder (auto: records100) -> resample to 500 Hz"},
        "setup": {"config": quality.CONFIG, "experts": [e["name"] for e in configs["tiny"]["experts"]],
                  "pretrained_config": quality.PRETRAINED_CONFIG if args.pretrained else None,
                  "pretrained_experts": [e["name"] for e in (configs["pretrained"] or {"experts": []})["experts"]],
                  "folds": args.folds, "seeds": args.seeds, "seed": quality.SEED, "rows": sorted(args.rows)},
        "embedding_drift": drift,
        "tasks": {task: compare({version: runs[version][task] for version in VERSIONS}) for task in TASKS},
        "runs": runs,
        "run": {"load_average_start": list(load), "load_average_end": list(os.getloadavg()),
                "feature_extraction_s": feature_seconds, "elapsed_s": time.perf_counter() - started,
                "torch_threads": 1, "cpu_count": os.cpu_count()},
    }


def table(results: dict) -> str:
    s, data, run, tasks = results["setup"], results["data"], results["run"], results["tasks"]
    first = next(iter(tasks.values()))["rows"]
    rows = ([r for r in ("enecg", "enecg_offline_pretrained", "uniform_ensemble") if r in first]
            + sorted(r for r in first if r.startswith("expert:")) + [r for r in first if r.startswith("baseline:")])
    header = ["row", *[f"{task} {block['metric'].upper()}: 500 Hz → via 100 Hz (Δ ± sd)" for task, block in
                       tasks.items()], "embedding drift"]

    def cell(block: dict, row: str) -> str:
        r = block["rows"].get(row)
        if r is None:
            return ""
        before, after, change, spread = r["native"]["mean"], r["via_100hz"]["mean"], r["difference_mean"], \
            r["difference_std"]
        if block["metric"] == "mae":
            return f"{before:.2f} → {after:.2f} ({change:+.2f} ± {spread:.2f}, {100 * change / before:+.1f} %)"
        return f"{before:.3f} → {after:.3f} ({change:+.3f} ± {spread:.3f})"

    lines = []
    for row in rows:
        name = row.split(":", 1)[1] if row.startswith("expert:") else None
        drift = results["embedding_drift"].get(name) if name else None
        lines.append([f"{name} expert alone" if name else first[row]["label"],
                      *[cell(block, row) for block in tasks.values()], "" if drift is None else f"{drift:.3f}"])
    counts = "; ".join(f"{task} {block['records']} records" + (" (" + ", ".join(
        f"{c} {n}" for c, n in block["class_counts"].items()) + ")" if block["class_counts"] else "")
        for task, block in tasks.items())
    experts = f"experts of `{s['config']}` (random weights)" + (
        f" and of `{s['pretrained_config']}` (`pretrained/…`; openecg and DeepFADE with their real weights)"
        if s["pretrained_experts"] else "")
    seeds = f"{s['seeds']} seed{'s' if s['seeds'] > 1 else ''}"
    return "\n".join([
        f"Setup: {data['records']} records of `{data['folder']}` ({data['subjects']} subjects), native and via 100 Hz; "
        f"{s['folds']}-fold subject-wise CV × {seeds}, the same folds for both; {experts}; {counts}.",
        "",
        markdown_table(header, lines, "l" + "r" * (len(header) - 1)),
        "",
        "Δ: mean over folds × seeds of the 100 Hz score minus the native one on the same fold (± its sd); MAE lower "
        "and AUROC higher is better. Embedding drift: median |e(100 Hz) − e(native)| over records ÷ median "
        f"|e(record) − e(another record)| (0: unchanged, 1: as far as another record). Run {results['created']}: "
        f"{run['elapsed_s'] / 60:.0f} min on {run['cpu_count']} shared cores, load average "
        f"{run['load_average_start'][0]:.2f} at start.",
    ])


def main() -> None:
    options = parser(__doc__, "source_rate.json")
    add = options.add_argument
    add("--quick", action="store_true", help=f"{QUICK_RECORDS} records, 2 folds, few epochs")
    add("--folds", type=int, default=None, help="default 5 (2 with --quick)")
    add("--seeds", type=int, default=None, help="seeds (default 3; 1 with --quick)")
    add("--pretrained", action=argparse.BooleanOptionalAction, default=False,
        help=f"add the experts of {quality.PRETRAINED_CONFIG} with real weights (default: off)")
    add("--feature-store", default=None, help="the feature store's folder (default: the package's shared store; '' "
        "for a temporary one)")
    args = options.parse_args()
    if render_only(args, table, "source_rate", DATA_DOCS):
        return
    args.folds, args.seeds = args.folds or (2 if args.quick else 5), args.seeds or (1 if args.quick else 3)
    args.ablation_seeds = args.seeds
    args.rows = {"enecg", *(["enecg_offline_pretrained"] if args.pretrained else [])}
    store = (tempfile.TemporaryDirectory(prefix="enecg-source-rate-store-") if args.feature_store == ""
             else nullcontext(args.feature_store))
    with store as folder:
        results = measure(args, folder)
    save(results, args.output, table(results), "source_rate" if args.update_docs else None, DATA_DOCS)


if __name__ == "__main__":
    main()
