"""Dataset builds (`enecg_hf.data.build`): the fast WFDB reader against wfdb, and the speed and memory of builds.

Three parts, each kept under its own key of the results file:

readers    Per record (LUDB, PTB-XL sample): `io_enecg.read_record` with `FAST_WFDB = True` and `False`, and the readers
           alone (`parse_header` + `read_dat_signal` against `wfdb.rdrecord`), interleaved record by record (the order
           rotates), after a warm-up, median over records of the median of `--repeats` reads. Then whole builds
           (`build("ludb" / "ptb-xl", num_proc=1)`) alternating between the two paths: records/s.
simulated  `build("simulated")` of N records saved to disk (simulation, preprocessing, Arrow writing, save_to_disk).
streaming  `build("mimic-iv-ecg")` of a MIMIC-IV-ECG-layout folder of N random format-16 records (written first).

Every simulated or streaming build runs in a fresh process so its peak memory is its own. Reported per build:
records/s; the peak proportional anonymous memory (`Pss_Anon`) of the main and worker processes, next to its value
before the build (imports: the package imports transformers and torch): the memory the build really allocates; and
the kernel's peak RSS of the main process and of the largest worker, which also count pages of memory-mapped Arrow
files (page cache) and, for forked workers, pages shared with the parent.

    python bench/data_build.py readers --update-docs    # the default part; LUDB 200 + PTB-XL 309 records (~3 min)
    python bench/data_build.py simulated --update-docs  # 1k and 10k records, 2 workers (~2-3 min on 2 cores)
    python bench/data_build.py streaming 200 2000 6000 --num-proc 1   # added to the results beside other num-procs
    python bench/data_build.py readers --quick  # 20 records, 1 build per path; simulated --quick: 100 and 300 records
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from enecg_hf import io_enecg
from enecg_hf.data import build
from enecg_hf.wfdb_enecg import parse_header, read_dat_signal
from harness import (DATA_DIR, REPO, MemoryPeak, in_fresh_process, interleaved, machine_info, markdown_table,
                     median_ms, parser, render_only, save)


DATA_DOCS = REPO / "docs" / "data.md"
SETS = {"ludb": ("LUDB", "ludb", "ludb/data/*.hea"),
        "ptb-xl": ("PTB-XL sample", "ptbxl_sample500", "ptbxl_sample500/records500/*/*.hea")}
SIZES = {"simulated": [1000, 10000], "streaming": [200, 2000, 6000]}
QUICK_SIZES = {"simulated": [100, 300], "streaming": [50]}
MIMIC_LEADS = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]  # MIMIC's order


def read_record(fast: bool, base: Path) -> np.ndarray:
    io_enecg.FAST_WFDB = fast
    return io_enecg.read_record(base).signal


def fast_reader(base: Path) -> np.ndarray:
    return read_dat_signal(base.parent, parse_header(Path(f"{base}.hea").read_text(encoding="ascii", errors="ignore")))


def per_record(bases: list[Path], repeats: int) -> dict:
    import wfdb  # not imported by the package's builders

    calls = {"read_record/fast": partial(read_record, True), "read_record/wfdb": partial(read_record, False),
             "reader_alone/fast": fast_reader,
             "reader_alone/wfdb": lambda base: wfdb.rdrecord(str(base), return_res=32).p_signal}
    seconds = interleaved(calls, bases, repeats, warmup=5)
    for base in bases:  # the two paths give the same float32 signal
        assert np.array_equal(read_record(True, base), read_record(False, base), equal_nan=True)
    io_enecg.FAST_WFDB = True
    result = {}
    for name in ("read_record", "reader_alone"):
        fast, slow = median_ms(seconds[f"{name}/fast"]), median_ms(seconds[f"{name}/wfdb"])
        result[name] = {"fast_ms": round(fast, 3), "wfdb_ms": round(slow, 3), "speedup": round(slow / fast, 1)}
    return result


def builds(format: str, folder: Path, limit: int | None, repeats: int) -> dict:
    rates = {True: [], False: []}
    for repeat in range(repeats):
        for fast in ((True, False) if repeat % 2 else (False, True)):
            io_enecg.FAST_WFDB = fast
            with tempfile.TemporaryDirectory() as work:
                started = time.perf_counter()
                report = build(format, folder, limit=limit, num_proc=1, cache_dir=work).report
                rates[fast].append(report.records_read / (time.perf_counter() - started))
    io_enecg.FAST_WFDB = True
    fast, slow = statistics.median(rates[True]), statistics.median(rates[False])
    return {"records": report.records_read, "kept": report.records_kept, "fast_records_per_s": round(fast, 1),
            "wfdb_records_per_s": round(slow, 1), "speedup": round(fast / slow, 2),
            "runs_fast": [round(r, 1) for r in rates[True]], "runs_wfdb": [round(r, 1) for r in rates[False]]}


def readers(limit: int | None, repeats: int) -> dict:
    results = {"benchmark": "fast WFDB reader vs wfdb (read_record per record; dataset build, num_proc=1)",
               "machine": machine_info(), "per_record": {}, "build": {}}
    for format, (_, folder, pattern) in SETS.items():
        bases = sorted(path.with_suffix("") for path in DATA_DIR.glob(pattern))[:limit]
        if not bases:
            print(f"{format}: no records under {DATA_DIR / folder}, skipped")
            continue
        results["per_record"][format] = {"records": len(bases), "repeats": repeats, **per_record(bases, repeats)}
        results["build"][format] = builds(format, DATA_DIR / folder, limit, repeats)
    if not results["per_record"]:
        raise SystemExit(f"No LUDB or PTB-XL records under {DATA_DIR}: set ENECG_DATA_DIR to the real ECGs' folder")
    return results


def write_mimic_tree(root: Path, records: int) -> None:
    """A MIMIC-IV-ECG folder of `records` 12-lead 10 s format-16 records of random ADC values, `record_list.csv` and
    `machine_measurements.csv`."""
    # pandas only after the package: a process its import forks would inherit pandas' RSS ("largest worker")
    import pandas as pd
    import wfdb

    rng = np.random.default_rng(0)
    rows = []
    for index in range(records):
        subject, study = 10000000 + index // 3, 40000000 + index
        relative = f"files/p{str(subject)[:4]}/p{subject}/s{study}/{study}"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        wfdb.wrsamp(str(study), fs=500, units=["mV"] * 12, sig_name=MIMIC_LEADS, fmt=["16"] * 12,
                    d_signal=rng.normal(scale=100.0, size=(5000, 12)).astype("<i2"), adc_gain=[200.0] * 12,
                    baseline=[0] * 12, write_dir=str((root / relative).parent))
        rows.append({"subject_id": subject, "study_id": study, "path": relative, "rr_interval": 800 + index % 400,
                     "report_0": "Sinus rhythm"})
    table = pd.DataFrame(rows)
    table[["subject_id", "study_id", "path"]].to_csv(root / "record_list.csv", index=False)
    table[["subject_id", "study_id", "rr_interval", "report_0"]].to_csv(root / "machine_measurements.csv", index=False)


def fresh_build(part: str, records: int, num_proc: int) -> dict:
    """Build `records` simulated or MIMIC-IV-ECG-layout (`part`) records into a temporary folder; runs inside the
    fresh process that measures it."""
    with tempfile.TemporaryDirectory() as work:
        format, source, output = "simulated", None, Path(work) / "dataset"
        if part == "streaming":
            format, source = "mimic-iv-ecg", Path(work) / "mimic"
            write_mimic_tree(source, records)
        with MemoryPeak() as memory:
            started = time.perf_counter()
            report = build(format, source, output=output, limit=records, num_proc=num_proc).report
            seconds = time.perf_counter() - started
        size = sum(path.stat().st_size for path in output.rglob("*") if path.is_file())
    return {"records": records, "num_proc": num_proc, "kept": report.records_kept, "seconds": round(seconds, 2),
            "records_per_second": round(records / seconds, 1), **memory.report(), "dataset_mib": round(size / 2**20, 1)}


def readers_table(results: dict) -> str:
    """wfdb → fast, per record and per build (docs/data.md)."""
    per, build = results["readers"]["per_record"], results["readers"]["build"]

    def ms(r):
        return f"{r['wfdb_ms']:.2f} → {r['fast_ms']:.2f} ms ({r['speedup']:.1f}×)"

    def rate(b):
        fast, slow = b["fast_records_per_s"], b["wfdb_records_per_s"]
        return f"{slow:.1f} → {fast:.1f} ({fast / slow:.1f}×)"

    header = ["", *(f"{SETS[f][0]} ({r['records']})" for f, r in per.items())]
    rows = [["`read_record` per record, wfdb → fast", *(ms(r["read_record"]) for r in per.values())],
            ["reader alone (`rdrecord` vs `parse_header` + `read_dat_signal`)",
             *(ms(r["reader_alone"]) for r in per.values())],
            ["dataset build, records/s", *(rate(b) for b in build.values())]]
    return markdown_table(header, rows)


def runs_table(runs: list[dict]) -> str:
    """One row per fresh-process build."""
    header = ["records", "records/s", "peak anonymous memory (before), MiB", "peak RSS main (before), MiB",
              "largest worker, MiB", "dataset, MiB"]
    rows = [[r["records"], f"{r['records_per_second']} ({r['seconds']} s)",
             f"{r['peak_anonymous_memory_all_processes_mib']} ({r['anonymous_memory_before_mib']})",
             f"{r['peak_rss_main_mib']} ({r['peak_rss_before_mib']})", r["peak_rss_largest_worker_mib"],
             r["dataset_mib"]] for r in runs]
    return markdown_table(header, rows, "rrrrrr")


TABLES = {"wfdb_reader": readers_table, "build_dataset": lambda results: runs_table(results["simulated"]["runs"])}


def main() -> None:
    p = parser(__doc__, "data_build.json")
    p.add_argument("part", nargs="?", choices=["readers", "simulated", "streaming"], default="readers")
    p.add_argument("records", type=int, nargs="*", help="record counts of the simulated or streaming builds")
    p.add_argument("--quick", action="store_true", help="few records, 1 repeat, no results file unless --output")
    p.add_argument("--repeats", type=int, default=3, help="readers: reads per record and builds per path")
    p.add_argument("--num-proc", type=int, default=2, help="workers of the simulated and streaming builds")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(fresh_build(args.part, args.records[0], args.num_proc)))
        return
    if args.render_only:  # both docs tables
        for section, table in TABLES.items():
            render_only(args, table, section, DATA_DOCS)
        return
    results = json.loads(args.output.read_text()) if args.output.is_file() else {}  # the other parts stay
    if args.part == "readers":
        results["readers"] = readers(20 if args.quick else None, 1 if args.quick else args.repeats)
        table, section = readers_table(results), "wfdb_reader"
    else:
        sizes = args.records or (QUICK_SIZES if args.quick else SIZES)[args.part]
        runs = [in_fresh_process(__file__, [args.part, n, "--worker", "--num-proc", args.num_proc]) for n in sizes]
        if args.part == "simulated":
            results["simulated"] = {"benchmark": "simulated dataset build (12 x 5000 float32 per record, save_to_disk)",
                                    "machine": machine_info(), "runs": runs}
        else:
            results.setdefault("streaming", {})[f"num_proc_{args.num_proc}"] = runs
        table, section = runs_table(runs), "build_dataset" if args.part == "simulated" else None
    output = None if args.quick and args.output == p.get_default("output") else args.output
    save(results, output, table, section if args.update_docs else None, DATA_DOCS)


if __name__ == "__main__":
    main()
