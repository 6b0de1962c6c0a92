"""Dataset build throughput and memory: simulated records written to disk with `python -m enecg_hf.data`'s builder.

Each size runs in a fresh subprocess so its peak memory is its own. Reported per size: records/s (whole build:
simulation, preprocessing, Arrow writing, save_to_disk); the peak proportional anonymous memory (`Pss_Anon`) summed
over the main and worker processes, sampled every 50 ms, next to its value before the build (imports: the `enecg_hf`
package imports transformers and torch): the memory the build really allocates; and the kernel's peak RSS of the main
process and of the largest worker, which also count the pages of memory-mapped Arrow files (reclaimable page cache)
and, for forked workers, pages shared with the parent.

    python bench/build_dataset.py            # 1k and 10k records, 2 workers (~2-3 min on 2 cores)
    python bench/build_dataset.py --quick    # 100 and 300 records (seconds), writes nothing unless --output
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from docs_sections import REPO, RESULTS, machine_info


def _rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _descendants(pid: int) -> list[int]:
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            for child in children.read_text().split():
                found += [int(child), *_descendants(int(child))]
        except OSError:
            pass
    return found


def _pss_anon_mib(pid: int) -> float:
    """Proportional anonymous memory of a process (heap etc.; not memory-mapped files or shared libraries), MiB."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class AnonymousMemoryPeak(threading.Thread):
    """Samples the summed `Pss_Anon` of this process and its workers every 50 ms and keeps the peak.

    `ru_maxrss` also counts pages of memory-mapped Arrow files (reclaimable page cache) and, for forked workers, the
    parent's shared pages; the proportional anonymous memory of the process tree is what the build really allocates.
    """

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        pid = os.getpid()
        while not self.done.wait(0.05):
            total = sum(_pss_anon_mib(process) for process in [pid, *_descendants(pid)])
            self.peak = max(self.peak, total)


def run_one(records: int, num_proc: int) -> dict:
    """Build `records` simulated records into a temporary folder; runs inside the measuring subprocess."""
    from enecg_hf.data import build

    before = _rss_mib()
    anonymous_before = _pss_anon_mib(os.getpid())
    sampler = AnonymousMemoryPeak()
    sampler.start()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = build("simulated", output=Path(folder) / "dataset", limit=records, num_proc=num_proc)
        seconds = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
        size = sum(path.stat().st_size for path in (Path(folder) / "dataset").rglob("*") if path.is_file())
    return {
        "records": records,
        "num_proc": num_proc,
        "kept": result.report.records_kept,
        "seconds": round(seconds, 2),
        "records_per_second": round(records / seconds, 1),
        "peak_anonymous_memory_all_processes_mib": round(sampler.peak, 1),
        "anonymous_memory_before_build_mib": round(anonymous_before, 1),
        "rss_before_build_mib": round(before, 1),
        "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_largest_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "dataset_mib": round(size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 and 300 records, no results file by default")
    parser.add_argument("--sizes", type=int, nargs="+", help="record counts (default 1000 10000)")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--output", type=Path, help="results JSON (default bench/results/build_dataset.json)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(run_one(args.worker, args.num_proc)))
        return
    sizes = args.sizes or ([100, 300] if args.quick else [1000, 10000])
    runs = []
    for records in sizes:
        command = [sys.executable, __file__, "--worker", str(records), "--num-proc", str(args.num_proc)]
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)
        run = json.loads(completed.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(
            f"{records:>6} records: {run['records_per_second']:>7.1f} records/s ({run['seconds']} s), peak anonymous"
            f" memory of all processes {run['peak_anonymous_memory_all_processes_mib']} MiB (before build"
            f" {run['anonymous_memory_before_build_mib']}), peak RSS main"
            f" {run['peak_rss_main_mib']} MiB (before build {run['rss_before_build_mib']}), largest worker"
            f" {run['peak_rss_largest_worker_mib']} MiB, dataset {run['dataset_mib']} MiB"
        )
    output = args.output or (None if args.quick else RESULTS / "build_dataset.json")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "benchmark": "simulated dataset build (12 x 5000 float32 per record, save_to_disk)",
            "machine": machine_info(),
            "runs": runs,
        }
        output.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
