"""Training and inference efficiency of EnECG: three ways to train the same model on the same records, each through a
package entry point, each in its own subprocess (so its peak RSS is its own):

    (1) full_finetune     `transformers.Trainer` + `EnECGTrainerCallback` on `model_inputs`, experts unfrozen and in
                          train mode: experts run forward and backward every step
    (2) frozen_recompute  the same Trainer with frozen experts (LoRA heads and gate): experts recomputed every step
    (3) cached_features   `FeatureTable.from_model` (experts once per record), then `EnECGFitter` (strategy joint) on
                          the cache: the same 5 epochs of the same optimiser

Variants `tiny` (every mode trained in full) and `paper` (a few steps measured, then extrapolated; see
docs/benchmarks.md, which also explains every field).

    python bench/efficiency.py                 # tiny + paper (~40 min on 2 shared cores), writes bench/results/
    python bench/efficiency.py --quick         # tiny only, few records (< 2 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_sections import DATA_DIR, REPO, RESULTS, machine_info, replace_section


VARIANT_CONFIGS = {"tiny": "hub_configs/tiny.json", "paper": "hub_configs/paper_rr_interval.json"}
MODE_LABELS = {"full_finetune": "(1) full fine-tuning", "frozen_recompute": "(2) frozen experts recomputed every step",
               "cached_features": "(3) cached expert features (ours)"}
MODES, EPOCHS, LR = tuple(MODE_LABELS), 5, 1e-4


def load_records(data_dir: Path, count: int):
    """`count` records with an RR interval: LUDB (cardiologist annotations), or simulated ECGs without ../shared."""
    import datasets

    from enecg_hf.data import build_dataset

    datasets.disable_progress_bars()
    ludb = (data_dir / "ludb").is_dir()
    dataset = build_dataset("ludb", str(data_dir / "ludb")) if ludb else build_dataset("simulated", limit=2 * count)
    dataset = dataset.filter(lambda row: row["rr_interval"] is not None and math.isfinite(row["rr_interval"]))
    return dataset.select(range(min(count, len(dataset)))), f"{'ludb' if ludb else 'simulated'} (enecg_hf.data.build_dataset)"


def run_worker(args: argparse.Namespace) -> None:
    """One mode: build the model, train it through the package, evaluate, time inference; write the measurements."""
    import types

    import datasets
    import numpy as np
    import psutil
    import torch
    from transformers import Trainer, TrainingArguments

    from enecg_hf import EnECGConfig, EnECGModel
    from enecg_hf.training import (
        EnECGFitter,
        EnECGTrainerCallback,
        FeatureTable,
        FitSettings,
        model_inputs,
        predict,
    )

    torch.set_num_threads(args.threads)
    data = datasets.load_from_disk(args.data)
    train, test = data["train"], data["eval"]
    tensors = lambda ds: tuple(torch.as_tensor(ds.with_format("numpy")[c], dtype=torch.float32)
                               for c in ("signal", "rr_interval"))
    (x_train, y_train), (x_test, y_test) = tensors(train), tensors(test)
    result = {"status": "ok", "mode": args.worker, "baseline_rss_mb": psutil.Process().memory_info().rss / 2**20}
    raw = json.loads((REPO / VARIANT_CONFIGS[args.variant]).read_text())
    raw["experts"] = [e for e in raw["experts"] if not args.only_experts or e["name"] in args.only_experts.split(",")]
    for expert in raw["experts"]:
        expert["pretrained"] = None  # random weights: converted/* folders do not exist and the Hub is unreachable
        expert["leads"] = expert["leads"][:args.moment_leads or None] if expert["type"] == "moment" else expert["leads"]
    full = args.worker == "full_finetune"
    # No head standardisation, as in the research code (and so that (1) and (2) need no extra pass of the experts).
    config = EnECGConfig(**{**raw, "adaptation": "full" if full else "lora", "head_standardize": False})
    torch.manual_seed(args.seed)
    model = EnECGModel(config).to(args.device)
    if full:  # EnECGModel never trains its experts; full fine-tuning does, in train mode
        model.requires_grad_(True)
        model.train = types.MethodType(torch.nn.Module.train, model)
    result.update(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  total_params=sum(p.numel() for p in model.parameters()), experts=model.expert_names,
                  feature_extraction_s=0.0, train_records=len(train))
    batch, started = args.batch_size, time.perf_counter()
    if args.probe:  # one forward + backward, no optimiser (paper size: MOMENT's cost per lead)
        model.train()
        model(input_values=x_train[:1].to(args.device), labels=y_train[:1].to(args.device)).loss.backward()
        steps = 1
    elif args.worker == "cached_features":
        table = FeatureTable.from_model(model, x_train, y_train, batch_size=batch)
        result["feature_extraction_s"] = time.perf_counter() - started
        n = max(args.extrapolate_to, len(train))  # head/gate training is measured in full: the cache is tiled
        table = FeatureTable([e.repeat(math.ceil(n / len(train)), 1)[:n] for e in table.expert_embeddings],
                             table.gate_inputs.repeat(math.ceil(n / len(train)), 1)[:n],
                             table.labels.repeat(math.ceil(n / len(train)))[:n])
        started = time.perf_counter()
        EnECGFitter(model, FitSettings(strategy="joint", epochs=EPOCHS, learning_rate=LR, batch_size=batch,
                                       seed=args.seed)).fit(table, np.arange(n))
        steps, result["head_training_records"] = EPOCHS * math.ceil(n / batch), n
    else:
        trainer = Trainer(model=model, train_dataset=model_inputs(train, "rr_interval"),
                          callbacks=[EnECGTrainerCallback()], args=TrainingArguments(
                              output_dir=str(Path(args.worker_out).with_suffix("")), num_train_epochs=EPOCHS,
                              max_steps=args.max_steps or -1, per_device_train_batch_size=batch, learning_rate=LR,
                              weight_decay=0.01, lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no",
                              report_to="none", disable_tqdm=True, seed=args.seed, use_cpu=args.device == "cpu"))
        started = time.perf_counter()
        steps = trainer.train().global_step
    result.update(head_training_s=time.perf_counter() - started, measured_steps=steps)
    if args.evaluate:  # held-out MAE of the trained model, through the cached-features path
        out = predict(model, FeatureTable.from_model(model, x_test, y_test, batch_size=batch))
        result["eval_mae_ms"] = float(np.abs(out["logits"][:, 0] - out["labels"]).mean())
    if args.repeats:  # batch 1, no grad: adds nothing to peak RSS
        result.update(measure_inference(model, x_test.to(args.device), args.repeats, args.warmup))
    # This process's own peak (VmHWM): ru_maxrss would carry over the parent's peak from before the exec.
    status = Path("/proc/self/status").read_text().splitlines()
    result["peak_rss_mb"] = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    if args.device.startswith("cuda"):
        result["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(args.worker_out).write_text(json.dumps(result))


def measure_inference(model, x, repeats: int, warmup: int) -> dict:
    """Per-record latency (batch 1, no grad, eval): each expert's own forward on the normalised record, interleaved
    with the ensemble's full forward on the same record; best of `repeats`, medians alongside."""
    import statistics

    import torch

    from enecg_hf.signal_enecg import normalize_ecg

    model.eval()
    times = {name: [] for name in [*model.expert_names, "ensemble"]}
    with torch.no_grad():
        for i in range(warmup + repeats):
            record, sample = x[i % len(x)].unsqueeze(0), {}
            normalized = normalize_ecg(record.float(), model.config.normalization)
            calls = {n: (lambda e=e, x=normalized: e(x)) for n, e in model.experts.items()}
            calls["ensemble"] = lambda x=record: model(input_values=x)
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                sample[name] = time.perf_counter() - t0
            for key, value in sample.items() if i >= warmup else ():
                times[key].append(value)
    names = model.expert_names
    per_expert = {name: min(times[name]) * 1000 for name in names}
    # Ratio per repeat (ensemble and experts back to back on one record), median over repeats.
    ratios = [ens / sum(times[n][i] for n in names) for i, ens in enumerate(times["ensemble"])]
    return {"latency_ms": {"per_expert": per_expert, "sum_of_experts": sum(per_expert.values()),
                           "ensemble": min(times["ensemble"]) * 1000,
                           "ensemble_over_sum_of_experts": statistics.median(ratios),
                           "per_expert_median": {n: statistics.median(times[n]) * 1000 for n in names},
                           "ensemble_median": statistics.median(times["ensemble"]) * 1000},
            "latency_repeats": repeats, "latency_warmup": warmup}


def spawn(args, mode: str, variant: str, data: Path, workdir: Path, **extra) -> dict:
    """Run one worker subprocess (or reuse its JSON with --reuse); a worker past --memory-limit-gb is stopped."""
    import psutil

    name = "-".join([variant, mode, *(f"{k}={v}" for k, v in extra.items() if v)])
    out = workdir / f"{name.replace(',', '+')}.json"
    if args.reuse and out.is_file():
        return json.loads(out.read_text())
    cmd = [sys.executable, __file__, "--worker", mode, "--variant", variant, "--data", str(data), "--worker-out",
           str(out), "--threads", str(args.threads), "--device", args.device, "--seed", str(args.seed)]
    cmd += [a for k, v in extra.items() if v not in (None, False)
            for a in [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])]
    print(f"[efficiency] {name} ...", flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryFile("w+") as log:
        proc, peak = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=log), 0.0
        while proc.poll() is None:
            try:
                peak = max(peak, psutil.Process(proc.pid).memory_info().rss / 2**20)
            except psutil.Error:
                pass
            if peak > args.memory_limit_gb * 1024:
                proc.kill()
                raise RuntimeError(f"worker {name} passed the memory limit ({args.memory_limit_gb} GB)")
            time.sleep(0.05)
        if proc.returncode or not out.is_file():
            log.seek(0)
            raise RuntimeError(f"worker {name} failed (exit {proc.returncode}):\n{log.read()[-4000:]}")
    return json.loads(out.read_text())


def summarise_mode(raw: dict, n_train: int, batch: int, extrapolated: bool, how: str) -> dict:
    """A worker's measurements as reported fields; measured steps extrapolated to 5 epochs of n_train records."""
    step_time = raw["head_training_s"] / raw["measured_steps"]
    if raw["mode"] == "cached_features":
        extraction = raw["feature_extraction_s"] * n_train / raw["train_records"]
        wall = extraction + raw["head_training_s"] * n_train / raw["head_training_records"]
    else:
        extraction, wall = 0.0, step_time * math.ceil(n_train / batch) * EPOCHS if extrapolated else raw["head_training_s"]
    return {"trainable_params": raw["trainable_params"], "total_params": raw["total_params"], "train_records": n_train,
            "batch_size": batch, "epochs": EPOCHS, "wall_time_5_epochs_s": wall,
            "throughput_records_per_s": n_train * EPOCHS / wall, "train_step_throughput_records_per_s": batch / step_time,
            "feature_extraction_s": extraction, "peak_rss_mb": raw["peak_rss_mb"], "baseline_rss_mb": raw["baseline_rss_mb"],
            "peak_rss_above_baseline_mb": raw["peak_rss_mb"] - raw["baseline_rss_mb"],
            "measured_steps": raw["measured_steps"], "measured_records": raw["train_records"],
            "extrapolated": extrapolated, "how": how,
            **{k: raw[k] for k in ("eval_mae_ms", "peak_cuda_allocated_mb") if k in raw}}


def run_variant(args, variant: str, dataset, workdir: Path) -> dict:
    n_train = args.train_records
    if variant == "tiny":
        batch, data = args.batch_size, workdir / "tiny-data"
        dataset.save_to_disk(str(data))
        raws = {mode: spawn(args, mode, variant, data, workdir, batch_size=batch, evaluate=True,
                            repeats=args.latency_repeats if mode == "cached_features" else 0) for mode in MODES}
        modes = {mode: summarise_mode(raw, n_train, batch, False, "measured: 5 full epochs") for mode, raw in raws.items()}
    else:
        batch, k, data = 1, args.paper_records, workdir / "paper-data"
        type(dataset)({"train": dataset["train"].select(range(k)), "eval": dataset["eval"].select([0])}).save_to_disk(str(data))
        raws = {"frozen_recompute": spawn(args, "frozen_recompute", variant, data, workdir, batch_size=1, max_steps=k),
                "cached_features": spawn(args, "cached_features", variant, data, workdir, batch_size=1,
                                         extrapolate_to=n_train, repeats=1, warmup=0)}
        modes = {"frozen_recompute": summarise_mode(raws["frozen_recompute"], n_train, 1, True, (
                     f"extrapolated: {k} step(s) of batch 1 measured on {k} record(s), scaled to 5 epochs of {n_train} "
                     "records")),
                 "cached_features": summarise_mode(raws["cached_features"], n_train, 1, True, (
                     f"extrapolated: feature extraction measured on {k} record(s) and scaled to {n_train}; head/gate "
                     f"training measured in full (5 epochs over {n_train} cached records, the measured features tiled)")),
                 "full_finetune": paper_full_finetune(args, data, workdir, n_train)}
    modes = {mode: modes[mode] for mode in MODES}
    inference, (full, recompute, cached) = raws["cached_features"], modes.values()
    ratios = {"recompute_over_cached_wall_time": recompute["wall_time_5_epochs_s"] / cached["wall_time_5_epochs_s"],
              "full_over_cached_wall_time": full["wall_time_5_epochs_s"] / cached["wall_time_5_epochs_s"],
              "cached_over_full_peak_rss": cached["peak_rss_mb"] / full["peak_rss_mb"],
              "cached_over_full_peak_rss_above_baseline": cached["peak_rss_above_baseline_mb"]
              / full["peak_rss_above_baseline_mb"],
              "ensemble_over_sum_of_experts_latency": inference["latency_ms"]["ensemble_over_sum_of_experts"]}
    return {"config": VARIANT_CONFIGS[variant], "experts": inference["experts"], "batch_size": batch, "modes": modes,
            "random_weights": "every expert has random weights (pretrained set to null: the Hub is unreachable and no "
                              "converted checkpoints exist); compute and memory do not depend on weight values",
            "inference": {**inference["latency_ms"], "repeats": inference["latency_repeats"],
                          "warmup": inference["latency_warmup"]},
            "ratios": ratios, "targets_met": {
                "cached_at_least_4x_faster_than_recompute": ratios["recompute_over_cached_wall_time"] >= 4.0,
                "cached_peak_memory_at_most_half_of_full": ratios["cached_over_full_peak_rss"] <= 0.5,
                "ensemble_latency_within_10pct_of_sum_of_experts": ratios["ensemble_over_sum_of_experts_latency"] <= 1.10}}


def paper_full_finetune(args, data: Path, workdir: Path, n_train: int) -> dict:
    """Full fine-tuning at paper size: the whole model with MOMENT reading 1 lead (~14 GB peak RSS) for k steps, plus
    one forward + backward of MOMENT alone reading 1 and 2 leads; 11 x the per-lead difference (time, peak RSS) is
    added (MOMENT encodes leads independently; optimiser state does not depend on the lead count)."""
    k = args.paper_records
    runs = {"all_1": summarise_mode(spawn(args, "full_finetune", "paper", data, workdir, batch_size=1, moment_leads=1,
                                          max_steps=k), n_train, 1, True, "")}
    for leads in (1, 2):
        raw = spawn(args, "full_finetune", "paper", data, workdir, batch_size=1, moment_leads=leads,
                    only_experts="moment", probe=True)
        runs[f"moment_{leads}"] = summarise_mode(raw, n_train, 1, True, "")
    per_lead = lambda key: runs["moment_2"][key] - runs["moment_1"][key]
    wall = runs["all_1"]["wall_time_5_epochs_s"] + 11 * per_lead("wall_time_5_epochs_s")
    peak = runs["all_1"]["peak_rss_mb"] + 11 * per_lead("peak_rss_mb")
    return {**runs["all_1"], "wall_time_5_epochs_s": wall, "throughput_records_per_s": n_train * EPOCHS / wall,
            "train_step_throughput_records_per_s": n_train * EPOCHS / wall, "peak_rss_mb": peak,
            "peak_rss_above_baseline_mb": peak - runs["all_1"]["baseline_rss_mb"],
            "measured_steps": sum(r["measured_steps"] for r in runs.values()),
            "how": (f"extrapolated twice: full fine-tuning with MOMENT-large over 12 leads needs far more memory than "
                    f"this machine has, so {k} AdamW step(s) of batch 1 were measured for the whole model with MOMENT "
                    "reading 1 lead, and one forward+backward of MOMENT alone reading 1 and 2 leads; 11 x the per-lead "
                    "difference (time and peak RSS; MOMENT encodes leads independently) is added, then scaled to 5 "
                    f"epochs of {n_train} records"),
            "measured_points": {key: {f: r[f] for f in ("wall_time_5_epochs_s", "peak_rss_mb", "measured_steps")}
                                for key, r in runs.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny variant on a few records (< 2 min on 2 cores)")
    add("--variants", default=None, help="comma-separated: tiny,paper (default both; --quick: tiny)")
    add("--output", default=str(RESULTS / "efficiency.json"))
    add("--figure", default=None, help="PNG path (default: next to --output)")
    add("--merge", action="store_true", help="keep other variants already in --output")
    add("--workdir", default=None, help="keep each worker's raw JSON here (default: a temp folder)")
    add("--reuse", action="store_true", help="reuse worker results already in --workdir")
    add("--replot", action="store_true", help="only redraw the figure (and docs) from --output")
    add("--update-docs", action="store_true", help="rewrite the efficiency table in docs/benchmarks.md")
    add("--data-dir", default=str(DATA_DIR))
    add("--train-records", type=int, default=None)
    add("--eval-records", type=int, default=None)
    add("--batch-size", type=int, default=None)
    add("--paper-records", type=int, default=2, help="records (= steps, batch 1) measured at paper size")
    add("--latency-repeats", type=int, default=None)
    add("--threads", type=int, default=2)
    add("--device", default=None, help="default: cuda when available, else cpu")
    add("--seed", type=int, default=42)
    add("--memory-limit-gb", type=float, default=14.0, help="a worker past this RSS is stopped")
    for hidden in ("--worker", "--variant", "--data", "--worker-out", "--only-experts"):
        add(hidden, help=argparse.SUPPRESS)
    for hidden in ("--max-steps", "--moment-leads", "--extrapolate-to", "--repeats"):
        add(hidden, type=int, default=0, help=argparse.SUPPRESS)
    add("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    add("--probe", action="store_true", help=argparse.SUPPRESS)
    add("--evaluate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output = Path(args.output)
    if args.replot:  # re-render figure and docs from an existing JSON
        return report(json.loads(output.read_text()), args)
    args.train_records = args.train_records or (8 if args.quick else 96)
    n_eval = args.eval_records or (4 if args.quick else 32)
    args.batch_size = args.batch_size or (4 if args.quick else 16)
    args.latency_repeats = args.latency_repeats or (5 if args.quick else 20)
    started = time.perf_counter()
    dataset, source = load_records(Path(args.data_dir), args.train_records + n_eval)
    if len(dataset) < args.train_records + n_eval:
        raise RuntimeError(f"only {len(dataset)} records available, need {args.train_records + n_eval}")
    import numpy as np
    from datasets import DatasetDict

    dataset = DatasetDict({"train": dataset.select(range(args.train_records)),
                           "eval": dataset.select(range(args.train_records, len(dataset)))})
    y_train, y_eval = dataset["train"]["rr_interval"], dataset["eval"]["rr_interval"]
    results = {"benchmark": "efficiency", "quick": args.quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "machine": machine_info(torch_threads=args.threads, device=args.device),
               "data": {"source": source, "label": "rr_interval (ms)", "train_records": args.train_records,
                        "eval_records": n_eval, "record_shape": list(np.shape(dataset["train"][0]["signal"])),
                        "mean_predictor_eval_mae_ms": sum(abs(y - sum(y_train) / len(y_train)) for y in y_eval) / n_eval},
               "variants": json.loads(output.read_text())["variants"] if args.merge and output.is_file() else {}}
    with tempfile.TemporaryDirectory(prefix="enecg-eff-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for variant in (args.variants or ("tiny" if args.quick else "tiny,paper")).split(","):
            variant_start, load = time.perf_counter(), os.getloadavg()
            block = run_variant(args, variant, dataset, workdir)
            block["run"] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_start": list(load),
                            "load_average_end": list(os.getloadavg()), "elapsed_s": time.perf_counter() - variant_start}
            results["variants"][variant] = block
    results["elapsed_s"] = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    return report(results, args)


def report(results: dict, args) -> dict:
    """The figure, the docs table (printed, and written with --update-docs)."""
    figure = Path(args.figure) if args.figure else Path(args.output).with_suffix(".png")
    plot(results, figure)
    print(docs_table(results))
    print(f"[efficiency] wrote {args.output} and {figure}")
    if args.update_docs:
        replace_section("efficiency", docs_table(results))
    return results


def duration(seconds: float) -> str:
    for limit, unit, scale in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600), (math.inf, "d", 86400)):
        if seconds < limit:
            return f"{seconds / scale:.1f} {unit}"


def plot(results: dict, path: Path) -> None:
    """Figure-3 style: tiny variant (every mode trained 5 full epochs): held-out RR MAE against peak memory and against
    training throughput; paper size (not trained to the end: no performance) as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    variants, colors = results["variants"], dict(zip(MODES, ("tab:red", "tab:orange", "tab:green")))
    fig, axes = plt.subplots(1 + ("paper" in variants), 2, figsize=(11, 4.2 * (1 + ("paper" in variants))), squeeze=False)
    axis_keys = (("peak_rss_mb", "peak memory: process RSS (MB"), ("throughput_records_per_s", "training throughput (records/s"))
    if "tiny" in variants:
        modes, baseline = variants["tiny"]["modes"], results["data"]["mean_predictor_eval_mae_ms"]
        for ax, (key, xlabel) in zip(axes[0], axis_keys):
            for mode in MODES:
                ax.scatter(modes[mode][key], modes[mode].get("eval_mae_ms", math.nan), s=160, color=colors[mode],
                           label=MODE_LABELS[mode], edgecolor="black", zorder=3)
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="mean predictor (no learning)")
            maes = [modes[m].get("eval_mae_ms", baseline) for m in MODES] + [baseline]
            pad = max(0.15 * (max(maes) - min(maes)), 0.05 * max(maes))
            ax.set(ylim=(min(maes) - pad, max(maes) + pad), xlabel=xlabel + (")" if key == "peak_rss_mb" else ", 5 epochs)"),
                   ylabel="held-out RR MAE (ms), lower is better", title=f"tiny variant, {results['data']['train_records']}"
                   f" train / {results['data']['eval_records']} eval records")
            ax.grid(alpha=0.3)
        axes[0][1].set_xscale("log")
        axes[0][1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[0][1].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes[0][0].legend(fontsize=8, loc="best")
    if "paper" in variants:
        names = [MODE_LABELS[m].split(" ", 1)[0] + " " + m.replace("_", " ") for m in MODES]
        for ax, (key, xlabel) in zip(axes[-1], axis_keys):
            values = [variants["paper"]["modes"][m][key] for m in MODES]
            ax.barh(names, values, color=[colors[m] for m in MODES], edgecolor="black")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(xlabel + ", log)")
            ax.set_title("paper size: extrapolated from measured steps\n(no performance: not trained to the end)", fontsize=9)
            for i, v in enumerate(values):
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
            ax.grid(alpha=0.3, axis="x")
    loads = ", ".join(f"{v} {b['run']['load_average_start'][0]:.1f}" for v, b in variants.items())
    fig.suptitle(f"EnECG training efficiency on {results['machine']['cpu_count']} shared CPU cores "
                 f"(load average at start: {loads})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def docs_table(results: dict) -> str:
    lines = []
    for variant, block in results["variants"].items():
        inf, r, run = block["inference"], block["ratios"], block["run"]
        lines += [(f"**{variant}** (`{block['config']}`, experts: {', '.join(block['experts'])}; batch "
                   f"{block['batch_size']}; {block['modes']['cached_features']['train_records']} training records)\n"),
                  ("| mode | trainable params | throughput (records/s) | wall time, 5 epochs | peak RSS (MB) | "
                   "above baseline (MB) | held-out RR MAE (ms) | how |"), "|---|---:|---:|---:|---:|---:|---:|---|"]
        for mode in MODES:
            m = block["modes"][mode]
            mae = f"{m['eval_mae_ms']:.0f}" if "eval_mae_ms" in m else "n/a"
            lines.append(f"| {MODE_LABELS[mode]} | {m['trainable_params']:,} | {m['throughput_records_per_s']:.3g} | "
                         f"{duration(m['wall_time_5_epochs_s'])} | {m['peak_rss_mb']:,.0f} | "
                         f"{m['peak_rss_above_baseline_mb']:,.0f} | {mae} | {m['how']} |")
        lines += ["", (f"Run {run['created']}, {duration(run['elapsed_s'])}, load average "
                       f"{run['load_average_start'][0]:.2f} at start, {run['load_average_end'][0]:.2f} at end (2 cores; "
                       "other engineers' jobs included).\n"),
                  "Inference latency per record (batch 1, ms): " + ", ".join(
                      f"{k} {v:,.1f}" for k, v in inf["per_expert"].items()) + f"; **sum of experts "
                  f"{inf['sum_of_experts']:,.1f}, ensemble {inf['ensemble']:,.1f}** (best of {inf['repeats']}).\n",
                  f"Ratios: (2)/(3) wall time **{r['recompute_over_cached_wall_time']:.2f}×**; (1)/(3) wall time "
                  f"**{r['full_over_cached_wall_time']:.2f}×**; peak RSS (3)/(1) **{r['cached_over_full_peak_rss']:.2f}**"
                  f" (above baseline {r['cached_over_full_peak_rss_above_baseline']:.2f}); ensemble / sum of experts "
                  f"latency **{r['ensemble_over_sum_of_experts_latency']:.2f}**. Targets: " + ", ".join(
                      f"{k.replace('_', ' ')}: {'met' if v else '**not met**'}" for k, v in block["targets_met"].items())
                  + ".\n"]
    m = results["machine"]
    lines.append(f"Machine: {m['cpu_count']} CPU cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
                 f"transformers {m['transformers']}; data: {results['data']['source']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
