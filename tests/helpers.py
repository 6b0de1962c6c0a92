"""Helpers shared by the serving, app, training and expert tests."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
import torch
from torch.overrides import TorchFunctionMode

from enecg_hf.preprocessing_enecg import STANDARD_LEAD_NAMES


# The data tests' file writers (`ecg_files`: WFDB records, hostile .mat/.hea files) are shared with these tests.
sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))


REPO = Path(__file__).resolve().parents[1]
# Real recordings: ../shared/data next to the checkout, or wherever ENECG_DATA_DIR points (as in bench/).
SHARED_DATA = Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data"))
STANDARD = list(STANDARD_LEAD_NAMES)

# Prepended to a `python -c` script: every import of enecg_hf fails, as on a machine without the package.
BLOCK_ENECG = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "enecg_hf" or name.startswith("enecg_hf."):
                raise ImportError("enecg_hf is blocked in this process")
    sys.meta_path.insert(0, Block())
    try:
        import enecg_hf
        raise SystemExit("enecg_hf should be blocked")
    except ImportError:
        pass
    """
)


def hide_module(monkeypatch, module: str) -> None:
    """`import <module>` raises ImportError for the rest of the test, as on a machine where it is not installed."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == module:
            raise ImportError(f"No module named {module!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def accelerate_two_cpu_processes() -> list[str]:
    """`accelerate launch --num_processes 2 --cpu` on a free rendezvous port: the default (29500) may be held by
    another run on the same machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--main_process_port",
            str(port)]


def shared(*parts: str) -> Path:
    """A file or WFDB record (named without suffix) under ../shared/data, or skip the test."""
    path = SHARED_DATA.joinpath(*parts)
    if not (path.exists() or path.with_name(path.name + ".hea").exists()):
        pytest.skip(f"real ECG data not found at {path.resolve()} (see ../shared/data/README.md)")
    return path


def build_model_folder(folder: Path, experts: list[str], **overrides) -> Path:
    """A tiny EnECG model (random experts, random heads) saved and made serving-ready, as train.py leaves it."""
    from enecg_hf import EnECGConfig, EnECGModel
    from enecg_hf.training.serving_export import export_serving_files

    config = json.loads((REPO / "hub_configs" / "tiny.json").read_text())
    config["experts"] = [e for e in config["experts"] if e["name"] in experts]
    config.update(overrides)
    config.pop("model_type", None)
    torch.manual_seed(0)
    model = EnECGModel(EnECGConfig(**config)).eval()
    with torch.no_grad():  # a new head's linear path is zero (it predicts the target mean); a trained one's is not
        for name, parameter in model.named_parameters():
            if "heads." in name and name.endswith(".linear.weight"):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    export_serving_files(model, folder)
    return folder


class YieldAtEveryTorchOp(TorchFunctionMode):
    """Inside it, every torch operation lets the other threads run before it returns, so that concurrent calls
    interleave at every step (as on a loaded server) within a few calls. Results are unchanged. Torch function modes
    are per thread: enter it in each thread that should yield."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        time.sleep(0)
        return result


def call_from_threads(calls: Sequence[Callable[[], Any]], threads: int = 8) -> tuple[list[Any], list[tuple[int, Any]]]:
    """Make every call of `calls` once in this thread, then from each of `threads` threads started together, each
    thread in its own rotated order, every torch operation yielding to the others ([`YieldAtEveryTorchOp`]).

    Returns the serial results (made inside `YieldAtEveryTorchOp` too: under a torch function mode some modules take
    another code path, e.g. `nn.TransformerEncoderLayer` leaves its fused fast path, with last-bit differences) and
    (index in `calls`, result) for every concurrent call; an exception in a thread is raised here."""
    with YieldAtEveryTorchOp():
        serial = [call() for call in calls]
    start = threading.Barrier(threads)

    def work(thread: int) -> list[tuple[int, Any]]:
        order = [(thread + k) % len(calls) for k in range(len(calls))]
        start.wait()
        with YieldAtEveryTorchOp():
            return [(i, calls[i]()) for i in order]

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(work, thread) for thread in range(threads)]
        return serial, [item for future in futures for item in future.result()]
