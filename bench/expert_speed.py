"""The frozen experts' pass per record, before and after the subnormal-float work (docs/benchmarks.md, "Expert speed").

Three ways of running the same experts on the same LUDB records, side by side (every record, `--repeats` rounds of all
modes in an order that rotates from record to record; medians), at 1 and 2 torch threads:

    before     the library's DeepFADE module, nothing flushed (`ENECG_HF_FLUSH_DENORMALS=0`): the code before
    ftz        the library's DeepFADE module, subnormals flushed to zero on every thread of the pass
    after      DeepFADE's compiled inference plan, flushed (the default)

Each expert is timed alone on one record, then the whole frozen pass (`model.compute_features`). The embeddings of
`after` are compared with `before`'s (max absolute difference, and relative to the embedding's largest value).

`--options` times the ways of running DeepFADE's 12 leads that were tried beyond flushing (chunks of leads, one
batch, `torch.compile`, ONNX Runtime, OpenVINO: the last two only where installed), against the plan in chunks of 4.

    python bench/expert_speed.py --update-docs              # offline_pretrained and tiny, 1 and 2 threads
    python bench/expert_speed.py --options --update-docs    # the options tried for DeepFADE
    python bench/expert_speed.py --quick                    # 2 records, 1 round
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

import numpy as np
import torch

from enecg_hf import EnECGConfig, EnECGModel
from enecg_hf.denormal_enecg import FLUSH_DENORMALS_ENV
from enecg_hf.signal_enecg import normalize_ecg
from harness import REPO, interleaved, ludb, machine_info, markdown_table, parser, render_only, save


CONFIGS = {"offline_pretrained": "hub_configs/offline_pretrained.json", "tiny": "hub_configs/tiny.json"}
MODES = ("before", "ftz", "after")
SECTION, OPTIONS_SECTION = "expert-speed", "expert-speed-options"


@contextlib.contextmanager
def mode(model: EnECGModel, name: str):
    """Run `model`'s experts as mode `name` (module docstring) inside the block."""
    previous = os.environ.get(FLUSH_DENORMALS_ENV)
    os.environ[FLUSH_DENORMALS_ENV] = "0" if name == "before" else "1"
    plans = {e: e.use_inference_plan for e in model.experts.values() if hasattr(e, "use_inference_plan")}
    for expert in plans:
        expert.use_inference_plan = name == "after"
    try:
        yield
    finally:
        for expert, used in plans.items():
            expert.use_inference_plan = used
        if previous is None:
            os.environ.pop(FLUSH_DENORMALS_ENV, None)
        else:
            os.environ[FLUSH_DENORMALS_ENV] = previous


def measure_config(name: str, records: torch.Tensor, threads: int, repeats: int) -> dict:
    """Seconds per record of every expert and of the whole pass, per mode; and after-vs-before differences."""
    torch.set_num_threads(threads)
    config = EnECGConfig.from_json_file(str(REPO / CONFIGS[name]))
    torch.manual_seed(0)
    model = EnECGModel.from_expert_sources(config).eval()
    normalized = [normalize_ecg(r[None], config.normalization) for r in records]
    modes = [m for m in MODES if m != "ftz" or any(hasattr(e, "use_inference_plan") for e in model.experts.values())]
    result = {"experts": {}, "modes": modes}
    parts = {**{expert: model.experts[expert] for expert in model.expert_names},
             "whole pass": lambda x: model.compute_features(x)}
    with torch.no_grad():
        for part, run in parts.items():
            calls = {m: (lambda x, m=m, run=run: _in_mode(model, m, run, x)) for m in modes}
            seconds = interleaved(calls, normalized if part != "whole pass" else [r[None] for r in records],
                                  repeats=repeats)
            result["experts"][part] = {m: statistics.median(s) for m, s in seconds.items()}
        for expert in model.expert_names:
            worst_abs = worst_rel = 0.0
            for x in normalized:
                before, after = (_in_mode(model, m, model.experts[expert], x) for m in ("before", "after"))
                diff = float((after - before).abs().max())
                worst_abs = max(worst_abs, diff)
                worst_rel = max(worst_rel, diff / max(float(before.abs().max()), 1e-12))
            result["experts"][expert].update(max_abs_diff=worst_abs, max_rel_diff=worst_rel)
    return result


def _in_mode(model, name, run, x):
    with mode(model, name):
        return run(x)


def measure_options(records: torch.Tensor, repeats: int) -> dict:
    """DeepFADE's 12 leads, one thread: the plan in chunks of 4 (the default) against the other ways tried."""
    torch.set_num_threads(1)
    config = EnECGConfig.from_json_file(str(REPO / CONFIGS["offline_pretrained"]))
    expert = EnECGModel.from_expert_sources(config).experts["deepfade"]
    z = [expert.standardize(expert.prepare_inputs(normalize_ecg(r[None], "record")).reshape(12, 1, -1))
         for r in records]
    plan = expert.inference_plan()

    def chunked(encode, size):
        return lambda x: torch.cat([encode(x[i : i + size]) for i in range(0, len(x), size)])

    calls = {"plan, chunks of 4 (default)": chunked(plan, 4), "plan, one lead at a time": chunked(plan, 1),
             "plan, 12 leads in one batch": plan, "library module, chunks of 4 (FTZ)": chunked(expert.encoder, 4)}

    class Plan(torch.nn.Module):
        def forward(self, x):
            return plan(x)

    compiled = torch.compile(Plan(), dynamic=False)
    calls["plan under torch.compile, 12 leads"] = compiled
    exported = REPO / "bench" / "results" / "deepfade_plan.onnx.tmp"
    with contextlib.suppress(ImportError):
        import onnxruntime

        torch.onnx.export(Plan(), (z[0],), str(exported), dynamo=False, input_names=["z"], output_names=["latent"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(exported), options, providers=["CPUExecutionProvider"])
        calls["ONNX Runtime (CPU), 12 leads"] = lambda x: torch.from_numpy(session.run(None, {"z": x.numpy()})[0])
        with contextlib.suppress(ImportError):
            import openvino

            network = openvino.Core().compile_model(str(exported), "CPU", {"INFERENCE_NUM_THREADS": 1,
                                                                           "INFERENCE_PRECISION_HINT": "f32"})
            calls["OpenVINO (CPU, f32), 12 leads"] = lambda x: torch.from_numpy(network(x.numpy())[0])
    from enecg_hf.denormal_enecg import flush_denormals

    with torch.no_grad(), flush_denormals():
        reference = [chunked(plan, 4)(x) for x in z]
        seconds = interleaved({name: call for name, call in calls.items()}, z, repeats=repeats)
        differences = {name: max(float(((call(x) - ref).abs() / ref.abs().max()).max()) for x, ref in zip(z, reference))
                       for name, call in calls.items()}
    exported.unlink(missing_ok=True)
    default = statistics.median(seconds["plan, chunks of 4 (default)"])
    return {name: {"s_per_record": statistics.median(s), "speedup_vs_default": default / statistics.median(s),
                   "max_rel_diff_vs_default": differences[name]} for name, s in seconds.items()}


def table(results: dict) -> str:
    rows = []
    for key, block in results["runs"].items():
        config, threads = key.rsplit("@", 1)
        for part, figures in block["experts"].items():
            times = [f"{1000 * figures[m]:.0f}" if m in figures else "" for m in MODES]
            ratio = figures["before"] / figures["after"]
            diff = (f"{figures['max_abs_diff']:.1e} / {figures['max_rel_diff']:.1e}" if "max_abs_diff" in figures
                    else "")
            rows.append([config, threads, part, *times, f"{ratio:.1f}x", diff])
    header = ["config", "threads", "part", "before (ms/record)", "FTZ only", "after (default)", "before / after",
              "after vs before: max abs / rel diff"]
    run = results["machine"]
    return (f"LUDB records {results['records']}, one record per call, median of {results['repeats']} rotated rounds "
            f"per record, then the median over records; {run['created'][:10]}, load {run['load_average']:.1f} on "
            f"{run['cpu_count']} CPUs ({run['platform']}).\n\n"
            + markdown_table(header, rows, "lllrrrrl"))


def options_table(results: dict) -> str:
    rows = [[name, f"{1000 * f['s_per_record']:.0f}", f"{f['speedup_vs_default']:.2f}x",
             f"{f['max_rel_diff_vs_default']:.1e}"] for name, f in results["options"].items()]
    run = results["machine"]
    return (f"DeepFADE, 12 leads x 5000 samples of {results['records']} LUDB records, one thread, FTZ on, median of "
            f"{results['repeats']} rotated rounds; {run['created'][:10]}, load {run['load_average']:.1f}.\n\n"
            + markdown_table(["way of running DeepFADE", "ms per record", "speed-up vs default",
                              "max rel diff vs default"], rows, "lrrr"))


def main() -> None:
    p = parser(__doc__, "expert_speed.json")
    p.add_argument("--records", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--configs", default="offline_pretrained,tiny")
    p.add_argument("--options", action="store_true", help="time the ways tried to run DeepFADE instead")
    p.add_argument("--quick", action="store_true", help="2 records, one round")
    args = p.parse_args()
    if args.options and args.output == p.get_default("output"):
        args.output = args.output.with_name("expert_speed_options.json")
    section, render = (OPTIONS_SECTION, options_table) if args.options else (SECTION, table)
    if render_only(args, render, section):
        return
    if args.quick:
        args.records, args.repeats = 2, 1
    _, signals = ludb(args.records)
    started = time.perf_counter()
    results = {"records": args.records, "repeats": args.repeats, "machine": machine_info()}
    if args.options:
        results["options"] = measure_options(signals, args.repeats)
    else:
        results["runs"] = {f"{config}@{threads}": measure_config(config, signals, int(threads), args.repeats)
                           for config in args.configs.split(",") for threads in args.threads.split(",")}
    results["seconds"] = round(time.perf_counter() - started, 1)
    save(results, args.output, render(results), section if args.update_docs else None)


if __name__ == "__main__":
    main()
