"""WFDB reading speed: the fast reader (`enecg_hf/wfdb_enecg.py`) against wfdb, side by side in one process.

Per record (LUDB, PTB-XL sample): `io_enecg.read_record` with `FAST_WFDB = True` and `False`, and the readers alone
(`parse_header` + `read_dat_signal` against `wfdb.rdrecord`), interleaved record by record (the order alternates),
after a warm-up, median over records of the median of `--repeats` reads. Then whole builds
(`enecg_hf.data.build("ludb" / "ptb-xl", num_proc=1)`) alternating between the two paths: records/s.

    python bench/wfdb_reader.py          # LUDB 200 + PTB-XL 309 records, 3 repeats (~3 min on 2 busy cores)
    python bench/wfdb_reader.py --quick  # 20 records, 1 build each, writes nothing unless --output
    python bench/wfdb_reader.py --streaming 200 2000  # peak memory of MIMIC-IV-ECG-layout builds (fresh processes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from docs_sections import DATA_DIR, REPO


RESULTS = REPO / "bench" / "results" / "wfdb_reader.json"
SETS = {"ludb": ("ludb", "ludb/data/*.hea"), "ptb-xl": ("ptbxl_sample500", "ptbxl_sample500/records500/*/*.hea")}


def per_record(bases: list[Path], repeats: int) -> dict:
    import numpy as np
    import wfdb

    from enecg_hf import io_enecg
    from enecg_hf.wfdb_enecg import parse_header, read_dat_signal

    def package(base, fast):
        io_enecg.FAST_WFDB = fast
        return io_enecg.read_record(base).signal

    def reader(base, fast):
        if fast:
            header = parse_header(Path(f"{base}.hea").read_text(encoding="ascii", errors="ignore"))
            return read_dat_signal(base.parent, header)
        return wfdb.rdrecord(str(base), return_res=32).p_signal

    timings = {name: {True: [], False: []} for name in ("read_record", "reader_alone")}
    for index, base in enumerate(bases[:5] + bases):  # the first five again as warm-up, not timed
        for name, function in (("read_record", package), ("reader_alone", reader)):
            order = (True, False) if index % 2 else (False, True)
            runs = {True: [], False: []}
            for _ in range(repeats):
                for fast in order:
                    started = time.perf_counter()
                    function(base, fast)
                    runs[fast].append(time.perf_counter() - started)
            if index >= 5:
                for fast in (True, False):
                    timings[name][fast].append(statistics.median(runs[fast]))
        if index >= 5:  # the two paths give the same float32 signal
            assert np.array_equal(package(base, True), package(base, False), equal_nan=True)
    io_enecg.FAST_WFDB = True
    result = {}
    for name, runs in timings.items():
        fast, slow = statistics.median(runs[True]) * 1e3, statistics.median(runs[False]) * 1e3
        result[name] = {"fast_ms": round(fast, 3), "wfdb_ms": round(slow, 3), "speedup": round(slow / fast, 1)}
    return result


def builds(format: str, folder: Path, limit: int | None, repeats: int) -> dict:
    from enecg_hf import io_enecg
    from enecg_hf.data import build

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


def write_mimic_tree(root: Path, records: int) -> None:
    """A MIMIC-IV-ECG folder of `records` 12-lead 10 s format-16 records of random ADC values (headers as MIMIC
    writes them, with checksums), `record_list.csv` and `machine_measurements.csv`."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    leads = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
    rows = []
    for index in range(records):
        subject, study = 10000000 + index // 3, 40000000 + index
        relative = f"files/p{str(subject)[:4]}/p{subject}/s{study}/{study}"
        folder = root / relative.rsplit("/", 1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        digital = rng.normal(scale=100.0, size=(5000, 12)).astype("<i2")
        digital.tofile(folder / f"{study}.dat")
        sums = digital.astype(np.int64).sum(axis=0)
        lines = [f"{study} 12 500 5000 08:44:00 23/07/2180"] + [
            f"{study}.dat 16 200.0(0)/mV 16 0 {digital[0, i]} {int(sums[i]) % 65536 - 65536 * (int(sums[i]) % 65536 > 32767)} 0 {lead}"
            for i, lead in enumerate(leads)]
        (folder / f"{study}.hea").write_text("\n".join(lines) + "\n")
        rows.append({"subject_id": subject, "study_id": study, "path": relative, "rr_interval": 800 + index % 400,
                     "report_0": "Sinus rhythm"})
    table = pd.DataFrame(rows)
    table[["subject_id", "study_id", "path"]].to_csv(root / "record_list.csv", index=False)
    table[["subject_id", "study_id", "rr_interval", "report_0"]].to_csv(root / "machine_measurements.csv", index=False)


def streaming_worker(records: int, num_proc: int) -> dict:
    """Build a `records`-record MIMIC-IV-ECG tree in this (fresh) process; peak memory of the build."""
    import resource
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from build_dataset import AnonymousMemoryPeak, _pss_anon_mib

    from enecg_hf.data import build

    with tempfile.TemporaryDirectory() as work:
        write_mimic_tree(Path(work) / "mimic", records)
        before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        before_anonymous = _pss_anon_mib(os.getpid())
        sampler = AnonymousMemoryPeak()
        sampler.start()
        started = time.perf_counter()
        report = build("mimic-iv-ecg", Path(work) / "mimic", output=Path(work) / "out", num_proc=num_proc).report
        seconds = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
    return {"records": records, "num_proc": num_proc, "kept": report.records_kept,
            "records_per_second": round(records / seconds, 1),
            "peak_anonymous_memory_all_processes_mib": round(sampler.peak, 1),
            "anonymous_memory_before_build_mib": round(before_anonymous, 1),
            "peak_rss_before_build_mib": round(before_rss, 1),
            "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_largest_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def streaming(sizes: list[int], num_proc: int) -> list[dict]:
    import subprocess
    import sys

    runs = []
    for records in sizes:
        command = [sys.executable, __file__, "--streaming-worker", str(records), "--num-proc", str(num_proc)]
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)
        runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 records, 1 build per path, no results file by default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, help=f"results JSON (default {RESULTS.relative_to(REPO)})")
    parser.add_argument("--streaming", type=int, nargs="+", help="record counts of MIMIC-IV-ECG memory runs only")
    parser.add_argument("--num-proc", type=int, default=1, help="workers of the --streaming builds")
    parser.add_argument("--streaming-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.streaming_worker is not None:
        print(json.dumps(streaming_worker(args.streaming_worker, args.num_proc)))
        return
    if args.streaming:
        runs = streaming(args.streaming, args.num_proc)
        output = args.output or RESULTS
        summary = json.loads(output.read_text()) if output.is_file() else {}
        summary.setdefault("streaming", {})[f"num_proc_{args.num_proc}"] = runs
        output.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {output}")
        return
    limit, repeats, build_repeats = (20, 1, 1) if args.quick else (None, args.repeats, args.repeats)
    summary = {"benchmark": "fast WFDB reader vs wfdb (read_record per record; dataset build, num_proc=1)",
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "per_record": {}, "build": {}}
    for format, (name, pattern) in SETS.items():
        bases = sorted(path.with_suffix("") for path in DATA_DIR.glob(pattern))[:limit]
        if not bases:
            print(f"{format}: no records under {DATA_DIR / name}, skipped")
            continue
        summary["per_record"][format] = {"records": len(bases), "repeats": repeats, **per_record(bases, repeats)}
        summary["build"][format] = builds(format, DATA_DIR / name, limit, build_repeats)
        print(format, json.dumps(summary["per_record"][format]), json.dumps(summary["build"][format]))
    output = args.output or (None if args.quick else RESULTS)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
