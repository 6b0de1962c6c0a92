"""Dataset build throughput and memory: simulated records written to disk with `python -m enecg_hf.data`'s builder.

Each size runs in a fresh process so its peak memory is its own. Reported per size: records/s (whole build:
simulation, preprocessing, Arrow writing, save_to_disk); the peak proportional anonymous memory (`Pss_Anon`) of the
main and worker processes, next to its value before the build (imports: the package imports transformers and torch):
the memory the build really allocates; and the kernel's peak RSS of the main process and of the largest worker,
which also count pages of memory-mapped Arrow files (page cache) and, for forked workers, pages shared with the parent.

    python bench/build_dataset.py            # 1k and 10k records, 2 workers (~2-3 min on 2 cores)
    python bench/build_dataset.py --quick    # 100 and 300 records (seconds), writes nothing unless --output
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from harness import REPO, MemoryPeak, in_fresh_process, machine_info, parser, save


def run_one(records: int, num_proc: int) -> dict:
    """Build `records` simulated records into a temporary folder; runs inside the measuring process."""
    from enecg_hf.data import build

    with tempfile.TemporaryDirectory() as folder, MemoryPeak() as memory:
        started = time.perf_counter()
        result = build("simulated", output=Path(folder) / "dataset", limit=records, num_proc=num_proc)
        seconds = time.perf_counter() - started
        size = sum(path.stat().st_size for path in (Path(folder) / "dataset").rglob("*") if path.is_file())
    return {"records": records, "num_proc": num_proc, "kept": result.report.records_kept, "seconds": round(seconds, 2),
            "records_per_second": round(records / seconds, 1), **memory.report(), "dataset_mib": round(size / 2**20, 1)}


def table(runs: list[dict]) -> str:
    lines = ["| records | records/s | peak anonymous memory (before), MiB | peak RSS main (before), MiB | "
             "largest worker, MiB | dataset, MiB |"]
    lines.append("|---:" * 6 + "|")
    for r in runs:
        lines.append(f"| {r['records']} | {r['records_per_second']} ({r['seconds']} s) | "
                     f"{r['peak_anonymous_memory_all_processes_mib']} ({r['anonymous_memory_before_mib']}) | "
                     f"{r['peak_rss_main_mib']} ({r['peak_rss_before_mib']}) | {r['peak_rss_largest_worker_mib']} | "
                     f"{r['dataset_mib']} |")
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__, "build_dataset.json")
    p.add_argument("--quick", action="store_true", help="100 and 300 records, no results file by default")
    p.add_argument("--sizes", type=int, nargs="+", help="record counts (default 1000 10000)")
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(run_one(args.worker, args.num_proc)))
        return
    sizes = args.sizes or ([100, 300] if args.quick else [1000, 10000])
    runs = [in_fresh_process(__file__, ["--worker", n, "--num-proc", args.num_proc]) for n in sizes]
    results = {"benchmark": "simulated dataset build (12 x 5000 float32 per record, save_to_disk)",
               "machine": machine_info(), "runs": runs}
    output = None if args.quick and args.output == p.get_default("output") else args.output
    # docs/data.md ends with this benchmark's description: the table goes after it
    save(results, output, table(runs), "build_dataset" if args.update_docs else None, REPO / "docs" / "data.md")


if __name__ == "__main__":
    main()
