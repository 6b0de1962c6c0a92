"""Training and inference efficiency of EnECG, every mode through a package entry point, each run in its own process
(so its peak memory is its own), the modes run alternately `--repeats` times, medians reported:

    (1) full_finetune     `transformers.Trainer` + `EnECGTrainerCallback` on `model_inputs`, experts unfrozen and in
                          train mode: experts run forward and backward every step
    (2) frozen_recompute  the same Trainer with frozen experts (LoRA heads and gate): experts recomputed every step
    (3) cached_features   train.py's path: the feature store (`enecg_hf.features.build_features`, experts once per
                          record, into an empty store), then `EnECGFitter` (strategy joint) on the in-memory table:
                          the same 5 epochs of the same optimiser

Variants: `tiny` (every mode trained in full), `labels` (LUDB's four labels x k folds: the research loop, (2) per
label and fold, against one store shared by all, (3)) and `paper` (a few steps measured, then extrapolated). What
every field means: docs/benchmarks.md.

    python bench/efficiency.py --update-docs   # tiny + labels + paper (~1 h on 2 shared cores)
    python bench/efficiency.py --quick         # tiny and labels on 8 records, one repeat (~3 min)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from harness import DATA_DIR, REPO, in_fresh_process, interleaved, machine_info, parser, peak_rss_mib, save


VARIANT_CONFIGS = {"tiny": "hub_configs/tiny.json", "labels": "hub_configs/tiny.json",
                   "paper": "hub_configs/paper_rr_interval.json"}
MODE_LABELS = {"full_finetune": "(1) full fine-tuning", "frozen_recompute": "(2) frozen experts recomputed every step",
               "cached_features": "(3) cached expert features (ours)"}
LABEL_MODES = {"research_loop": "(2) per label and fold, experts recomputed every step (research loop)",
               "one_store": "(3) one feature store for every label and fold (ours)"}
MODES, EPOCHS, LR, LABELS = tuple(MODE_LABELS), 5, 1e-4, ("rr_interval", "age", "sex", "arrhythmia")


def load_records(data_dir: Path, count: int):
    """`count` records with an RR interval: LUDB (cardiologist annotations), or simulated ECGs without ../shared."""
    import datasets

    from enecg_hf.data import build_dataset

    datasets.disable_progress_bars()
    ludb = (data_dir / "ludb").is_dir()
    dataset = build_dataset("ludb", str(data_dir / "ludb")) if ludb else build_dataset("simulated", limit=2 * count)
    dataset = dataset.filter(lambda row: row["rr_interval"] is not None and math.isfinite(row["rr_interval"]))
    return dataset.select(range(min(count, len(dataset)))), f"{'ludb' if ludb else 'simulated'} (enecg_hf.data.build_dataset)"


def make_model(args, tasks, full: bool = False):
    """The variant's config for `tasks` (one: single-task; several: multi-task), random experts, research settings:
    no head standardisation, as in the research code (and so that (1) and (2) need no extra pass of the experts)."""
    import types

    import torch

    from enecg_hf import EnECGModel
    from enecg_hf.data import TASKS
    from enecg_hf.training import TrainScriptArguments
    from enecg_hf.training.configs import build_config

    raw = json.loads((REPO / VARIANT_CONFIGS[args.variant]).read_text())
    raw["experts"] = [e for e in raw["experts"] if not args.only_experts or e["name"] in args.only_experts.split(",")]
    for expert in raw["experts"]:
        expert["pretrained"] = None  # random weights: converted/* folders do not exist and the Hub is unreachable
        expert["leads"] = expert["leads"][:args.moment_leads or None] if expert["type"] == "moment" else expert["leads"]
    raw.update(adaptation="full" if full else "lora", head_standardize=False)
    specs = [TASKS[t] for t in tasks]
    torch.manual_seed(args.seed)
    model = EnECGModel(build_config(TrainScriptArguments(), specs[0] if len(specs) == 1 else specs, raw))
    if full:  # EnECGModel never trains its experts; full fine-tuning does, in train mode
        model.requires_grad_(True)
        model.train = types.MethodType(torch.nn.Module.train, model)
    return model.to(args.device)


def trainer_fit(model, records, label: str, args, workdir: str) -> int:
    """The research loop's training: `Trainer` over the records' signals, the experts run in every step."""
    from transformers import Trainer, TrainingArguments

    from enecg_hf.training import EnECGTrainerCallback, model_inputs

    trainer = Trainer(model=model, train_dataset=model_inputs(records, label, model.config),
                      callbacks=[EnECGTrainerCallback()], args=TrainingArguments(
                          output_dir=workdir, num_train_epochs=EPOCHS, max_steps=args.max_steps or -1,
                          per_device_train_batch_size=args.batch_size, learning_rate=LR, weight_decay=0.01,
                          lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no", report_to="none",
                          disable_tqdm=True, seed=args.seed, use_cpu=args.device == "cpu"))
    return trainer.train().global_step


def store_table(model, records, labels, store: str, batch_size: int):
    """train.py's feature path: the store fills in what is missing, training reads in-memory tensors."""
    import numpy as np

    from enecg_hf.features import build_features
    from enecg_hf.training.run import load_feature_table

    features, _ = build_features(records, model, store_dir=store, batch_size=batch_size, progress=False)
    return load_feature_table(features, np.arange(len(records)), labels, records, model.expert_names)


def run_worker(args, tmp: str) -> dict:
    """One mode: build the model, train it through the package, evaluate, time inference; the measurements. `tmp`:
    a scratch folder for the mode's feature store and Trainer output."""
    import datasets
    import numpy as np
    import psutil
    import torch

    from enecg_hf.data import TASKS, subject_kfold
    from enecg_hf.training import EnECGFitter, FitSettings, predict
    from enecg_hf.training.labels import encode_labels

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    data = datasets.load_from_disk(args.data)
    train, test = data["train"], data["eval"]
    result = {"mode": args.worker, "baseline_rss_mb": psutil.Process().memory_info().rss / 2**20,
              "feature_extraction_s": 0.0, "train_records": len(train)}
    fit = lambda m, table, rows: EnECGFitter(m, FitSettings(strategy="joint", epochs=EPOCHS, learning_rate=LR,
                                                            batch_size=args.batch_size, seed=args.seed)).fit(table, rows)
    started = time.perf_counter()
    if args.worker in LABEL_MODES:  # every label x fold, whole loop timed (model builds included)
        model, fits = make_model(args, LABELS) if args.worker == "one_store" else None, 0
        if model is not None:
            table = store_table(model, train, np.zeros(len(train), np.float32), tmp, args.batch_size)
            result["feature_extraction_s"] = time.perf_counter() - started
        for label in LABELS:
            keep, y = encode_labels(train, TASKS[label])
            for rows, _ in subject_kfold(train.select(keep), args.folds, seed=args.seed):
                if model is None:
                    trainer_fit(make_model(args, [label]), train.select(np.asarray(keep)[rows]), label, args, tmp)
                else:
                    fit(model.tasks[label], table.select(keep, labels=y), rows)
                fits += 1
        result.update(fits=fits, labels=list(LABELS), folds=args.folds, head_training_s=time.perf_counter() - started,
                      measured_steps=fits)
        return finish_worker(result, model or make_model(args, LABELS))
    model = make_model(args, ["rr_interval"], full=args.worker == "full_finetune")
    y_train = np.asarray(train["rr_interval"], np.float32)
    if args.probe:  # one forward + backward, no optimiser (paper size: MOMENT's cost per lead)
        x = torch.as_tensor(np.asarray(train[:1]["signal"], np.float32), device=args.device)
        model.train()
        model(input_values=x, labels=torch.as_tensor(y_train[:1], device=args.device)).loss.backward()
        steps = 1
    elif args.worker == "cached_features":
        table = store_table(model, train, y_train, tmp, args.batch_size)
        result["feature_extraction_s"] = time.perf_counter() - started
        n = max(args.extrapolate_to, len(train))  # head/gate training is measured in full: the cache is tiled
        table = table.select(np.arange(n) % len(train))
        started = time.perf_counter()
        fit(model, table, np.arange(n))
        steps, result["head_training_records"] = EPOCHS * math.ceil(n / args.batch_size), n
    else:
        started = time.perf_counter()
        steps = trainer_fit(model, train, "rr_interval", args, tmp)
    result.update(head_training_s=time.perf_counter() - started, measured_steps=steps)
    if args.evaluate:  # held-out MAE of the trained model, through the cached-features path
        out = predict(model, store_table(model, test, np.asarray(test["rr_interval"], np.float32), tmp, args.batch_size))
        result["eval_mae_ms"] = float(np.abs(out["logits"][:, 0] - out["labels"]).mean())
    if args.latency_repeats:  # batch 1, no grad: adds nothing to peak RSS
        x = torch.as_tensor(np.asarray(test["signal"], np.float32), device=args.device)
        result["latency_ms"] = measure_inference(model, x, args.latency_repeats)
    return finish_worker(result, model)


def finish_worker(result: dict, model) -> dict:
    import torch

    result.update(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  total_params=sum(p.numel() for p in model.parameters()), experts=model.expert_names,
                  peak_rss_mb=peak_rss_mib()["main"])
    if torch.cuda.is_available():
        result["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_inference(model, x, repeats: int) -> dict:
    """Per-record latency (batch 1, no grad, eval): each expert's own forward on the normalised record and the
    ensemble's full forward on the record, side by side (`harness.interleaved`); medians over records."""
    import torch

    from enecg_hf.signal_enecg import normalize_ecg

    model.eval()
    items = [(r[None], normalize_ecg(r[None].float(), model.config.normalization)) for r in x]
    calls = {n: (lambda item, e=e: e(item[1])) for n, e in model.experts.items()}
    calls["ensemble"] = lambda item: model(input_values=item[0])
    with torch.no_grad():
        seconds = interleaved(calls, items, repeats=repeats, warmup=2)
    per_expert = {n: 1000 * statistics.median(seconds[n]) for n in model.expert_names}
    ratios = [seconds["ensemble"][i] / sum(seconds[n][i] for n in per_expert) for i in range(len(items))]
    return {"per_expert": per_expert, "sum_of_experts": sum(per_expert.values()),
            "ensemble": 1000 * statistics.median(seconds["ensemble"]),
            "ensemble_over_sum_of_experts": statistics.median(ratios), "records": len(items), "repeats": repeats}


def spawn(args, mode: str, variant: str, data: Path, **extra) -> dict:
    """One worker in a fresh process; past --memory-limit-gb it is stopped."""
    name = "-".join([variant, mode, *(f"{k}={v}" for k, v in extra.items() if v)])
    print(f"[efficiency] {name} ...", flush=True)
    cmd = ["--worker", mode, "--variant", variant, "--data", data, "--threads", args.threads, "--device", args.device,
           "--seed", args.seed, "--folds", args.folds]
    cmd += [a for k, v in extra.items() if v not in (None, False)
            for a in [f"--{k.replace('_', '-')}"] + ([] if v is True else [v])]
    return in_fresh_process(__file__, cmd, threads=args.threads, memory_limit_gb=args.memory_limit_gb)


def alternating(args, modes: list[str], variant: str, data: Path, repeats: int, **extra) -> dict[str, list[dict]]:
    """Every mode `repeats` times, the order rotating from one round to the next."""
    runs = {mode: [] for mode in modes}
    for r in range(repeats):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            runs[mode].append(spawn(args, mode, variant, data, **extra.get(mode, {})))
    return runs


def summarise_mode(raws: list[dict], n_train: int, batch: int, extrapolated: bool, how: str) -> dict:
    """A mode's runs as reported fields (medians over runs); measured steps extrapolated to 5 epochs of n_train."""
    rows = []
    for raw in raws:
        step_time = raw["head_training_s"] / raw["measured_steps"]
        if raw["mode"] == "cached_features":
            extraction = raw["feature_extraction_s"] * n_train / raw["train_records"]
            wall = extraction + raw["head_training_s"] * n_train / raw["head_training_records"]
        else:
            extraction = raw["feature_extraction_s"]
            wall = step_time * math.ceil(n_train / batch) * EPOCHS if extrapolated else raw["head_training_s"]
        rows.append({"wall_time_5_epochs_s": wall, "throughput_records_per_s": n_train * EPOCHS / wall,
                     "train_step_throughput_records_per_s": batch / step_time, "feature_extraction_s": extraction,
                     "peak_rss_mb": raw["peak_rss_mb"], "baseline_rss_mb": raw["baseline_rss_mb"],
                     "peak_rss_above_baseline_mb": raw["peak_rss_mb"] - raw["baseline_rss_mb"]})
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    first = raws[0]
    return {"trainable_params": first["trainable_params"], "total_params": first["total_params"],
            "train_records": n_train, "batch_size": batch, "epochs": EPOCHS, **medians, "runs": len(raws),
            "wall_time_runs_s": [r["wall_time_5_epochs_s"] for r in rows], "measured_steps": first["measured_steps"],
            "measured_records": first["train_records"], "extrapolated": extrapolated, "how": how,
            **{k: first[k] for k in ("eval_mae_ms", "peak_cuda_allocated_mb", "fits") if k in first}}


def run_variant(args, variant: str, dataset, workdir: Path) -> dict:
    n_train, data = args.train_records, workdir / f"{variant}-data"
    if variant == "labels":
        dataset.save_to_disk(str(data))
        runs = alternating(args, list(LABEL_MODES), variant, data, args.repeats,
                           **{m: {"batch_size": args.batch_size} for m in LABEL_MODES})
        modes = {m: summarise_mode(r, n_train, args.batch_size, False, f"measured: {len(LABELS)} labels x "
                                   f"{args.folds} folds, 5 epochs each") for m, r in runs.items()}
        ratio = modes["research_loop"]["wall_time_5_epochs_s"] / modes["one_store"]["wall_time_5_epochs_s"]
        return {"config": VARIANT_CONFIGS[variant], "experts": runs["one_store"][0]["experts"], "labels": list(LABELS),
                "folds": args.folds, "batch_size": args.batch_size, "modes": modes,
                "ratios": {"research_loop_over_one_store_wall_time": ratio}}
    if variant == "tiny":
        batch = args.batch_size
        dataset.save_to_disk(str(data))
        raws = alternating(args, list(MODES), variant, data, args.repeats, **{m: {
            "batch_size": batch, "evaluate": True, "latency_repeats": args.latency_repeats if m == "cached_features" else 0}
            for m in MODES})
        modes = {m: summarise_mode(r, n_train, batch, False, "measured: 5 full epochs") for m, r in raws.items()}
    else:
        batch, k = 1, args.paper_records
        type(dataset)({"train": dataset["train"].select(range(k)), "eval": dataset["eval"].select([0])}).save_to_disk(str(data))
        raws = alternating(args, ["frozen_recompute", "cached_features"], variant, data, 1, frozen_recompute={
            "batch_size": 1, "max_steps": k}, cached_features={"batch_size": 1, "extrapolate_to": n_train, "latency_repeats": 1})
        modes = {"frozen_recompute": summarise_mode(raws["frozen_recompute"], n_train, 1, True, (
                     f"extrapolated: {k} step(s) of batch 1 measured on {k} record(s), scaled to 5 epochs of {n_train} "
                     "records")),
                 "cached_features": summarise_mode(raws["cached_features"], n_train, 1, True, (
                     f"extrapolated: feature extraction measured on {k} record(s) and scaled to {n_train}; head/gate "
                     f"training measured in full (5 epochs over {n_train} cached records, the measured features tiled)")),
                 "full_finetune": paper_full_finetune(args, data, n_train)}
    modes = {mode: modes[mode] for mode in MODES}
    inference, (full, recompute, cached) = raws["cached_features"][0]["latency_ms"], modes.values()
    ratios = {"recompute_over_cached_wall_time": recompute["wall_time_5_epochs_s"] / cached["wall_time_5_epochs_s"],
              "full_over_cached_wall_time": full["wall_time_5_epochs_s"] / cached["wall_time_5_epochs_s"],
              "cached_over_full_peak_rss": cached["peak_rss_mb"] / full["peak_rss_mb"],
              "cached_over_full_peak_rss_above_baseline": cached["peak_rss_above_baseline_mb"]
              / full["peak_rss_above_baseline_mb"],
              "ensemble_over_sum_of_experts_latency": inference["ensemble_over_sum_of_experts"]}
    return {"config": VARIANT_CONFIGS[variant], "experts": raws["cached_features"][0]["experts"], "batch_size": batch,
            "modes": modes, "inference": inference, "ratios": ratios,
            "random_weights": "every expert has random weights (pretrained set to null: the Hub is unreachable and no "
                              "converted checkpoints exist); compute and memory do not depend on weight values",
            "targets_met": {
                "cached_at_least_4x_faster_than_recompute": ratios["recompute_over_cached_wall_time"] >= 4.0,
                "cached_peak_memory_at_most_half_of_full": ratios["cached_over_full_peak_rss"] <= 0.5,
                "ensemble_latency_within_10pct_of_sum_of_experts": ratios["ensemble_over_sum_of_experts_latency"] <= 1.10}}


def paper_full_finetune(args, data: Path, n_train: int) -> dict:
    """Full fine-tuning at paper size: the whole model with MOMENT reading 1 lead (~14 GB peak RSS) for k steps, plus
    one forward + backward of MOMENT alone reading 1 and 2 leads; 11 x the per-lead difference (time, peak RSS) is
    added (MOMENT encodes leads independently; optimiser state does not depend on the lead count)."""
    k = args.paper_records
    runs = {"all_1": summarise_mode([spawn(args, "full_finetune", "paper", data, batch_size=1, moment_leads=1,
                                           max_steps=k)], n_train, 1, True, "")}
    for leads in (1, 2):
        raw = spawn(args, "full_finetune", "paper", data, batch_size=1, moment_leads=leads, only_experts="moment",
                    probe=True)
        runs[f"moment_{leads}"] = summarise_mode([raw], n_train, 1, True, "")
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
    p = parser(__doc__, "efficiency.json")
    add = p.add_argument
    add("--quick", action="store_true", help="tiny and labels on 8 records, 2 folds, one repeat (~3 min on 2 cores)")
    add("--variants", default=None, help="comma-separated: tiny,labels,paper (default all; --quick: tiny,labels)")
    add("--figure", default=None, help="PNG path (default: next to --output)")
    add("--merge", action="store_true", help="keep other variants already in --output")
    add("--replot", action="store_true", help="only redraw the figure (and docs) from --output")
    add("--data-dir", default=str(DATA_DIR))
    add("--train-records", type=int, default=None)
    add("--eval-records", type=int, default=None)
    add("--batch-size", type=int, default=None)
    add("--repeats", type=int, default=None, help="runs of every mode, alternating (default 3; --quick 1)")
    add("--folds", type=int, default=None, help="folds per label of the labels variant (default 3; --quick 2)")
    add("--paper-records", type=int, default=2, help="records (= steps, batch 1) measured at paper size")
    add("--latency-repeats", type=int, default=None)
    add("--threads", type=int, default=1)
    add("--device", default=None, help="default: cuda when available, else cpu")
    add("--seed", type=int, default=42)
    add("--memory-limit-gb", type=float, default=14.0, help="a worker past this RSS is stopped")
    for hidden, kind in (("--worker", str), ("--variant", str), ("--data", str), ("--only-experts", str),
                         ("--max-steps", int), ("--moment-leads", int), ("--extrapolate-to", int)):
        add(hidden, type=kind, default=0 if kind is int else None, help="==SUPPRESS==")
    add("--probe", action="store_true", help="==SUPPRESS==")
    add("--evaluate", action="store_true", help="==SUPPRESS==")
    args = p.parse_args(argv)
    if args.worker:
        with tempfile.TemporaryDirectory(prefix="enecg-eff-worker-") as tmp:
            return print(json.dumps(run_worker(args, tmp)))
    import numpy as np
    import torch
    from datasets import DatasetDict

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.replot:  # re-render figure and docs from an existing JSON
        return report(json.loads(args.output.read_text()), args)
    args.train_records = args.train_records or (8 if args.quick else 96)
    n_eval = args.eval_records or (4 if args.quick else 32)
    args.batch_size = args.batch_size or (4 if args.quick else 16)
    args.latency_repeats = args.latency_repeats or (1 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.folds = args.folds or (2 if args.quick else 3)
    started = time.perf_counter()
    dataset, source = load_records(Path(args.data_dir), args.train_records + n_eval)
    if len(dataset) < args.train_records + n_eval:
        raise RuntimeError(f"only {len(dataset)} records available, need {args.train_records + n_eval}")
    dataset = DatasetDict({"train": dataset.select(range(args.train_records)),
                           "eval": dataset.select(range(args.train_records, len(dataset)))})
    y_train, y_eval = dataset["train"]["rr_interval"], dataset["eval"]["rr_interval"]
    results = {"benchmark": "efficiency", "quick": args.quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "machine": machine_info(torch_threads=args.threads, device=args.device),
               "data": {"source": source, "label": "rr_interval (ms)", "train_records": args.train_records,
                        "eval_records": n_eval, "record_shape": list(np.shape(dataset["train"][0]["signal"])),
                        "mean_predictor_eval_mae_ms": sum(abs(y - sum(y_train) / len(y_train)) for y in y_eval) / n_eval},
               "variants": json.loads(args.output.read_text())["variants"] if args.merge and args.output.is_file() else {}}
    with tempfile.TemporaryDirectory(prefix="enecg-eff-") as workdir:
        for variant in (args.variants or ("tiny,labels" if args.quick else "tiny,labels,paper")).split(","):
            if variant == "labels" and not source.startswith("ludb"):
                print("[efficiency] labels variant skipped: it needs LUDB (age, sex and rhythm labels)")
                continue
            variant_start, load = time.perf_counter(), os.getloadavg()[0]
            block = run_variant(args, variant, dataset, Path(workdir))
            block["run"] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "repeats": 1 if variant == "paper" else args.repeats,
                            "load_average_start": load, "load_average_end": os.getloadavg()[0],
                            "elapsed_s": time.perf_counter() - variant_start}
            results["variants"][variant] = block
    results["elapsed_s"] = time.perf_counter() - started
    return report(results, args)


def report(results: dict, args) -> dict:
    """The figure, the docs table (printed, and written with --update-docs)."""
    figure = Path(args.figure) if args.figure else args.output.with_suffix(".png")
    plot(results, figure)
    print(f"[efficiency] figure {figure}")
    save(results, args.output, docs_table(results), "efficiency" if args.update_docs else None)
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
    rows = ("tiny" in variants) + ("paper" in variants)
    if not rows:
        return
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.2 * rows), squeeze=False)
    axis_keys = (("peak_rss_mb", "peak memory: process RSS (MB)"),
                 ("throughput_records_per_s", "training throughput (records/s, 5 epochs, log)"))
    if "tiny" in variants:
        modes, baseline = variants["tiny"]["modes"], results["data"]["mean_predictor_eval_mae_ms"]
        for ax, (key, xlabel) in zip(axes[0], axis_keys):
            for mode in MODES:
                ax.scatter(modes[mode][key], modes[mode].get("eval_mae_ms", math.nan), s=160, color=colors[mode],
                           label=MODE_LABELS[mode], edgecolor="black", zorder=3)
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="mean predictor (no learning)")
            ax.set(xlabel=xlabel, ylabel="held-out RR MAE (ms), lower is better", title=f"tiny variant, "
                   f"{results['data']['train_records']} train / {results['data']['eval_records']} eval records")
            ax.grid(alpha=0.3)
        axes[0][1].set_xscale("log")
        axes[0][0].legend(fontsize=8, loc="best")
    if "paper" in variants:
        names = [MODE_LABELS[m].split(" ", 1)[0] + " " + m.replace("_", " ") for m in MODES]
        for ax, (key, xlabel) in zip(axes[-1], axis_keys):
            values = [variants["paper"]["modes"][m][key] for m in MODES]
            ax.barh(names, values, color=[colors[m] for m in MODES], edgecolor="black")
            ax.set(xscale="log", xlabel=xlabel.replace(", log", "") + " (log)")
            ax.set_title("paper size: extrapolated from measured steps\n(no performance: not trained to the end)", fontsize=9)
            for i, v in enumerate(values):
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    for ax in axes.flat:  # log axes: major ticks only, as plain numbers
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    fig.suptitle(f"EnECG training efficiency on {results['machine']['cpu_count']} shared CPU cores", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def docs_table(results: dict) -> str:
    lines = []
    for variant, block in results["variants"].items():
        labels, r, run = variant == "labels", block["ratios"], block["run"]
        names = LABEL_MODES if labels else MODE_LABELS
        first = next(iter(block["modes"].values()))
        lines += [(f"**{variant}** (`{block['config']}`, experts: {', '.join(block['experts'])}; batch "
                   f"{block['batch_size']}; {first['train_records']} training records"
                   + (f"; labels {', '.join(block['labels'])} x {block['folds']} folds" if labels else "") + ")\n"),
                  ("| mode | trainable params | throughput (records/s) | wall time" + (", all fits" if labels else
                   ", 5 epochs") + " | runs | peak RSS (MB) | above baseline (MB) | held-out RR MAE (ms) | how |"),
                  "|---|---:|---:|---:|---|---:|---:|---:|---|"]
        for mode, label in names.items():
            m = block["modes"][mode]
            mae = f"{m['eval_mae_ms']:.0f}" if "eval_mae_ms" in m else "n/a"
            runs = ", ".join(duration(s) for s in m["wall_time_runs_s"]) if m["runs"] > 1 else "1"
            lines.append(f"| {label} | {m['trainable_params']:,} | {m['throughput_records_per_s']:.3g} | "
                         f"{duration(m['wall_time_5_epochs_s'])} | {runs} | {m['peak_rss_mb']:,.0f} | "
                         f"{m['peak_rss_above_baseline_mb']:,.0f} | {mae} | {m['how']} |")
        order = (f"every mode {run['repeats']}× in rotating order (medians; each run's wall time in *runs*)"
                 if run["repeats"] > 1 else "every mode once")
        lines += ["", (f"Run finished {run['finished']}, {duration(run['elapsed_s'])}, {order}, load average "
                       f"{run['load_average_start']:.2f} at start, {run['load_average_end']:.2f} at end (2 shared cores).\n")]
        if labels:
            lines.append(f"Ratio: research loop / one store, wall time **{r['research_loop_over_one_store_wall_time']:.1f}×"
                         f"** for {len(block['labels'])} labels × {block['folds']} folds.\n")
            continue
        inf = block["inference"]
        lines += ["Inference latency per record (batch 1, ms, median over " + f"{inf['records']} records of the median "
                  f"of {inf['repeats']} side-by-side runs): " + ", ".join(f"{k} {v:,.1f}" for k, v in
                  inf["per_expert"].items()) + f"; **sum of experts {inf['sum_of_experts']:,.1f}, ensemble "
                  f"{inf['ensemble']:,.1f}**.\n",
                  f"Ratios: (2)/(3) wall time **{r['recompute_over_cached_wall_time']:.2f}×**; (1)/(3) wall time "
                  f"**{r['full_over_cached_wall_time']:.2f}×**; peak RSS (3)/(1) **{r['cached_over_full_peak_rss']:.2f}**"
                  f" (above baseline {r['cached_over_full_peak_rss_above_baseline']:.2f}); ensemble / sum of experts "
                  f"latency **{r['ensemble_over_sum_of_experts_latency']:.2f}**. Targets: " + ", ".join(
                      f"{k.replace('_', ' ')}: {'met' if v else '**not met**'}" for k, v in block["targets_met"].items())
                  + ".\n"]
    m = results["machine"]
    lines.append(f"Machine: {m['cpu_count']} CPU cores, {m['torch_threads']} torch thread(s), torch {m['torch']}, "
                 f"transformers {m['transformers']}; data: {results['data']['source']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
