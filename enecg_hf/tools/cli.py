"""The `enecg` console script.

    enecg predict RECORD [RECORD ...] --model DIR_OR_REPO [--sampling-rate HZ] [--lead-names I,II,...] [--top-k K]
                  [--fill-missing-leads] [--explain OUT.png]
                  [--window-seconds S [--hop-seconds S] [--max-windows N] [--batch-size B]]
    enecg export DIR            # add the pipeline, handler.py and requirements.txt to a saved model folder

`predict` prints one JSON line per record, in the order given. A record that cannot be used prints
`{"source": ..., "error": ..., "reason": ...}` and the others are still predicted; the exit status is then 1 (also
when explanations cannot be written: the predictions are still printed). A model that cannot be loaded, or whose own
code fails on a record with anything but a bad-record error (a model folder's remote code runs here), prints one line
to stderr and exits with 2. With `--window-seconds`, a record of any length (a Holter recording) is predicted window
by window, read from disk a window at a time: its line holds each window's prediction and a summary per task.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enecg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="predict on ECG records, one JSON line each")
    predict.add_argument("records", nargs="+", help="WFDB records (with or without .hea), Challenge .mat/.hea, .npy, .csv")
    predict.add_argument("--model", required=True, help="model folder, Hub id (loaded with trust_remote_code) or the name of a model shipped with "
                         "the package (enecg-base)")
    predict.add_argument("--sampling-rate", type=float, help="rate in Hz of .npy/.csv records")
    predict.add_argument("--lead-names", type=_comma_list,
                         help="comma-separated names of the rows, in order: of .npy/.csv records, and of WFDB records "
                         "(replacing the header's names, e.g. ECG1 or 'record 14046, signal 0')")
    predict.add_argument("--top-k", type=int, help="classes to list for classification models")
    predict.add_argument("--fill-missing-leads", action="store_true", help="zero-fill missing standard leads")
    predict.add_argument("--explain", metavar="OUT.png",
                         help="also write a 12-lead plot with integrated-gradients saliency and the gate weights "
                         "(one PNG per record: OUT.png, OUT-2.png, ...)")
    predict.add_argument("--window-seconds", type=float, metavar="S",
                         help="predict window by window, S seconds each (at most the model's max_input_seconds), for "
                         "records longer than the model takes; prints each window's prediction and a summary")
    predict.add_argument("--hop-seconds", type=float, metavar="S",
                         help="start a window every S seconds (default: --window-seconds, windows side by side)")
    predict.add_argument("--max-windows", type=int, metavar="N", help="predict at most the first N windows")
    predict.add_argument("--batch-size", type=_positive_int, default=1, metavar="B",
                         help="model inputs (windows) per forward pass (default 1); memory grows with it")
    export = commands.add_parser("export", help="make a saved model folder serving-ready")
    export.add_argument("folder")
    return parser


def _explain_path(base: str, index: int) -> Path:
    path = Path(base)
    return path if index == 0 else path.with_name(f"{path.stem}-{index + 1}{path.suffix or '.png'}")


def _load_pipeline(model: str):
    """The model's pipeline, or `None` after printing one line that says why it cannot be loaded."""
    from transformers import pipeline

    from ..pipeline_enecg import PIPELINE_TASK
    from ..shipped_models import resolve_model

    resolved = resolve_model(model)
    if resolved != model:  # a shipped model: the installed package is its code
        return pipeline(PIPELINE_TASK, model=resolved)
    path = Path(model).expanduser()
    looks_like_path = path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1
    if path.exists() and not (path / "config.json").is_file():
        print(f"enecg predict: --model {model}: not a saved model folder (no config.json)", file=sys.stderr)
        return None
    if not path.exists() and looks_like_path:
        print(f"enecg predict: --model {model}: no such folder", file=sys.stderr)
        return None
    try:
        return pipeline(model=model, trust_remote_code=True)
    except (OSError, ValueError, ImportError, RuntimeError) as error:
        print(f"enecg predict: --model {model}: cannot load the model: {error}", file=sys.stderr)
        return None
    except Exception as error:  # the folder's own code ran (trust_remote_code) and failed: not loadable either
        print(f"enecg predict: --model {model}: cannot load the model: its code raised {type(error).__name__}: "
              f"{error}", file=sys.stderr)
        return None


def predict(args: argparse.Namespace) -> int:
    if args.window_seconds is not None and args.explain:
        print("enecg predict: --explain draws a whole record, not windows; leave out --explain or --window-seconds",
              file=sys.stderr)
        return 2
    ecg = _load_pipeline(args.model)
    if ecg is None:
        return 2
    options = {"sampling_rate": args.sampling_rate, "lead_names": args.lead_names, "top_k": args.top_k,
               "fill_missing_leads": args.fill_missing_leads or None, "window_seconds": args.window_seconds,
               "hop_seconds": args.hop_seconds, "max_windows": args.max_windows}
    options = {k: v for k, v in options.items() if v is not None}
    failures = 0
    explain = args.explain
    if explain and not Path(explain).expanduser().resolve().parent.is_dir():
        print(f"enecg predict: --explain {explain}: the folder {Path(explain).parent} does not exist; predicting "
              "without explanations", file=sys.stderr)
        explain, failures = None, 1
    for index, record in enumerate(args.records):
        try:
            result = ecg(record, batch_size=args.batch_size, **options)
            if explain:
                from .explain import explain_record

                png = _explain_path(explain, index)
                try:
                    explain_record(ecg.model, record, png, **{k: v for k, v in options.items() if k != "top_k"})
                    result["explanation"] = str(png)
                except OSError as error:
                    failures += 1
                    result["explanation_error"] = f"cannot write {png}: {error}"
            line = json.dumps(result, allow_nan=False)
        except (ValueError, OSError) as error:  # ECGInputError (from this package or the model folder's copy), I/O
            failures += 1
            line = json.dumps({"source": str(record), "error": getattr(error, "detail", str(error)),
                               "reason": getattr(error, "reason", "bad_input" if isinstance(error, ValueError)
                                                 else "unreadable_file")})
        except Exception as error:  # not a bad record: the model's code failed, and would on the next record too
            print(f"enecg predict: --model {args.model}: the model's code failed on {record}: "
                  f"{type(error).__name__}: {error}", file=sys.stderr)
            return 2
        print(line, flush=True)
    return 1 if failures else 0


def export(args: argparse.Namespace) -> int:
    from transformers import AutoModel

    from ..training.serving_export import export_serving_files

    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        print(f"enecg export: {folder} is not a saved model folder (no config.json)", file=sys.stderr)
        return 2
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    written = export_serving_files(model, folder)
    print(json.dumps({"folder": str(folder.resolve()), "written": written}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    return {"predict": predict, "export": export}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
