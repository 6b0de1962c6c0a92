"""Processes: CPU mode for multi-process runs, the fix-up for `accelerate launch --cpu --num_processes N`, and the
logging of each process."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import TrainingSetupError


logger = logging.getLogger(__name__)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def use_cpu() -> bool:
    """Run on the CPU: asked for (`accelerate launch --cpu` sets ACCELERATE_USE_CPU), or several processes on a machine
    without CUDA. `Accelerator(cpu=True)` is what makes accelerate pick its MULTI_CPU (gloo) mode for the latter."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return _truthy(os.environ.get("ACCELERATE_USE_CPU")) or (world_size > 1 and not torch.cuda.is_available())


def requested_cpu_processes() -> int | None:
    """The N of `accelerate launch --cpu --num_processes N` when accelerate started only this one process.

    accelerate's plain launcher starts a single process for `--cpu` whatever `--num_processes` says (it expects mpirun
    for multi-CPU runs; huggingface/accelerate#2741). It still exports MASTER_ADDR/MASTER_PORT when N > 1, so a lone
    process with those set and no rank variables was asked for N processes: N is read from the launcher's command
    line, or from the accelerate config file it used."""
    if not _truthy(os.environ.get("ACCELERATE_USE_CPU")) or "MASTER_ADDR" not in os.environ:
        return None
    if any(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        return None
    try:
        launcher = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        launcher = []
    for i, arg in enumerate(launcher):
        if arg == "--num_processes" and i + 1 < len(launcher) and launcher[i + 1].isdigit():
            return int(launcher[i + 1])
        if arg.startswith("--num_processes="):
            return int(arg.split("=", 1)[1])
    try:
        from accelerate.commands.config import default_config_file, load_config_from_file

        config_file = next((launcher[i + 1] for i, a in enumerate(launcher[:-1]) if a == "--config_file"), None)
        if config_file or Path(default_config_file).is_file():
            return int(load_config_from_file(config_file).num_processes or 1)
    except Exception:  # no readable config: fall through to the warning below
        pass
    logger.warning("accelerate launch --cpu started one process; could not tell how many were asked for")
    return None


def relaunch_on_cpu(num_processes: int, argv: Sequence[str], module: str | None = None) -> None:
    """Start `num_processes` copies of this script (or of `python -m module`) with torch's elastic launcher (what
    `torchrun` runs): gloo on the CPU, rendezvous at the MASTER_ADDR/MASTER_PORT accelerate exported. Exits 0 when
    every process succeeded (torch's launcher raises, and so exits non-zero, when one fails)."""
    from torch.distributed.run import main as torchrun

    target = ["-m", module] if module else [sys.argv[0]]
    name = module or Path(sys.argv[0]).name
    print(f"{name}: accelerate launch --cpu runs one process (huggingface/accelerate#2741); starting "
          f"{num_processes} CPU processes with torch.distributed.run", file=sys.stderr, flush=True)
    torchrun(["--nproc_per_node", str(num_processes), "--master_addr", os.environ["MASTER_ADDR"],
              "--master_port", os.environ.get("MASTER_PORT", "29500"), *target, *argv])
    sys.exit(0)


def setup_logging(state) -> None:
    """Logging of one process of a run (`state`: its `Accelerator` or `PartialState`): our INFO messages and the
    warnings of datasets and transformers on the main process, only errors (and no progress bars) on the others."""
    import datasets
    import transformers

    level = logging.INFO if state.is_main_process else logging.ERROR
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING if state.is_main_process else logging.ERROR, force=True)
    logging.getLogger("enecg_hf").setLevel(level)
    if state.is_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:  # main-process-only logging
        datasets.utils.logging.set_verbosity_error()
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def run_command(argv: Sequence[str] | None, parse_args: Callable[[list[str]], Any], run: Callable[[Any], Any],
                module: str | None = None) -> Any:
    """A command line's `main()`: parse `argv` (`sys.argv` by default) first, so that errors in the arguments show
    before any process starts; start the N CPU processes `accelerate launch --cpu --num_processes N` asked for
    (`module`: started as `python -m module`); then `run` them. `TrainingSetupError` exits with its message, not a
    traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        processes = requested_cpu_processes()
        if processes and processes > 1:
            relaunch_on_cpu(processes, argv, module=module)
        return run(args)
    except TrainingSetupError as error:
        raise SystemExit(str(error)) from None
