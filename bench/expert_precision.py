"""Frozen expert pass at fp32 vs int8 vs bf16 (`model.set_expert_precision`): time, embedding drift, downstream CV.

    python bench/expert_precision.py [--records 200] [--time-records 10] [--repeats 3] [--update-docs]
    python bench/expert_precision.py --moment --output bench/results/expert_precision_moment.json  # MOMENT-large

Model: hub_configs/offline_pretrained.json (REAL openecg and deepfade weights, features, dlinear) with DeepFADE on lead
II only (its time is linear in leads: 12 leads ~7 s/record). `--moment`: a paper-size MOMENT-large (random weights,
1 lead). One process, one torch thread; per record, each precision's forward (of each expert and of the whole frozen
pass) interleaved, warm-up first, median over repetitions then over records. Each precision is what the option gives
(experts it leaves at fp32 run fp32); bf16 autocast forced on the KEEP_IN_FP32 experts is timed on one record apart.
Drift: ||e - e_fp32|| / ||e_fp32|| per record. Downstream: heads + gate (`enecg_hf.training` core) on fp32 vs int8 features, same subject folds and seeds.
"""
from __future__ import annotations

import json, os, time

import numpy as np
import torch

from enecg_hf import EnECGConfig, EnECGModel
from enecg_hf.data import TASKS, subject_kfold
from enecg_hf.training import FeatureTable, FitSettings, cross_validate, summarize
from enecg_hf.training.labels import encode_labels
from harness import REPO, interleaved, ludb, median_ms, parser, save

PRECISIONS = ["fp32", "int8", "bf16"]


def build_models(moment: bool) -> dict[str, EnECGModel]:
    """One model per precision (the int8 one holds a quantised copy; bf16 is autocast, forced on every expert)."""
    config = json.loads((REPO / "hub_configs" / "offline_pretrained.json").read_text())
    if moment:
        config["experts"] = [{"name": "moment", "type": "moment", "input_length": 5000, "leads": ["II"],
                              "pretrained": None, "settings": {"preset": "large"}}]
    else:
        next(e for e in config["experts"] if e["name"] == "deepfade")["leads"] = ["II"]
    torch.manual_seed(0)
    models = {"fp32": EnECGModel.from_expert_sources(EnECGConfig(**config)).eval()}
    models["int8"] = EnECGModel.from_expert_sources(EnECGConfig(**config)).eval()
    models["int8"].load_state_dict(models["fp32"].state_dict())
    models["int8"].set_expert_precision("int8")
    if "bf16" in PRECISIONS:
        models["bf16"] = EnECGModel.from_expert_sources(EnECGConfig(**config)).eval()
        models["bf16"].load_state_dict(models["fp32"].state_dict())
        models["bf16"].set_expert_precision("bf16")
    return models


@torch.no_grad()
def run(models, precision: str, x: torch.Tensor, expert: str | None = None):
    model = models[precision]
    start = time.perf_counter()
    out = model.experts[expert](x) if expert else model.compute_features(x)
    return out, time.perf_counter() - start


@torch.no_grad()
def forced_bf16(models, x) -> dict:
    """One record through each KEEP_IN_FP32 expert with bf16 autocast forced (what the option refuses to do)."""
    out, xn = {}, normalized(models, x)
    for name, e in models["fp32"].experts.items():
        if e.KEEP_IN_FP32 and e.has_weights:
            ref, fp32 = run(models, "fp32", xn, name)
            e.autocast_dtype = torch.bfloat16
            got, bf16 = run(models, "fp32", xn, name)
            e.autocast_dtype = None
            out[name] = {"fp32_ms": 1000 * fp32, "bf16_ms": 1000 * bf16, "drift_pct": float(100 * (got - ref).norm() / ref.norm())}
    return out


def normalized(models, x):
    from enecg_hf.signal_enecg import normalize_ecg
    return normalize_ecg(x, models["fp32"].config.normalization)


def timing(models, signals, repeats: int) -> dict:
    targets = [*models["fp32"].expert_names, "pass"]

    def call(p, t):  # each expert on the normalised record, the whole frozen pass on the raw one
        return lambda x: run(models, p, x[0]) if t == "pass" else run(models, p, x[1], t)

    seconds = interleaved({f"{p}/{t}": call(p, t) for p in PRECISIONS for t in targets},
                          [(r[None], normalized(models, r[None])) for r in signals], repeats)
    ms = {p: {t: median_ms(seconds[f"{p}/{t}"]) for t in targets} for p in PRECISIONS}
    return {"ms_per_record": ms, "speedup_over_fp32": {p: {t: ms["fp32"][t] / ms[p][t] for t in ms[p]} for p in PRECISIONS}}


def features(models, signals) -> dict[str, FeatureTable]:
    tables = {}
    for p in PRECISIONS:
        out = [run(models, p, signals[i:i + 8])[0] for i in range(0, len(signals), 8)]
        tables[p] = FeatureTable([torch.cat([b.expert_embeddings[j].float() for b in out])
                                  for j in range(len(models["fp32"].experts))],
                                 torch.cat([b.gate_inputs for b in out]), torch.zeros(len(signals)))
    return tables


def drift(tables, names) -> dict:
    out = {}
    for p in PRECISIONS[1:]:
        for j, name in enumerate(names):
            a, b = tables["fp32"].expert_embeddings[j], tables[p].expert_embeddings[j]
            rel = ((b - a).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)).numpy()
            out.setdefault(p, {})[name] = {"median_pct": 100 * float(np.median(rel)), "max_pct": 100 * float(rel.max())}
    return out


def downstream(models, tables, dataset, folds: int, epochs: int) -> dict:
    result, groups = {}, np.asarray(dataset["subject_id"])
    for name in ("rr_interval", "sex"):
        keep, labels = encode_labels(dataset, TASKS[name])
        cv = subject_kfold(dataset.select(keep), folds, seed=0)
        result[name] = {"records": len(keep)}
        config = EnECGConfig(**{**models["fp32"].config.to_dict(), **TASKS[name].config_fields()})
        for p in ("fp32", "int8"):  # the same folds, initial weights and seeds on both
            torch.manual_seed(0)
            table = tables[p].select(keep, labels, groups[keep])
            scores = cross_validate(EnECGModel(config).eval(), table, cv, TASKS[name], FitSettings(epochs=epochs, seed=42))
            result[name][p] = summarize(scores)
    return result


def markdown(r: dict) -> str:
    t, lines = r["timing"], [f"Measured {r['date']}, {r['machine']}, load average {r['load'][0]:.1f} / {r['load'][1]:.1f} "
                             f"(start / end); {r['time_records']} records × {r['repeats']} repetitions.", "",
                             "| expert / pass | fp32 ms | int8 ms | int8 speed-up | bf16 ms | bf16 speed-up | int8 drift % (median / max) | bf16 drift % |",
                             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in t["ms_per_record"]["fp32"]:
        ms, up = t["ms_per_record"], t["speedup_over_fp32"]
        d = {p: r.get("drift", {}).get(p, {}).get(k) for p in ("int8", "bf16")}
        fmt = lambda v: f"{v['median_pct']:.2f} / {v['max_pct']:.2f}" if v else "–"
        b = (f"{ms['bf16'][k]:.0f} | {up['bf16'][k]:.2f}×") if "bf16" in ms else "not run | –"
        lines.append(f"| {k} (int8: {r['precisions'].get(k, 'pass')}, bf16: {r['bf16_precisions'].get(k, 'pass' if r['bf16_precisions'] else '–')}) | "
                     f"{ms['fp32'][k]:.1f} | {ms['int8'][k]:.1f} | {up['int8'][k]:.2f}× | {b} | {fmt(d['int8'])} | {fmt(d['bf16'])} |")
    for k, v in r.get("forced_bf16", {}).items():
        lines.append(f"| {k}, bf16 autocast forced (1 record) | {v['fp32_ms']:.0f} | | | {v['bf16_ms']:.0f} | "
                     f"{v['fp32_ms'] / v['bf16_ms']:.2f}× | | {v['drift_pct']:.2f} / – |")
    if r.get("downstream"):
        lines += ["", "| task (LUDB, subject-wise CV) | records | metric | fp32 features (mean ± std) | int8 features |",
                  "|---|---:|---|---:|---:|"]
        for name, row in r["downstream"].items():
            for m in (("mae", "rmse") if name == "rr_interval" else ("auroc", "accuracy")):
                fp32, int8 = (f"{row[p][m]['mean']:.4g} ± {row[p][m]['std']:.2g}" for p in ("fp32", "int8"))
                lines.append(f"| {name} | {row['records']} | {m} | {fp32} | {int8} |")
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__.split("\n\n")[0], "expert_precision.json")
    p.add_argument("--records", type=int, default=200, help="LUDB records for drift and downstream CV")
    p.add_argument("--time-records", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--moment", action="store_true", help="time a paper-size MOMENT-large instead (no downstream)")
    p.add_argument("--precisions", default="fp32,int8,bf16")
    args = p.parse_args()
    PRECISIONS[:] = args.precisions.split(",")
    torch.set_num_threads(1)
    load = [os.getloadavg()[0]]
    models = build_models(args.moment)
    dataset, signals = ludb(args.time_records if args.moment else args.records)
    r = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, 1 torch thread",
         "time_records": args.time_records, "repeats": args.repeats, "precisions": models["int8"].expert_precisions,
         "bf16_precisions": models["bf16"].expert_precisions if "bf16" in models else {},
         "timing": timing(models, signals[: args.time_records], args.repeats)}
    if not args.moment:
        tables = features(models, signals)
        r["drift"] = drift(tables, models["fp32"].expert_names)
        r["forced_bf16"] = forced_bf16(models, signals[:1])
        r["downstream"] = downstream(models, tables, dataset, args.folds, args.epochs)
    r["load"] = load + [os.getloadavg()[0]]
    section = ("expert_precision_moment" if args.moment else "expert_precision") if args.update_docs else None
    save(r, args.output, markdown(r), section)


if __name__ == "__main__":
    main()
