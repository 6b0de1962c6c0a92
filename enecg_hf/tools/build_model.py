"""Rebuild the model shipped with the package (`enecg-base`) from the public ECG databases: `make model`.

    python -m enecg_hf.tools.build_model --data-dir ../shared/data            # build, train, write the shipped folder
    python -m enecg_hf.tools.build_model --data-dir DIR --work-dir build/m    # keep the datasets and the run elsewhere

Steps: every source folder under `--data-dir` that exists (LUDB, the two PTB-XL folders, the Challenge 2020/2021
samples; see SOURCES) is read with `enecg_hf.data` into `WORK/data/<name>`; `train.py` trains one multi-task EnECG
(RECIPE: the default training settings, 5-fold subject-wise CV, the real pretrained experts of
`hub_configs/enecg_base.json`) on all of them together, recordings that two folders share kept once; the Hub-ready
files of its output (`SHIPPED_FILES`: config, heads and gates, model card, metrics) are copied to
`enecg_hf/pretrained/enecg-base/` (or `--output`). The experts' weights are not copied: they load from their wheels.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..shipped_models import DEFAULT_MODEL, SHIPPED_FILES, SHIPPED_MODELS_DIR


REPO = Path(__file__).resolve().parents[2]
# Source folder under --data-dir -> (format of `python -m enecg_hf.data`, dataset name). Earlier folders win when two
# hold the same recording (train.py keeps the first copy).
SOURCES = {
    "ludb": ("ludb", "ludb"),
    "ptbxl_sample500": ("ptb-xl", "ptbxl500"),
    "ptbxl_lr1500": ("ptb-xl", "ptbxl100"),
    "challenge2021_sample50": ("challenge", "challenge2021"),
    "challenge2020_awwong1": ("challenge", "challenge2020a"),
    "challenge2020_sebgood": ("challenge", "challenge2020s"),
}
TASKS = ("age", "sex", "arrhythmia", "rr_interval")
RECIPE = ["--config", "enecg_base", "--labels", ",".join(TASKS), "--folds", "5"]
MAX_SHIPPED_MB = 20.0
# Keys of a saved config that point at code files next to it (trust_remote_code); a shipped folder's code is the
# installed package, so they are left out.
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")


def build_datasets(data_dir: Path, work: Path) -> list[Path]:
    """Each source folder of `data_dir` as a built dataset in `work/data` (built again each time: ~1 min)."""
    folders = []
    for source, (fmt, name) in SOURCES.items():
        if not (data_dir / source).is_dir():
            print(f"[build_model] {data_dir / source} not found: left out", flush=True)
            continue
        output = work / "data" / name
        shutil.rmtree(output, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "enecg_hf.data", "--format", fmt, "--input", str(data_dir / source),
                        "--output", str(output)], check=True, stdout=subprocess.DEVNULL)
        report = json.loads((output / "build_report.json").read_text())
        print(f"[build_model] {source}: {report.get('records_kept', '?')} records kept", flush=True)
        folders.append(output)
    if not folders:
        raise SystemExit(f"build_model: no source folder under {data_dir} (expected some of {list(SOURCES)})")
    return folders


# What the card of the shipped model adds to train.py's (which describes any run).
SHIPPED_CARD_NOTES = """
## enecg-base: scope and known limits

- **Use**: research on ECG representation learning and ensembles, and a worked example of the package; **not a
  medical device**, not for diagnosis, triage or any clinical decision.
- **Inputs it was trained on**: resting 12-lead ECGs of 10 s (longer Challenge records cut to their first 10 s),
  stored at 500 Hz; 1,017 of the PTB-XL records were recorded at 100 Hz and resampled (what that costs each expert:
  docs/data.md, "PTB-XL at 100 Hz"). Holter and single-lead recordings are outside that range (the pipeline's
  `window_seconds` runs them window by window, with zero-filled leads; RR holds up there, the other tasks are not
  validated).
- **Populations**: the patients (mostly adults) of LUDB (Nizhny Novgorod), PTB-XL (Germany) and the Challenge
  samples (China, USA); age labels above 89 are stored as 90 (PTB-XL's rule); rhythm classes other than sinus rhythm are rare
  (atrial fibrillation 82 records, flutter 6), so their per-class scores are uncertain.
- **Labels**: RR interval only from LUDB's annotated beats (200 records); a record's RR prediction elsewhere rests on
  the ECG-features expert's R-peak measurement, which sparse stacking picks (docs/benchmarks.md, leave-one-source-out).
- **Calibration**: `ece` in the tables is the expected calibration error of the out-of-fold probabilities; the
  balanced class weights of the rhythm task (so that rare rhythms are predicted at all) make its probabilities
  over-state the rare classes.
- **Rebuild**: `make model` (enecg_hf/tools/build_model.py) from the databases in `../shared/data`.
"""


def ship(run: Path, output: Path) -> float:
    """Copy the run's shipped files to `output` (replaced), without the code keys, the card with its scope and
    limits; the folder's size in MB."""
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    for name in SHIPPED_FILES:
        shutil.copy2(run / name, output / name)
    with open(output / "README.md", "a") as card:
        card.write(SHIPPED_CARD_NOTES)
    # The build machine's folders mean nothing elsewhere: the arguments keep each folder's name only.
    arguments = json.loads((output / "training_args.json").read_text())
    for key in ("dataset", "output_dir", "cache_dir", "data_path"):
        value = arguments.get(key)
        if isinstance(value, list):
            arguments[key] = [Path(v).name for v in value]
        elif isinstance(value, str):
            arguments[key] = Path(value).name
    (output / "training_args.json").write_text(json.dumps(arguments, indent=2) + "\n")
    config = json.loads((output / "config.json").read_text())
    for key in REMOTE_CODE_KEYS:
        config.pop(key, None)
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    size = sum(path.stat().st_size for path in output.iterdir()) / 1e6
    if size > MAX_SHIPPED_MB:
        raise SystemExit(f"build_model: {output} is {size:.1f} MB, over the {MAX_SHIPPED_MB} MB a shipped model may be")
    return size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding the source folders (SOURCES)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "build" / "model",
                        help="datasets, training run and its feature store (default build/model)")
    parser.add_argument("--output", type=Path, default=SHIPPED_MODELS_DIR / DEFAULT_MODEL)
    parser.add_argument("--cache-dir", help="feature store's cache folder (train.py --cache_dir; default: WORK/cache)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    folders = build_datasets(args.data_dir, args.work_dir)
    run = args.work_dir / args.output.name  # the card train.py writes is titled after its folder: the model's name
    command = [sys.executable, str(REPO / "train.py"), *RECIPE, "--dataset", *map(str, folders),
               "--output_dir", str(run), "--cache_dir", args.cache_dir or str(args.work_dir / "cache")]
    if (run / "checkpoints").is_dir():  # an interrupted run: its finished jobs are reused
        command += ["--resume_from_checkpoint", "latest"]
    print("[build_model] $ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    size = ship(run, args.output)
    print(f"[build_model] {args.output}: {size:.1f} MB, {time.perf_counter() - start:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
