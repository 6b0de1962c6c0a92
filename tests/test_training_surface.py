"""Training goes through the model's public surface (issue 27, point 3): `enecg_hf/training/` never reaches into PEFT's
LoRA layers or the heads' and gate's inner layers. What it needs - the heads as stacked tensors and back
(`stacked_heads`, `head_state`), the gate's stacked log-weights, the initial weights, the linear paths - are
operations of the model (`modeling_enecg.py`), so that changing a head or the adapter type touches that one module.

Read with `ast`, without importing anything.
"""

from __future__ import annotations

import ast

from helpers import REPO


TRAINING = REPO / "enecg_hf" / "training"
# Names of PEFT's LoRA internals: the adapter's layers and their wrapped base layer, their per-adapter dictionaries and
# the functions that reset them.
PEFT_INTERNALS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "base_layer", "reset_lora_parameters",
                  "peft_config", "active_adapter", "active_adapters"}
# PEFT's name of the adapter the model adds: a key of those dictionaries and a part of the state-dict keys.
ADAPTER_NAME = "default"


def peft_internals(source: str, filename: str) -> list[str]:
    """`line: what` for every use of PEFT internals in `source`: an attribute or name of `PEFT_INTERNALS`, a string
    that names one (a state-dict key or a `getattr`), a subscript by the adapter's name, a string with the adapter's
    name as a key part (`"...lora_A.default.weight"`), or an import of peft."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Attribute) and node.attr in PEFT_INTERNALS:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in PEFT_INTERNALS:
            found.append(f"{node.lineno}: {node.id}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = [name for name in PEFT_INTERNALS if name in node.value]
            if named or f".{ADAPTER_NAME}." in node.value:
                found.append(f"{node.lineno}: {node.value!r}")
        elif (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
              and node.slice.value == ADAPTER_NAME):
            found.append(f"{node.lineno}: [{ADAPTER_NAME!r}]")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{node.lineno}: import {m}" for m in modules if m.split(".")[0] == "peft"]
    return sorted(found, key=lambda use: int(use.split(":")[0]))


def test_the_scan_finds_peft_internals():
    """What the training code did before the model had these operations is found."""
    before = '''
with torch.no_grad():
    getattr(out_proj, "base_layer", out_proj).bias.copy_(log_weights)
a = m.lora_A["default"].weight
state[f"{prefix}{layer}.lora_B.default.weight"] = b
layer.reset_lora_parameters(adapter, init_lora_weights=True)
scaling = module.scaling["default"]
from peft.tuners.lora import LoraLayer
'''
    found = peft_internals(before, "before.py")
    assert [line.split(":")[0] for line in found] == ["3", "4", "4", "5", "6", "7", "8"], found
    assert not peft_internals("config.lora_r, config.lora_alpha, config.adaptation == 'lora'\nx = {'default': 1}\n",
                              "after.py")


def test_training_uses_no_peft_internals():
    files = sorted(TRAINING.rglob("*.py"))
    assert len(files) > 10 and TRAINING / "fitting.py" in files  # the walk found the code
    found = {f"{path.relative_to(REPO).as_posix()}:{use}" for path in files
             for use in peft_internals(path.read_text(), str(path))}
    assert not found, ("enecg_hf/training reaches into PEFT's LoRA layers; give the model (modeling_enecg.py) the "
                       f"operation instead: {sorted(found)}")


# The heads' and gate's inner parts: their attributes, and the parameter and buffer names that spell them.
HEAD_GATE_INTERNALS = {"linear_path", "input_mean", "input_std", "gate_input_mean", "gate_input_std", "dense1",
                       "dense2", "out_proj"}
NAME_PARTS = (".linear.", "gate_input_", "input_mean", "input_std")


def head_gate_internals(source: str, filename: str) -> list[str]:
    """`line: what` for every attribute of `HEAD_GATE_INTERNALS` that `source` reads and every string that filters
    parameters or buffers by a part of their name (`NAME_PARTS`)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Attribute) and node.attr in HEAD_GATE_INTERNALS:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and any(
                part in node.value for part in NAME_PARTS):
            found.append(f"{node.lineno}: {node.value!r}")
    return sorted(found, key=lambda use: int(use.split(":")[0]))


def test_the_scan_finds_head_and_gate_internals():
    before = '''
params = [p for n, p in model.named_parameters() if ".linear." not in n]
state = {k: v for k, v in model.named_buffers() if k.startswith("gate_input_")}
fitted = any(head.input_mean.any() for head in heads)
linear = any(head.linear_path for head in heads)
'''
    found = head_gate_internals(before, "before.py")
    assert [line.split(":")[0] for line in found] == ["2", "3", "4", "5"], found
    after = "model.has_linear_paths\nmodel.trained_parameters()\nmodel.gate_state()\n"
    assert not head_gate_internals(after, "after.py")


def test_training_reads_no_head_or_gate_internals():
    """Training asks the task ensemble (`has_linear_paths`, `trained_parameters`, `head_standardization_is_set`,
    `gate_state`, ...) instead of reading the heads' and gate's parts or filtering their names."""
    found = {f"{path.relative_to(REPO).as_posix()}:{use}" for path in sorted(TRAINING.rglob("*.py"))
             for use in head_gate_internals(path.read_text(), str(path))}
    assert not found, f"enecg_hf/training reads the heads' or gate's inner parts: {sorted(found)}"
