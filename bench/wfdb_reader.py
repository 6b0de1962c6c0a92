"""WFDB reading speed: the fast reader (`enecg_hf/wfdb_enecg.py`) against wfdb, side by side in one process.

Per record (LUDB, PTB-XL sample): `io_enecg.read_record` with `FAST_WFDB = True` and `False`, and the readers alone
(`parse_header` + `read_dat_signal` against `wfdb.rdrecord`), interleaved record by record (the order rotates),
after a warm-up, median over records of the median of `--repeats` reads. Then whole builds
(`enecg_hf.data.build("ludb" / "ptb-xl", num_proc=1)`) alternating between the two paths: records/s.

    python bench/wfdb_reader.py          # LUDB 200 + PTB-XL 309 records, 3 repeats (~3 min on 2 busy cores)
    python bench/wfdb_reader.py --quick  # 20 records, 1 build each, writes nothing unless --output
    python bench/wfdb_reader.py --streaming 200 2000  # peak memory of MIMIC-IV-ECG-layout builds (fresh processes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from harness import DATA_DIR, REPO, MemoryPeak, in_fresh_process, interleaved, machine_info, median_ms, parser, save


SETS = {"ludb": ("ludb", "ludb/data/*.hea"), "ptb-xl": ("ptbxl_sample500", "ptbxl_sample500/records500/*/*.hea")}


def per_record(bases: list[Path], repeats: int) -> dict:
    import numpy as np
    import wfdb

    from enecg_hf import io_enecg
    from enecg_hf.wfdb_enecg import parse_header, read_dat_signal

    def read_record(fast):
        def call(base):
            io_enecg.FAST_WFDB = fast
            return io_enecg.read_record(base).signal
        return call

    def fast_reader(base):
        header = parse_header(Path(f"{base}.hea").read_text(encoding="ascii", errors="ignore"))
        return read_dat_signal(base.parent, header)

    calls = {"read_record/fast": read_record(True), "read_record/wfdb": read_record(False), "reader_alone/fast":
             fast_reader, "reader_alone/wfdb": lambda base: wfdb.rdrecord(str(base), return_res=32).p_signal}
    seconds = interleaved(calls, bases, repeats, warmup=5)
    for base in bases:  # the two paths give the same float32 signal
        assert np.array_equal(calls["read_record/fast"](base), calls["read_record/wfdb"](base), equal_nan=True)
    io_enecg.FAST_WFDB = True
    result = {}
    for name in ("read_record", "reader_alone"):
        fast, slow = median_ms(seconds[f"{name}/fast"]), median_ms(seconds[f"{name}/wfdb"])
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
    from enecg_hf.data import build

    with tempfile.TemporaryDirectory() as work:
        write_mimic_tree(Path(work) / "mimic", records)
        with MemoryPeak() as memory:
            started = time.perf_counter()
            report = build("mimic-iv-ecg", Path(work) / "mimic", output=Path(work) / "out", num_proc=num_proc).report
            seconds = time.perf_counter() - started
    return {"records": records, "num_proc": num_proc, "kept": report.records_kept,
            "records_per_second": round(records / seconds, 1), **memory.report()}


def table(summary: dict) -> str:
    """The table in docs/data.md: wfdb → fast, per record and per build."""
    per, build = summary["per_record"], summary["build"]
    names = {"ludb": "LUDB", "ptb-xl": "PTB-XL sample"}
    ms = lambda r: f"{r['wfdb_ms']:.2f} → {r['fast_ms']:.2f} ms ({r['speedup']:.1f}×)"
    rate = lambda b: (f"{b['wfdb_records_per_s']:.1f} → {b['fast_records_per_s']:.1f} "
                      f"({b['fast_records_per_s'] / b['wfdb_records_per_s']:.1f}×)")
    rows = {
        "`read_record` per record, wfdb → fast": [ms(r["read_record"]) for r in per.values()],
        "reader alone (`rdrecord` vs `parse_header` + `read_dat_signal`)": [ms(r["reader_alone"]) for r in per.values()],
        "dataset build, records/s": [rate(b) for b in build.values()],
    }
    lines = ["| | " + " | ".join(f"{names[f]} ({r['records']})" for f, r in per.items()) + " |"]
    lines.append("|---" * (len(per) + 1) + "|")
    return "\n".join(lines + [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows.items()])


def main() -> None:
    p = parser(__doc__, "wfdb_reader.json")
    p.add_argument("--quick", action="store_true", help="20 records, 1 build per path, no results file by default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--streaming", type=int, nargs="+", help="record counts of MIMIC-IV-ECG memory runs only")
    p.add_argument("--num-proc", type=int, default=1, help="workers of the --streaming builds")
    p.add_argument("--streaming-worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.streaming_worker is not None:
        print(json.dumps(streaming_worker(args.streaming_worker, args.num_proc)))
        return
    if args.streaming:  # added to the results file, beside the other runs
        runs = [in_fresh_process(__file__, ["--streaming-worker", n, "--num-proc", args.num_proc])
                for n in args.streaming]
        summary = json.loads(args.output.read_text()) if args.output.is_file() else {}
        summary.setdefault("streaming", {})[f"num_proc_{args.num_proc}"] = runs
        save(summary, args.output, "\n".join(map(json.dumps, runs)))
        return
    limit, repeats = (20, 1) if args.quick else (None, args.repeats)
    summary = {"benchmark": "fast WFDB reader vs wfdb (read_record per record; dataset build, num_proc=1)",
               "machine": machine_info(), "per_record": {}, "build": {}}
    for format, (name, pattern) in SETS.items():
        bases = sorted(path.with_suffix("") for path in DATA_DIR.glob(pattern))[:limit]
        if not bases:
            print(f"{format}: no records under {DATA_DIR / name}, skipped")
            continue
        summary["per_record"][format] = {"records": len(bases), "repeats": repeats, **per_record(bases, repeats)}
        summary["build"][format] = builds(format, DATA_DIR / name, limit, repeats)
    output = None if args.quick and args.output == p.get_default("output") else args.output
    save(summary, output, table(summary), "wfdb_reader" if args.update_docs else None, REPO / "docs" / "data.md")


if __name__ == "__main__":
    main()
