"""What every benchmark script shares: paths, the machine, LUDB records, side-by-side timing, fresh-process memory, and
writing results (JSON in bench/results/, a table in docs between `<!-- NAME:start -->` and `<!-- NAME:end -->`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs" / "benchmarks.md"
DATA_DIR = Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data"))
LUDB = DATA_DIR / "ludb"


def machine_info(**extra) -> dict:
    """Platform, Python, torch and transformers versions, CPU count and memory, plus `extra` (threads, device)."""
    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "memory_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "load_average": os.getloadavg()[0], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    if str(extra.get("device", "")).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parser(doc: str, output: str) -> argparse.ArgumentParser:
    """The options every script has: `--output` (default bench/results/OUTPUT), `--update-docs`, `--render-only`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=RESULTS / output)
    p.add_argument("--update-docs", action="store_true", help="rewrite this script's table in the docs")
    p.add_argument("--render-only", action="store_true", help="measure nothing: print the table of the results in "
                   "--output (and, with --update-docs, rewrite the docs section from them)")
    return p


def render_only(args: argparse.Namespace, table: Callable[[dict], str], section: str, docs: Path = DOCS) -> bool:
    """With `--render-only`, print (and with `--update-docs` write) the table of the saved results; True if so."""
    if args.render_only:
        results = json.loads(args.output.read_text())
        save(results, None, table(results), section if args.update_docs else None, docs)
    return args.render_only


def save(results: dict, output: Path | None, table: str, section: str | None = None, docs: Path = DOCS) -> None:
    """Write `results` to `output` (None: nothing), print `table`, and put it in section `section` of `docs`."""
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
        print(f"wrote {output}")
    print(table)
    if section:
        replace_section(section, table, docs)


def replace_section(name: str, body: str, docs: Path = DOCS) -> None:
    """Put `body` between the markers of section `name` (added at the end when missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = docs.read_text() if docs.is_file() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    docs.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def require_data(name: str = "ludb") -> Path:
    """The real-ECG folder `name` under DATA_DIR; a clear exit, not a traceback, when it is not there."""
    if not (DATA_DIR / name).is_dir():
        raise SystemExit(f"{DATA_DIR / name} not found: this benchmark reads real ECGs (../shared/data next to the "
                         "repository); set ENECG_DATA_DIR to the folder that holds them")
    return DATA_DIR / name


def ludb(limit: int | None = None):
    """LUDB through the package's builder: `(dataset, signals)`, signals a float32 tensor (records, 12, 5000)."""
    import numpy as np
    import torch

    from enecg_hf.data import build_dataset

    dataset = build_dataset("ludb", require_data("ludb"), limit=limit)
    return dataset, torch.from_numpy(np.asarray(dataset.with_format("numpy")["signal"], dtype=np.float32))


def interleaved(calls: dict[str, Callable[[Any], Any]], items: Sequence, repeats: int = 3, warmup: int = 1
                ) -> dict[str, list[float]]:
    """Seconds per item of every call, measured side by side: for each item, `repeats` rounds of all calls in an
    order that rotates from item to item (so load from other jobs hits them alike); the median of the rounds. The
    first `warmup` items run once untimed first."""
    names = list(calls)
    for item in items[:warmup]:
        for name in names:
            calls[name](item)
    seconds = {name: [] for name in names}
    for i, item in enumerate(items):
        rounds = {name: [] for name in names}
        for _ in range(repeats):
            for name in names[i % len(names):] + names[:i % len(names)]:
                start = time.perf_counter()
                calls[name](item)
                rounds[name].append(time.perf_counter() - start)
        for name in names:
            seconds[name].append(statistics.median(rounds[name]))
    return seconds


def median_ms(seconds: Sequence[float]) -> float:
    return 1000 * statistics.median(seconds)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; `align` has one letter per column, `r` for right-aligned (numbers), anything else left."""
    rule = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in [header, rule, *rows])


def pss_anon_mib(pid: int) -> float:
    """Proportional anonymous memory of a process (heap etc.; not memory-mapped files or shared libraries), MiB."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemoryPeak(threading.Thread):
    """`with MemoryPeak() as peak:` samples the summed `Pss_Anon` of this process and its workers every 50 ms.

    `ru_maxrss` also counts pages of memory-mapped Arrow files (reclaimable page cache) and, for forked workers, the
    parent's shared pages; the proportional anonymous memory of the process tree is what a job really allocates.
    `before` is the value on entry, `peak` the largest sample, `rss_before` the peak RSS on entry."""

    def __init__(self):
        super().__init__(daemon=True)
        self.before = self.peak = self.rss_before = 0.0
        self.done = threading.Event()

    def sample(self) -> float:
        import psutil

        me = psutil.Process()
        return sum(pss_anon_mib(p.pid) for p in [me, *me.children(recursive=True)])

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> "MemoryPeak":
        self.before, self.rss_before = self.sample(), peak_rss_mib()["main"]
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()

    def report(self) -> dict[str, float]:
        return {"peak_anonymous_memory_all_processes_mib": round(self.peak, 1),
                "anonymous_memory_before_mib": round(self.before, 1), "peak_rss_before_mib": round(self.rss_before, 1),
                **{f"peak_rss_{k}_mib": round(v, 1) for k, v in peak_rss_mib().items()}}


def peak_rss_mib() -> dict[str, float]:
    """This process's own peak RSS (VmHWM: `ru_maxrss` would carry a parent's peak over an exec) and its largest
    finished child's."""
    import resource

    status = Path("/proc/self/status").read_text().splitlines()
    main = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    return {"main": main, "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def in_fresh_process(script: str | Path, args: Sequence[str], threads: int | None = None,
                     memory_limit_gb: float | None = None) -> dict:
    """Run `python script *args` in a new process (so its peak memory is its own) and return the JSON object on the
    last line of its output; with `memory_limit_gb` the process is stopped when its RSS passes that."""
    import psutil

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            rss = psutil.Process(proc.pid).memory_info().rss
        except psutil.Error:
            rss = 0
        if memory_limit_gb and rss > memory_limit_gb * 2**30:
            proc.kill()
            raise RuntimeError(f"{script} {' '.join(map(str, args))} passed the memory limit ({memory_limit_gb} GB)")
        time.sleep(0.05)
    reader.join()
    if proc.returncode or not lines:
        raise RuntimeError(f"{script} {' '.join(map(str, args))} failed (exit {proc.returncode}):\n"
                           + "".join(lines)[-4000:])
    return json.loads(lines[-1])
