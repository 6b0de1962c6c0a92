"""`python -m enecg_hf.data --format FORMAT --input PATH --output DIR`: build and save an EnECG dataset."""

from __future__ import annotations

import argparse
import logging
import sys

from .builder import FORMATS, DatasetBuildError, build
from .ptbxl import RATES as PTBXL_RATES
from .source import LayoutError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m enecg_hf.data",
        description="Read an ECG collection into a datasets.Dataset (save_to_disk) with a build_report.json.",
    )
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--input", help="the collection's folder (the .jsonl file for jsonl; not used by simulated)")
    parser.add_argument("--output", required=True, help="folder to save the dataset and build_report.json into")
    parser.add_argument("--sampling-rate", type=int, default=500, help="stored rate in Hz (default 500)")
    parser.add_argument("--seconds", type=float, default=10.0, help="stored duration in s (default 10)")
    parser.add_argument("--num-proc", type=int, default=None, help="worker processes (default 1)")
    parser.add_argument("--limit", type=int, default=None, help="first N records (simulated: number of records)")
    parser.add_argument("--fill-missing-leads", action="store_true", help="zero-fill missing leads instead of skipping")
    parser.add_argument("--labels-csv", help="mimic-iv-ecg: CSV with age/sex/potassium per subject_id[/study_id]")
    parser.add_argument("--ptbxl-rate", choices=PTBXL_RATES, default="auto",
                        help="ptb-xl: read records500/ (500), records100/ (100), or records500/ when a record has it "
                        "and records100/ otherwise (auto, the default); resampled to --sampling-rate either way")
    parser.add_argument("--seed", type=int, default=0, help="simulated: random seed (default 0)")
    parser.add_argument("--max-record-seconds", type=float, default=3600.0,
                        help="skip longer records, decided from their headers before reading them (default 3600)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.format != "simulated" and not args.input:
        print(f"error: --format {args.format} needs --input", file=sys.stderr)
        return 2
    try:
        result = build(
            args.format,
            args.input,
            args.output,
            sampling_rate=args.sampling_rate,
            seconds=args.seconds,
            num_proc=args.num_proc,
            limit=args.limit,
            fill_missing_leads=args.fill_missing_leads,
            labels_csv=args.labels_csv,
            seed=args.seed,
            max_record_seconds=args.max_record_seconds,
            ptbxl_rate=args.ptbxl_rate,
        )
    except (LayoutError, DatasetBuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.report.summary())
    print(f"report: {args.output}/build_report.json")
    print(f"load it with datasets.load_from_disk({args.output!r}) (a save_to_disk folder; load_dataset refuses it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
