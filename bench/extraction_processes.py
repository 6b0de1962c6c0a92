"""The feature store filled by 1 and by 2 processes, real experts (docs/benchmarks.md, "Expert speed").

`python -m enecg_hf.features` (one process, one torch thread) against `accelerate launch --num_processes 2 --cpu -m
enecg_hf.features` (two processes, one thread each: each computes its share of the records), on the same LUDB
records, each run into an empty store; the two alternate for `--repeats` rounds and the table gives medians. The
stores of both must hold the same values (compared at the end).

    python bench/extraction_processes.py --update-docs          # offline_pretrained, 48 LUDB records, 3 rounds
    python bench/extraction_processes.py --quick                 # tiny.json, 8 records, 1 round
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import DATA_DIR, machine_info, markdown_table, parser, render_only, save


SECTION = "extraction-processes"


def run(command: list[str], cache: Path) -> float:
    """Wall time of one extraction into `cache` (the store logs its own time; the launcher's start-up included)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run(command + ["--cache_dir", str(cache)], env=env, capture_output=True, text=True,
                            timeout=7200)
    if result.returncode != 0:
        raise SystemExit(f"extraction failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def free_port() -> int:
    """A TCP port nothing listens on (the rendezvous of the two processes; another run may hold 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def store_values(cache: Path) -> dict[str, dict[str, list[float]]]:
    """Every column folder of a store: {record key: values}, whatever shards the processes wrote them in."""
    import pyarrow as pa

    columns = {}
    for folder in sorted(p for p in (cache / "features").iterdir() if p.is_dir()):
        rows = {}
        for shard in sorted(folder.glob("shard-*.arrow")):
            table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
            rows.update(zip(table.column("key").to_pylist(), table.column("values").to_pylist()))
        columns[folder.name] = rows
    return columns


def measure(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="enecg-extraction-") as tmp:
        dataset = Path(tmp) / "ludb"
        subprocess.run([sys.executable, "-m", "enecg_hf.data", "--format", "ludb", "--input", str(DATA_DIR / "ludb"),
                        "--output", str(dataset), "--limit", str(args.records)], check=True, capture_output=True)
        base = ["-m", "enecg_hf.features", "--config", args.config, "--dataset", str(dataset), "--torch_threads", "1"]
        commands = {"1 process": [sys.executable, *base],
                    "2 processes": [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                                    "--cpu", "--main_process_port", str(free_port()), *base]}
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        for round_ in range(args.repeats):
            order = list(commands) if round_ % 2 == 0 else list(commands)[::-1]
            for name in order:
                cache = Path(tmp) / f"cache-{name.replace(' ', '-')}"
                shutil.rmtree(cache, ignore_errors=True)
                seconds[name].append(run(commands[name], cache))
        same = _same_stores(Path(tmp) / "cache-1-process", Path(tmp) / "cache-2-processes")
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {"config": args.config, "records": args.records, "repeats": args.repeats, "seconds": seconds,
            "median_s": medians, "speedup": medians["1 process"] / medians["2 processes"], "stores_equal": same,
            "machine": machine_info()}


def _same_stores(one: Path, two: Path) -> bool:
    """The two stores hold the same columns, records and values."""
    return store_values(one) == store_values(two)


def table(results: dict) -> str:
    m = results["machine"]
    rows = [[name, f"{results['median_s'][name]:.1f}", ", ".join(f"{s:.1f}" for s in results["seconds"][name]),
             f"{results['median_s'][name] / results['records']:.2f}"] for name in results["median_s"]]
    return (f"`{results['config']}` experts on {results['records']} LUDB records, each run into an empty store, "
            f"{results['repeats']} alternating rounds; {m['created'][:10]}, load {m['load_average']:.1f} on "
            f"{m['cpu_count']} CPUs. Speed-up of 2 processes: **{results['speedup']:.2f}×**; the two stores "
            f"{'hold the same values' if results['stores_equal'] else 'DIFFER'}.\n\n"
            + markdown_table(["extraction", "median wall time (s)", "runs (s)", "s per record"], rows, "lrrr"))


def main() -> None:
    p = parser(__doc__, "extraction_processes.json")
    p.add_argument("--config", default="offline_pretrained")
    p.add_argument("--records", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny.json, 8 records, one round")
    args = p.parse_args()
    if render_only(args, table, SECTION):
        return
    if args.quick:
        args.config, args.records, args.repeats = "tiny", 8, 1
    results = measure(args)
    save(results, args.output, table(results), SECTION if args.update_docs else None)


if __name__ == "__main__":
    main()
