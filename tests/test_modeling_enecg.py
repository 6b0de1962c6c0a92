"""Core model tests, in the transformers `ModelTester` pattern: a tester builds tiny configs and inputs; the test class
checks shapes, losses, freezing, adaptation and the save/load round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BLOCK_ENECG
from scipy.signal import resample

import enecg_hf
from enecg_hf import EnECGConfig, EnECGModel, load_adapter_base
from enecg_hf.signal_enecg import resample_fourier
from enecg_hf.expert_registry import EXPERT_TYPES, expert_class
from enecg_hf.training.fitting import task_of


REPO = Path(__file__).resolve().parents[1]
HUB_CONFIGS = REPO / "hub_configs"


class EnECGModelTester:
    """Tiny configs and inputs: three experts on different lead sets and lengths, a 2-lead gate."""

    def __init__(self, batch_size: int = 3, input_length: int = 1000, sampling_rate: int = 100):
        self.batch_size = batch_size
        self.input_length = input_length
        self.sampling_rate = sampling_rate

    def get_config(self, **overrides) -> EnECGConfig:
        experts = [
            {"name": "moment", "type": "moment", "input_length": 64, "leads": ["I", "II", "V1"], "settings": {"preset": "tiny"}},
            {"name": "dlinear", "type": "dlinear", "input_length": 200, "leads": ["II"], "settings": {"preset": "tiny"}},
            {"name": "timesnet", "type": "timesnet", "input_length": 100, "leads": ["II", "V5"], "settings": {"preset": "tiny"}},
        ]
        kwargs = dict(
            experts=experts, sampling_rate=self.sampling_rate, input_length=self.input_length, head_hidden_size=16,
            gate_leads=["II", "V2"], gate_input_length=50, gate_hidden_size=8, lora_r=2, lora_alpha=8,
            lora_dropout=0.0,
        )
        kwargs.update(overrides)
        return EnECGConfig(**kwargs)

    def get_inputs(self, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch_size, 12, self.input_length, generator=generator)

    def get_model(self, seed: int = 0, **overrides) -> EnECGModel:
        torch.manual_seed(seed)
        return EnECGModel(self.get_config(**overrides))


PROBLEMS = {
    "regression": dict(problem_type="regression", num_labels=1),
    "regression_2d": dict(problem_type="regression", num_labels=2),
    "single_label": dict(problem_type="single_label_classification", id2label={0: "a", 1: "b", 2: "c"}),
    "multi_label": dict(problem_type="multi_label_classification", id2label={0: "a", 1: "b", 2: "c", 3: "d"}),
}


def labels_for(config: EnECGConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    config = config.task_configs[0]
    if config.problem_type == "regression":
        return torch.randn(batch, config.num_labels, generator=generator) * 100 + 800
    if config.problem_type == "single_label_classification":
        return torch.randint(0, config.num_labels, (batch,), generator=generator)
    return torch.randint(0, 2, (batch, config.num_labels), generator=generator).float()


def expert_state(model: EnECGModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("experts.")}


@pytest.fixture(scope="module")
def tester() -> EnECGModelTester:
    return EnECGModelTester()


# ------------------------------------------------------------------------------------------------ outputs and losses
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_output_shapes_and_loss(tester, problem):
    model = tester.get_model(**PROBLEMS[problem]).eval()
    config = model.config
    inputs = tester.get_inputs()
    labels = labels_for(config, tester.batch_size, torch.Generator().manual_seed(1))
    out = model(inputs, labels=labels)
    num_labels = config.task_configs[0].num_labels
    assert out.logits.shape == (tester.batch_size, num_labels)
    assert out.expert_logits.shape == (tester.batch_size, 3, num_labels)
    assert out.gate_weights.shape == (tester.batch_size, 3)
    torch.testing.assert_close(out.gate_weights.sum(-1), torch.ones(tester.batch_size))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    # The logits are the gate-weighted sum of the experts' outputs.
    torch.testing.assert_close(out.logits, (out.gate_weights.unsqueeze(-1) * out.expert_logits).sum(1))
    # The loss is the one the problem type names: on the mixture, plus `expert_loss_weight` (default 1) times the mean
    # of every head's own loss (the paper's step 1: each head is a predictor by itself).
    F = torch.nn.functional
    if problem == "single_label":
        own = lambda logits: F.cross_entropy(logits, labels)  # noqa: E731
    elif problem == "multi_label":
        own = lambda logits: F.binary_cross_entropy_with_logits(logits, labels)  # noqa: E731
    else:  # the default regression loss: Huber on the standardised target (here mean 0, std 1), over its delta
        assert config.regression_loss == "huber"
        own = lambda logits: F.huber_loss(logits, labels, delta=config.huber_delta) / config.huber_delta  # noqa: E731
    per_expert = torch.stack([own(out.expert_logits[:, e]) for e in range(3)]).mean()
    torch.testing.assert_close(out.loss, own(out.logits) + per_expert)
    model.config.expert_loss_weight = 0.0
    torch.testing.assert_close(model(inputs, labels=labels).loss, own(out.logits))
    # Tuple outputs when asked.
    assert len(model(inputs, labels=labels, return_dict=False)) == 4


def test_hidden_states_are_the_expert_embeddings(tester):
    model = tester.get_model().eval()
    inputs = tester.get_inputs()
    with torch.no_grad():
        out = model(inputs, output_hidden_states=True)
        features = model.compute_features(inputs)
    assert len(out.hidden_states) == len(model.experts)
    for hidden, embedding in zip(out.hidden_states, features.expert_embeddings, strict=True):
        assert torch.equal(hidden, embedding)
    assert model(inputs).hidden_states is None
    assert len(model(inputs, output_hidden_states=True, return_dict=False)) == 4  # logits, experts, gate, hidden
    with pytest.raises(ValueError, match="no attention maps"):
        model(inputs, output_attentions=True)
    with pytest.raises(TypeError, match=r"unexpected arguments \['pixel_values'\]"):
        model(inputs, pixel_values=inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_pretrained_honours_the_dtype(tester, tmp_path, dtype):
    """Heads, gate and the experts that can run in half precision take the dtype; TimesNet (FFTs) stays float32 with
    its weights exactly as saved; inputs of any float dtype are cast; outputs are float32."""
    from transformers import AutoModel

    model = tester.get_model(target_mean=800.0, target_std=100.0).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, dtype=dtype).eval()
    assert loaded.experts["moment"].compute_dtype == dtype and task_of(loaded).heads["dlinear"].dense1.weight.dtype == dtype
    assert task_of(loaded).gate.dense.weight.dtype == dtype
    assert loaded.experts["timesnet"].compute_dtype == torch.float32
    for key, value in model.experts["timesnet"].state_dict().items():
        assert torch.equal(loaded.experts["timesnet"].state_dict()[key], value), key
    inputs = tester.get_inputs()
    with torch.no_grad():
        expected = model(inputs).logits
        for batch in (inputs, inputs.to(dtype), inputs.double()):
            out = loaded(batch, output_hidden_states=True)
            assert out.logits.dtype == torch.float32 and out.gate_weights.dtype == torch.float32
            assert out.hidden_states[0].dtype == dtype and out.hidden_states[2].dtype == torch.float32
            torch.testing.assert_close(out.logits, expected, rtol=0, atol=1.0)  # 800 +- 1 in the label's unit
    with pytest.raises(ValueError, match=r"'timesnet' \(timesnet\) runs in float32 only"):
        model.to(dtype)(inputs.to(dtype))


def test_training_with_unset_target_scaling_warns_once(tester, caplog):
    from enecg_hf.training import fit_label_statistics

    model = tester.get_model().train()
    labels = torch.tensor([700.0, 800.0, 950.0])
    with caplog.at_level("WARNING", logger="enecg_hf.modeling_enecg"):
        model(tester.get_inputs(), labels=labels)
        model(tester.get_inputs(), labels=labels)
    assert caplog.text.count("target scaling is unset") == 1
    caplog.clear()
    fit_label_statistics(model, labels)
    assert model.config.task_configs[0].target_mean == pytest.approx(816.667, abs=1e-3)
    model._warned_target_scaling = False
    with caplog.at_level("WARNING", logger="enecg_hf.modeling_enecg"), torch.no_grad():
        loss = model(tester.get_inputs(), labels=labels).loss
    assert "target scaling" not in caplog.text and loss.item() < 20  # standardised: O(1), not O(800^2)


def test_regression_target_scaling(tester):
    """Heads learn a standardised target; logits come back in the label's unit, and the loss is scale-free (MSE, or
    the default Huber loss over its delta, both of the standardised values)."""
    F = torch.nn.functional
    for loss, expected in (("mse", F.mse_loss), ("huber", lambda a, b: F.huber_loss(a, b, delta=0.05) / 0.05)):
        model = tester.get_model(target_mean=800.0, target_std=100.0, expert_loss_weight=0.0, regression_loss=loss,
                                 huber_delta=0.05).eval()
        out = model(tester.get_inputs(), labels=torch.full((tester.batch_size,), 900.0))
        raw = (out.logits - 800.0) / 100.0
        torch.testing.assert_close(out.loss, expected(raw, torch.ones_like(raw)))


def test_class_weights_weigh_the_cross_entropy(tester):
    model = tester.get_model(**PROBLEMS["single_label"], class_weights=[1.0, 3.0, 0.5], expert_loss_weight=0.0).eval()
    labels = torch.tensor([0, 1])[: tester.batch_size].repeat(tester.batch_size)[: tester.batch_size]
    out = model(tester.get_inputs(), labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits, labels, weight=torch.tensor([1.0, 3.0, 0.5]))
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="class_weights"):
        tester.get_config(**PROBLEMS["single_label"], class_weights=[1.0, 2.0])


def test_a_new_gate_starts_as_the_uniform_average(tester):
    """Its output layer starts at zero: every record gets equal weights until training moves it."""
    model = tester.get_model().eval()
    out = model(tester.get_inputs())
    torch.testing.assert_close(out.gate_weights, torch.full_like(out.gate_weights, 1 / 3))


def test_heads_standardize_and_clip_their_inputs(tester):
    model = tester.get_model(head_input_clip=2.0).eval()
    features = model.compute_features(tester.get_inputs())
    embeddings = [e * 100 + 7 for e in features.expert_embeddings]  # another scale and offset
    model.fit_head_standardization(embeddings)
    head = next(iter(task_of(model).heads.values()))
    torch.testing.assert_close(head.input_mean, embeddings[0].mean(0))
    # A head sees (x - mean) / std, clipped to +-2: a wild value gives the same output as the clip value.
    wild, clipped = embeddings[0].clone(), embeddings[0].clone()
    wild[:, 0] = head.input_mean[0] + 1e6
    clipped[:, 0] = head.input_mean[0] + 2.0 * head.input_std[0]
    torch.testing.assert_close(head(wild), head(clipped))


def test_a_linear_path_extrapolates_but_stays_bounded(tester):
    """The linear path reads standardised values up to +-`head_linear_clip` (24): a measurement 10 standard deviations
    out still moves the prediction (the FFN's clip is 6), a broken column at 1e6 gives what 24 gives (unbounded, one
    record made an openecg age head predict thousands of years). The stacked heads used in fitting agree."""
    model = tester.get_model().eval()
    features = model.compute_features(tester.get_inputs())
    embeddings = list(features.expert_embeddings)
    model.fit_head_standardization(embeddings)
    name, head = next(iter(task_of(model).heads.items()))
    with torch.no_grad():
        head.linear.weight.fill_(0.5)

    def at(sd):  # every record's first column `sd` standard deviations above the mean
        moved = embeddings[0].clone()
        moved[:, 0] = head.input_mean[0] + sd * head.input_std[0]
        return head(moved)

    assert not torch.allclose(at(10.0), at(6.0))
    torch.testing.assert_close(at(1e6), at(24.0))
    assert torch.isfinite(at(1e6)).all() and (at(1e6) - at(0.0)).abs().max() < 0.5 * 24 + 1e-3
    wild = [e.clone() for e in embeddings]
    wild[0][:, 0] = head.input_mean[0] + 1e6 * head.input_std[0]
    heads = task_of(model).stacked_heads()
    stacked = heads.forward(heads.stack_inputs(wild), training=False)
    torch.testing.assert_close(stacked[:, 0], head(wild[0]))


def test_folders_saved_before_head_standardization_load_as_saved(tester, tmp_path):
    """A config.json without `head_standardize` (written by enecg_hf 0.1) loads with it off and no buffers."""
    model = tester.get_model(head_standardize=False).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["head_standardize"], config["head_input_clip"], config["expert_loss_weight"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = EnECGModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.head_standardize is False
    assert not any("input_mean" in k for k in reloaded.state_dict())
    inputs = tester.get_inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs).logits, model(inputs).logits, rtol=0, atol=0)
    # A new config standardises by default, and the statistics are saved with the model.
    assert EnECGConfig().head_standardize is True


def test_folders_saved_before_linear_paths_load_with_the_ffn_head_and_mse(tester, tmp_path):
    """A config.json without `head_type` / `regression_loss` (written before issue #29) loads as it was trained:
    the FFN head alone (no `linear` weights expected) and the MSE loss; new configs get the linear path and Huber."""
    model = tester.get_model(head_type="ffn", regression_loss="mse").eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["head_type"], config["regression_loss"], config["huber_delta"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = EnECGModel.from_pretrained(tmp_path).eval()
    assert (reloaded.config.head_type, reloaded.config.regression_loss) == ("ffn", "mse")
    assert not any(".linear." in k for k in reloaded.state_dict())
    inputs = tester.get_inputs()
    labels = torch.tensor([700.0, 800.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs).logits, model(inputs).logits, rtol=0, atol=0)
        torch.testing.assert_close(reloaded(inputs, labels=labels).loss, model(inputs, labels=labels).loss)
    assert (EnECGConfig().head_type, EnECGConfig().regression_loss) == ("linear_ffn", "huber")
    assert EnECGConfig.from_json_file(HUB_CONFIGS / "tiny.json").head_type == "linear_ffn"  # configs, not folders


def test_linear_path_reads_the_standardised_embedding_unclipped():
    """`linear(z) + FFN(clip(z))`: beyond the clip the FFN's input stops, the linear path's does not."""
    from enecg_hf.modeling_enecg import EnECGHead

    torch.manual_seed(0)
    head = EnECGHead(4, 8, 1, 0.0, standardize=True, input_clip=2.0, linear_path=True).eval()
    assert float(head(torch.randn(5, 4)).abs().max()) == 0.0  # linear and out_proj start at zero
    head.fit_standardization(torch.randn(50, 4) * 3 + 1)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    z = torch.zeros(2, 4)
    z[:, 0] = torch.tensor([3.0, 10.0])  # standardised: both beyond the clip
    x = z * head.input_std + head.input_mean
    torch.testing.assert_close(head(x)[:, 0], torch.tensor([3.0, 10.0]))


def test_linear_paths_read_an_unmeasured_value_as_the_training_mean():
    """The features expert stores a value it could not measure as 0.0 with its `_missing` flag at 1: the linear path
    must not extrapolate from the placeholder (an RR of 0 ms), so the value reads as the training mean of the
    measured values, and the flag as a column of its own."""
    from enecg_hf.modeling_enecg import EnECGHead

    config = EnECGConfig(experts=[{"name": "features", "type": "features", "input_length": 5000, "leads": ["II"],
                                   "settings": {"preset": "default"}}])
    model = EnECGModel(config)
    expert = model.experts["features"]
    names = expert.feature_names
    assert [(names[v], names[f]) for v, f in expert.missing_indicators][:2] == [
        ("II.rr_mean", "II.rr_mean_missing"), ("II.rr_std", "II.rr_std_missing")]
    head = task_of(model).heads["features"]
    assert isinstance(head, EnECGHead) and head.impute_columns == [v for v, _ in expert.missing_indicators]
    rng = np.random.default_rng(0)
    embedding = torch.tensor(rng.uniform(0.5, 1.2, (40, 14)), dtype=torch.float32)
    embedding[:, 7:] = 0.0
    embedding[:3, 0], embedding[:3, 7] = 0.0, 1.0  # three records whose RR was not measured
    head.fit_standardization(embedding)
    measured = embedding[3:, 0]
    assert float(head.input_mean[0]) == pytest.approx(float(measured.mean()), rel=1e-5)  # over measured values only
    assert float(head.input_std[0]) == pytest.approx(float(measured.std()), rel=1e-4)
    z = head.standardize_input(embedding)
    assert torch.all(z[:3, 0] == 0.0) and torch.all(z[:3, 7] > 3.0)
    # The paper's FFN head keeps reading the placeholder as it always did.
    assert task_of(EnECGModel(EnECGConfig(**{**config.to_dict(), "head_type": "ffn"}))).heads["features"].impute_columns == []


def test_huber_loss_is_the_absolute_error_beyond_delta(tester):
    model = tester.get_model(target_mean=800.0, target_std=100.0, huber_delta=0.05)
    scaled, labels = torch.tensor([[0.0], [0.0]]), torch.tensor([800.0 + 100.0 * 2.0, 800.0 + 100.0 * 0.01])
    expected = ((2.0 - 0.025) + 0.5 * 0.01**2 / 0.05) / 2  # |r| - delta/2 beyond delta, r^2 / (2 delta) within
    assert float(task_of(model).loss_function(scaled, labels)) == pytest.approx(expected, rel=1e-5)
    mse = tester.get_model(target_mean=800.0, target_std=100.0, regression_loss="mse")
    assert float(task_of(mse).loss_function(scaled, labels)) == pytest.approx((4.0 + 1e-4) / 2, rel=1e-5)


def test_uniform_gate_is_plain_average(tester):
    model = tester.get_model(gate_type="uniform").eval()
    out = model(tester.get_inputs())
    torch.testing.assert_close(out.gate_weights, torch.full_like(out.gate_weights, 1 / 3))
    torch.testing.assert_close(out.logits, out.expert_logits.mean(1))


def test_cached_features_give_the_same_output(tester):
    model = tester.get_model().eval()
    inputs = tester.get_inputs()
    features = model.compute_features(inputs)
    assert [e.shape[0] for e in features.expert_embeddings] == [tester.batch_size] * 3
    assert features.gate_inputs.shape == (tester.batch_size, 2 * 50)
    direct = model(inputs)
    cached = model(expert_embeddings=features.expert_embeddings, gate_inputs=features.gate_inputs)
    assert torch.equal(direct.logits, cached.logits)


def test_experts_embed_records_independently_of_batch(tester):
    """Each record's embedding must not depend on its batch-mates (needed for caching and serving)."""
    model = tester.get_model().eval()
    inputs = tester.get_inputs()
    together = model.compute_features(inputs).expert_embeddings
    alone = model.compute_features(inputs[1:2]).expert_embeddings
    for a, b in zip(together, alone):
        torch.testing.assert_close(a[1:2], b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ training behaviour
@pytest.mark.parametrize("adaptation", ["lora", "full"])
def test_loss_decreases_and_backbones_do_not_change(tester, adaptation):
    model = tester.get_model(adaptation=adaptation, target_mean=800.0, target_std=100.0)
    inputs = tester.get_inputs()
    # A learnable toy target: a fixed function of the signal.
    labels = 800 + 100 * inputs[:, 1].std(dim=-1)
    before = expert_state(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    assert not any(m.training for m in model.experts.modules()), "experts must stay in eval mode"
    losses = []
    for _ in range(25):
        loss = model(inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    after = expert_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen backbone changed"
    assert all(p.grad is None for p in model.experts.parameters())


def test_trainable_parameters_are_exactly_the_adaptation(tester):
    lora = tester.get_model(adaptation="lora")
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    lora_names = {n for n, _ in lora.named_parameters() if "lora_" in n}
    assert trainable == lora_names and trainable
    # Every head and gate linear layer is adapted (3 per head, 2 in the gate: A and B each).
    assert len(lora_names) == 2 * (3 * 3 + 2)
    assert lora.num_parameters(only_trainable=True) == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)

    full = tester.get_model(adaptation="full")
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in full.named_parameters() if n.startswith(("tasks.label.heads.", "tasks.label.gate."))}


# ------------------------------------------------------------------------------------------------ save and load
def train_a_little(model: EnECGModel, inputs: torch.Tensor, steps: int = 5) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(inputs, labels=torch.full((inputs.shape[0],), 3.0)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_round_trip_is_bit_identical_and_refrozen(tester, tmp_path):
    from transformers import AutoModel

    model = tester.get_model(adaptation="full").eval()
    train_a_little(model, tester.get_inputs())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_enecg.EnECGConfig",
        "AutoModel": "modeling_enecg.EnECGModel",
    }
    for name in ("modeling_enecg.py", "configuration_enecg.py", "expert_base.py", "expert_moment.py", "model.safetensors"):
        assert (tmp_path / name).is_file(), name

    reloaded = AutoModel.from_pretrained(tmp_path)
    assert type(reloaded) is EnECGModel
    inputs = tester.get_inputs(seed=5)
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, reloaded(inputs).logits)
    # transformers 5 re-enables gradients while loading: the model must be frozen again.
    assert not any(p.requires_grad for p in reloaded.experts.parameters())
    assert all(p.requires_grad for n, p in reloaded.named_parameters() if n.startswith(("heads.", "gate.")))


@pytest.fixture(scope="module")
def saved_lora_model(tester, tmp_path_factory):
    """A trained LoRA model with fitted head standardisation, saved; its predictions on held-out inputs."""
    model = tester.get_model(adaptation="lora", target_mean=800.0, target_std=100.0).eval()
    with torch.no_grad():
        model.fit_head_standardization(model.compute_features(tester.get_inputs(seed=11)).expert_embeddings)
    assert all(float(head.input_std.sub(1).abs().max()) > 0 for head in task_of(model).heads.values())
    train_a_little(model, tester.get_inputs())
    assert any(layer.get_delta_weight("default").abs().sum() > 0 for layer in model.lora_layers().values())
    folder = tmp_path_factory.mktemp("lora") / "model"
    model.save_pretrained(folder)
    inputs = tester.get_inputs(seed=7)
    with torch.no_grad():
        expected = model(inputs).logits
    return folder, inputs, expected


def test_lora_model_saves_unmerged_with_a_peft_adapter(saved_lora_model):
    folder, inputs, expected = saved_lora_model
    reloaded = EnECGModel.from_pretrained(folder).eval()
    # The adapter is kept un-merged: the saved LoRA weights are the trained ones, the base layers the initial ones.
    assert all(torch.count_nonzero(layer.lora_B["default"].weight) > 0 for layer in reloaded.lora_layers().values())
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, expected)
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(folder.resolve())
    assert adapter["auto_mapping"] == {"base_model_class": "AutoModel", "parent_library": "transformers"}
    assert {p.name for p in (folder / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def _peft_route(route: str, folder: Path):
    from peft import AutoPeftModel, PeftModel
    from transformers import AutoModel

    adapter = str(folder / "adapter")
    if route == "PeftModel(load_adapter_base)":
        return PeftModel.from_pretrained(load_adapter_base(folder), adapter)
    if route == "PeftModel(AutoModel)":
        return PeftModel.from_pretrained(AutoModel.from_pretrained(folder), adapter)
    if route == "AutoModel.load_adapter":
        model = AutoModel.from_pretrained(folder)
        model.load_adapter(adapter)
        return model
    return AutoPeftModel.from_pretrained(adapter)


@pytest.mark.parametrize(
    "route", ["PeftModel(load_adapter_base)", "PeftModel(AutoModel)", "AutoModel.load_adapter", "AutoPeftModel"]
)
def test_every_peft_route_predicts_as_the_saved_model(saved_lora_model, route):
    """Loading the adapter by any PEFT route gives the saved model's predictions (never the adapter applied twice)."""
    folder, inputs, expected = saved_lora_model
    model = _peft_route(route, folder).eval()
    with torch.no_grad():
        difference = float((model(input_values=inputs).logits - expected).abs().max())
    print(f"{route}: max abs difference {difference:.3g} (predictions {float(expected.abs().max()):.4g})")
    assert difference <= 1e-4 * float(expected.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tester", "tiny_hub_config"])
def test_trust_remote_code_loads_without_the_package(tester, tmp_path, which):
    if which == "tester":
        model, inputs = tester.get_model().eval(), tester.get_inputs(seed=3)
    else:  # every expert type, as shipped
        torch.manual_seed(0)
        model = EnECGModel(EnECGConfig.from_json_file(HUB_CONFIGS / "tiny.json")).eval()
        inputs = torch.randn(2, 12, 5000, generator=torch.Generator().manual_seed(3))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    np.save(tmp_path / "inputs.npy", inputs.numpy())
    with torch.no_grad():
        np.save(tmp_path / "expected.npy", model(inputs).logits.numpy())
    script = BLOCK_ENECG + textwrap.dedent(
        f"""
        import numpy as np, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "enecg_hf" not in type(model).__module__, type(model).__module__
        assert not any(p.requires_grad for p in model.experts.parameters())
        with torch.no_grad():
            logits = model(torch.from_numpy(np.load({str(tmp_path / 'inputs.npy')!r}))).logits.numpy()
        assert np.array_equal(logits, np.load({str(tmp_path / 'expected.npy')!r})), (logits,)
        print("REMOTE_OK", type(model).__module__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REMOTE_OK" in result.stdout


def tiny_momentfm_folder(path: Path, input_length: int, seed: int = 0):
    """A MOMENT checkpoint written by momentfm itself (its `save_pretrained`), at the tiny size."""
    from momentfm import MOMENTPipeline

    from enecg_hf.expert_moment import EnECGMomentExpert

    torch.manual_seed(seed)
    s = EnECGMomentExpert.PRESETS["tiny"]
    t5 = {"d_model": s["d_model"], "d_ff": s["d_ff"], "num_layers": s["num_layers"], "num_heads": s["num_heads"],
          "d_kv": 64, "feed_forward_proj": "gated-gelu", "vocab_size": s["vocab_size"], "model_type": "t5"}
    config = {"task_name": "reconstruction", "model_name": "MOMENT", "transformer_type": "encoder_only",
              "d_model": s["d_model"], "seq_len": input_length, "patch_len": 8, "patch_stride_len": 8,
              "transformer_backbone": "google/flan-t5-large", "t5_config": t5}
    upstream = MOMENTPipeline(config, model_kwargs={"task_name": "reconstruction", "enable_gradient_checkpointing": False})
    upstream.init()
    upstream.save_pretrained(str(path))
    return upstream


def test_moment_loads_a_checkpoint_written_by_momentfm(tester, tmp_path):
    upstream = tiny_momentfm_folder(tmp_path / "moment", input_length=64).eval()
    model = tester.get_model()
    model.config.experts[0]["pretrained"] = str(tmp_path / "moment")
    model.load_expert_weights(["moment"])
    expert = model.experts["moment"]
    x = torch.randn(2, 3, 64)
    with torch.no_grad():  # bit-identical, with the expert's stateless RevIN in place of momentfm's
        assert torch.equal(expert.embed(x), upstream.embed(x_enc=x).embeddings)
    assert not any(p.requires_grad for p in expert.parameters())


def test_light_save_reattaches_backbones_from_their_source(tester, tmp_path):
    tiny_momentfm_folder(tmp_path / "moment", input_length=64)
    config = tester.get_config(save_backbones=False)
    config.experts[0]["pretrained"] = str(tmp_path / "moment")
    model = EnECGModel.from_expert_sources(config).eval()
    model.save_pretrained(tmp_path / "light")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "light" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("experts.moment.") for k in keys)
    assert any(k.startswith("experts.dlinear.") for k in keys)  # no source: must be saved
    reloaded = EnECGModel.from_pretrained(tmp_path / "light")
    inputs = tester.get_inputs()
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, reloaded(inputs).logits)


def test_unreachable_hub_source_names_the_expert(tester, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tester.get_config()
    config.experts[0]["pretrained"] = "AutonLab/MOMENT-1-large"
    with pytest.raises(OSError, match=r"Expert 'moment'.*AutonLab/MOMENT-1-large"):
        EnECGModel.from_expert_sources(config)


def test_random_weights_are_logged(tester, caplog):
    with caplog.at_level("WARNING"):
        EnECGModel.from_expert_sources(tester.get_config())
    assert "RANDOM weights" in caplog.text and "'timesnet'" in caplog.text


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"adaptation": "qlora"}, "adaptation"),
        ({"problem_type": "ranking"}, r"tasks: tasks\[0\] \('label'\)\.problem_type"),
        ({"gate_leads": ["X9"]}, "gate_leads"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"sampling_rate": 0}, "sampling_rate"),
        ({"target_std": 0.0}, r"tasks: tasks\[0\] \('label'\)\.target_std"),
        ({"head_type": "mlp"}, "head_type"),
        ({"regression_loss": "l1"}, "regression_loss"),
        ({"huber_delta": 0.0}, "huber_delta"),
        ({"logit_temperature": 0.0}, r"tasks: tasks\[0\] \('label'\)\.logit_temperature"),
        ({"logit_temperature": float("nan")}, r"tasks: tasks\[0\] \('label'\)\.logit_temperature"),
        ({"experts": []}, "experts"),
        ({"experts": [{"name": "a", "type": "transformerxl", "input_length": 10}]}, "experts"),
        ({"experts": [{"name": "a", "type": "dlinear", "input_length": 10, "leads": ["V7"]}]}, "experts"),
        ({"experts": [{"name": "a", "type": "dlinear"}]}, "experts"),
        ({"experts": [{"name": "a", "type": "dlinear", "input_length": 10}] * 2}, "experts"),
        ({"experts": [{"name": "a", "type": "dlinear", "input_length": 10, "colour": 1}]}, "experts"),
    ],
)
def test_bad_config_names_the_field(tester, overrides, field):
    with pytest.raises(ValueError, match=rf"EnECGConfig\.{field}|experts\[0\]"):
        tester.get_config(**overrides)


def test_expert_checks_of_their_own_settings_run_when_the_model_is_built(tester):
    """A 5 s record (500 samples at 100 Hz) with the features expert's default 10 s: the config (which checks only what
    every expert shares) accepts it; building the model runs the expert's `validate_config`, naming the field."""
    config = tester.get_config(input_length=500, experts=[{"name": "f", "type": "features", "input_length": 500}])
    with pytest.raises(ValueError, match=r"EnECGConfig\.experts: expert 'f' \(features\): settings\.record_seconds"):
        EnECGModel(config)


def test_bad_expert_settings_fail_at_construction(tester):
    experts = [{"name": "t", "type": "timesnet", "input_length": 100, "settings": {"preset": "huge"}}]
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        EnECGModel(tester.get_config(experts=experts))
    experts = [{"name": "t", "type": "timesnet", "input_length": 100, "settings": {"layers": 3}}]
    with pytest.raises(ValueError, match=r"unknown settings \['layers'\]"):
        EnECGModel(tester.get_config(experts=experts))
    experts = [{"name": "m", "type": "moment", "input_length": 100}]
    with pytest.raises(ValueError, match="multiple of its patch length"):
        EnECGModel(tester.get_config(experts=experts))


def test_wrong_input_is_a_clear_error(tester):
    model = tester.get_model().eval()
    with pytest.raises(ValueError, match=r"shape \(batch, 12, 1000\)"):
        model(torch.randn(2, 8, 1000))
    with pytest.raises(ValueError, match=r"shape \(batch, 12, 1000\)"):
        model(torch.randn(2, 12, 999))
    bad = tester.get_inputs()
    bad[0, 3, 10] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad)


# ------------------------------------------------------------------------------------------------ building blocks
@pytest.mark.parametrize("n, num", [(5000, 512), (5000, 336), (500, 5000), (999, 100), (100, 999), (64, 64)])
def test_fourier_resampling_matches_scipy(n, num):
    x = np.random.default_rng(0).standard_normal((2, 3, n))
    ours = resample_fourier(torch.from_numpy(x), num).numpy()
    np.testing.assert_allclose(ours, resample(x, num, axis=-1), rtol=1e-7, atol=1e-9)


def test_hub_configs_are_valid():
    tiny = EnECGConfig.from_json_file(HUB_CONFIGS / "tiny.json")
    assert set(EXPERT_TYPES) <= {e["type"] for e in tiny.experts}, "tiny.json must cover every expert type"
    expected_tasks = {
        "paper_rr_interval": ("regression", "rr_interval", 1),
        "paper_age": ("regression", "age", 1),
        "paper_sex": ("single_label_classification", "sex", 2),
        "paper_potassium": ("single_label_classification", "potassium_flag", 2),
        "paper_arrhythmia": ("single_label_classification", "arrhythmia", 6),
    }
    for name, (problem_type, label, num_labels) in expected_tasks.items():
        config = EnECGConfig.from_json_file(HUB_CONFIGS / f"{name}.json")
        task = config.task_configs[0]
        assert (task.problem_type, task.label_name, task.num_labels) == (problem_type, label, num_labels)
        by_name = {e.name: e for e in config.expert_configs}
        assert by_name["moment"].settings["preset"] == "large" and by_name["moment"].input_length == 5000
        assert by_name["moment"].pretrained == "AutonLab/MOMENT-1-large"
        assert by_name["tempo"].input_length == 336 and by_name["dlinear"].input_length == 500
        assert config.gate_leads == ["II"] and config.gate_input_length == 5000
        assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (8, 32, 0.05)
        for expert in config.expert_configs:
            # Presets resolve without building the (large) backbone.
            expert_class(expert.type).resolve_settings(expert.settings)


def test_offline_pretrained_config_points_at_installed_wheel_files():
    """hub_configs/offline_pretrained.json: real pretrained experts with no Hub access (weights inside installed wheels),
    the paper's heads, gate and LoRA."""
    import importlib.util

    from enecg_hf.expert_base import PACKAGE_SOURCE_PREFIX, resolve_package_path

    config = EnECGConfig.from_json_file(HUB_CONFIGS / "offline_pretrained.json")
    by_type = {e.type: e for e in config.expert_configs}
    assert set(by_type) == {"openecg", "deepfade", "features", "dlinear", "median_beat"}
    assert by_type["deepfade"].leads == list(config.lead_names) and by_type["openecg"].leads == ["II"]
    assert (config.head_hidden_size, config.gate_hidden_size, config.gate_input_length) == (256, 256, 5000)
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (8, 32, 0.05)
    for expert in config.expert_configs:
        expert_class(expert.type).resolve_settings(expert.settings)
        if expert.pretrained:
            assert expert.pretrained.startswith(PACKAGE_SOURCE_PREFIX)
            package = expert.pretrained[len(PACKAGE_SOURCE_PREFIX):].split("/")[0]
            if importlib.util.find_spec(package) is not None:
                assert resolve_package_path(expert.pretrained, expert.name).is_file()


def test_tiny_hub_config_runs_on_a_10_second_record():
    config = EnECGConfig.from_json_file(HUB_CONFIGS / "tiny.json")
    model = EnECGModel(config).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 12, 5000))
    assert out.logits.shape == (2, 1) and out.gate_weights.shape == (2, len(config.experts))


def test_lead_names_are_defined_once():
    """One lead-name constant: the config reads preprocessing's, and no other module spells the 12 leads out."""
    import enecg_hf
    from enecg_hf import configuration_enecg, preprocessing_enecg

    assert configuration_enecg.STANDARD_LEAD_NAMES is preprocessing_enecg.STANDARD_LEAD_NAMES
    spelled_out = '"I", "II", "III", "aVR"'
    package = Path(enecg_hf.__file__).parent
    defining = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if spelled_out in p.read_text())
    assert defining == ["preprocessing_enecg.py"]


def test_the_package_is_marked_typed():
    """setup.cfg ships `py.typed` (PEP 561) in package_data: the file must exist."""
    import configparser

    package = Path(__file__).resolve().parents[1] / "enecg_hf"
    setup = configparser.ConfigParser()
    setup.read(package.parent / "setup.cfg")
    assert "py.typed" in setup["options.package_data"]["enecg_hf"]
    assert (package / "py.typed").is_file()


def test_logit_temperature_divides_the_mixtures_logits_and_is_saved(tester, tmp_path):
    """Temperature scaling (fitted by training, `FitSettings.calibration`): the mixture's classification logits are
    divided by it, the heads' own are not; it is saved with the config; 1.0 leaves the logits untouched."""
    model = tester.get_model(**PROBLEMS["single_label"], adaptation="full").eval()
    with torch.no_grad():
        for parameter in task_of(model).heads.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    inputs = tester.get_inputs(seed=5)
    with torch.no_grad():
        plain = model(inputs)
        model.config.task_configs[0].logit_temperature = 2.0
        scaled = model(inputs)
    assert plain.logits.abs().max() > 0
    torch.testing.assert_close(scaled.logits, plain.logits / 2.0)
    assert torch.equal(scaled.expert_logits, plain.expert_logits)
    model.save_pretrained(tmp_path)
    reloaded = EnECGModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.task_configs[0].logit_temperature == 2.0
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, scaled.logits)
