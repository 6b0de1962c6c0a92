"""WFDB reading speed: the fast reader (`enecg_hf/wfdb_enecg.py`) against wfdb, side by side in one process.

Per record (LUDB, PTB-XL sample): `io_enecg.read_record` with `FAST_WFDB = True` and `False`, and the readers alone
(`parse_header` + `read_dat_signal` against `wfdb.rdrecord`), interleaved record by record (the order alternates),
after a warm-up, median over records of the median of `--repeats` reads. Then whole builds
(`enecg_hf.data.build("ludb" / "ptb-xl", num_proc=1)`) alternating between the two paths: records/s.

    python bench/wfdb_reader.py          # LUDB 200 + PTB-XL 309 records, 3 repeats (~3 min on 2 busy cores)
    python bench/wfdb_reader.py --quick  # 20 records, 1 build each, writes nothing unless --output
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


REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data"))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 records, 1 build per path, no results file by default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, help=f"results JSON (default {RESULTS.relative_to(REPO)})")
    args = parser.parse_args()
    limit, repeats, build_repeats = (20, 1, 1) if args.quick else (None, args.repeats, args.repeats)
    summary = {"benchmark": "fast WFDB reader vs wfdb (read_record per record; dataset build, num_proc=1)",
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "per_record": {}, "build": {}}
    for format, (name, pattern) in SETS.items():
        bases = sorted(path.with_suffix("") for path in DATA.glob(pattern))[:limit]
        if not bases:
            print(f"{format}: no records under {DATA / name}, skipped")
            continue
        summary["per_record"][format] = {"records": len(bases), "repeats": repeats, **per_record(bases, repeats)}
        summary["build"][format] = builds(format, DATA / name, limit, build_repeats)
        print(format, json.dumps(summary["per_record"][format]), json.dumps(summary["build"][format]))
    output = args.output or (None if args.quick else RESULTS)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
