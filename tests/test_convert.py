"""Converters: each test writes a small checkpoint in the upstream key layout and file format, converts it, loads the
result into the expert, and compares with a reference computed independently from the upstream tensors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import GPT2Config, GPT2Model

from enecg_hf.configuration_enecg import STANDARD_LEAD_NAMES, EnECGExpertConfig
from enecg_hf.tools.convert import CheckpointError, convert_ecgfm, convert_moment, convert_tempo, load_torch_checkpoint
from enecg_hf.expert_ecgfm import EnECGEcgFmExpert
from enecg_hf.expert_tempo import PROMPT_TOKEN_IDS, EnECGTempoExpert


LEADS = list(STANDARD_LEAD_NAMES)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


# ------------------------------------------------------------------------------------------------ TEMPO
TEMPO_SETTINGS = dict(EnECGTempoExpert.PRESETS["tiny"], gpt_layers=2)
LORA_R, LORA_ALPHA = 4, 8


def upstream_tempo_checkpoint(seed: int = 0, settings: dict = TEMPO_SETTINGS):
    """State dict in the layout of the released TEMPO-80M `.pth`: one PEFT-wrapped GPT-2 (`gpt2_trend`) with LoRA on
    c_attn, the projections, and the modules upstream builds but never uses. Returns (state, live peft model)."""
    from peft import LoraConfig, get_peft_model

    s = settings
    torch.manual_seed(seed)
    gpt2 = GPT2Model(GPT2Config(vocab_size=s["vocab_size"], n_positions=s["n_positions"], n_embd=s["d_model"],
                                n_layer=s["gpt_layers"], n_head=s["n_head"]))
    peft_model = get_peft_model(gpt2, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.1,
                                                 target_modules=["c_attn"], bias="lora_only"))
    randomize_(peft_model, seed)  # includes lora_B, which PEFT starts at zero
    num_patches = (s["seq_len"] - s["patch_size"]) // s["stride"] + 2
    generator = torch.Generator().manual_seed(seed + 1)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    L, d = s["seq_len"], s["d_model"]
    state = {f"gpt2_trend.{k}": v.clone() for k, v in peft_model.state_dict().items()}
    state.update({
        "map_trend.weight": rand(L, L), "map_trend.bias": rand(L),
        "map_season.0.weight": rand(4 * L, L), "map_season.0.bias": rand(4 * L),
        "map_season.2.weight": rand(L, 4 * L), "map_season.2.bias": rand(L),
        "map_resid.weight": rand(L, L), "map_resid.bias": rand(L),
        "mul_season.a": rand(2, 1), "mul_season.b": rand(2, 1),
    })
    for c in ("trend", "season", "noise"):
        state.update({
            f"in_layer_{c}.weight": rand(d, s["patch_size"]), f"in_layer_{c}.bias": rand(d),
            f"prompt_layer_{c}.weight": rand(d, d), f"prompt_layer_{c}.bias": rand(d),
            f"out_layer_{c}.weight": rand(s["pred_len"], d * num_patches), f"out_layer_{c}.bias": rand(s["pred_len"]),
            f"rev_in_{c}.affine_weight": 1 + rand(1), f"rev_in_{c}.affine_bias": rand(1),
        })
    return state, peft_model.eval()


def reference_tempo(state, peft_model, x, settings: dict = TEMPO_SETTINGS):
    """TEMPO's forward written from the upstream code path: RevIN, moving average by concatenating repeated ends,
    ReplicationPad1d patching, prompts from `wte`, ONE GPT-2 pass with the LoRA adapter live (not merged)."""
    s = settings
    B, L = x.shape
    x = x.unsqueeze(-1)
    mean = x.mean(1, keepdim=True)
    std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5)
    x = (x - mean) / std * state["rev_in_trend.affine_weight"] + state["rev_in_trend.affine_bias"]
    half = (s["moving_avg"] - 1) // 2
    padded = torch.cat([x[:, :1].repeat(1, half, 1), x, x[:, -1:].repeat(1, half, 1)], dim=1)
    moving = torch.nn.AvgPool1d(s["moving_avg"], stride=1)(padded.permute(0, 2, 1)).permute(0, 2, 1).squeeze(2)
    trend = F.linear(moving, state["map_trend.weight"], state["map_trend.bias"])
    season = x.squeeze(2) - trend
    season = F.linear(F.relu(F.linear(season, state["map_season.0.weight"], state["map_season.0.bias"])),
                      state["map_season.2.weight"], state["map_season.2.bias"])
    noise = x.squeeze(2) - trend - season
    wte = peft_model.base_model.model.wte
    tokens, P = [], None
    for name, part in (("trend", trend), ("season", season), ("noise", noise)):
        patches = torch.nn.ReplicationPad1d((0, s["stride"]))(part.unsqueeze(1)).unfold(-1, s["patch_size"], s["stride"])
        patches = patches.squeeze(1)
        P = patches.shape[1]
        emb = F.linear(patches, state[f"in_layer_{name}.weight"], state[f"in_layer_{name}.bias"])
        prompt = F.linear(wte(torch.tensor(PROMPT_TOKEN_IDS[name])), state[f"prompt_layer_{name}.weight"],
                          state[f"prompt_layer_{name}.bias"]).repeat(B, 1, 1)
        tokens.append(torch.cat([prompt, emb], dim=1))
    hidden = peft_model(inputs_embeds=torch.cat(tokens, dim=1)).last_hidden_state
    T = len(PROMPT_TOKEN_IDS["trend"])
    parts = [hidden[:, i * (T + P) + T : (i + 1) * (T + P)] for i in range(3)]
    out = sum(F.linear(p.reshape(B, -1), state[f"out_layer_{n}.weight"], state[f"out_layer_{n}.bias"])
              for p, n in zip(parts, ("trend", "season", "noise")))
    w, b = state["rev_in_trend.affine_weight"], state["rev_in_trend.affine_bias"]
    forecast = ((out.unsqueeze(-1) - b) / (w + 1e-10) * std + mean).squeeze(-1)
    embedding = torch.stack(parts, dim=1).mean(dim=(1, 2))
    return forecast, embedding


def test_tempo_converter_merges_lora_and_matches_reference(tmp_path):
    state, peft_model = upstream_tempo_checkpoint()
    torch.save(state, tmp_path / "TEMPO-tiny.pth")
    report = convert_tempo(str(tmp_path / "TEMPO-tiny.pth"), str(tmp_path / "out"), preset="tiny", lora_alpha=LORA_ALPHA)
    assert len(report.merged_lora) == TEMPO_SETTINGS["gpt_layers"]
    assert set(report.dropped) == {"map_resid.weight", "map_resid.bias", "mul_season.a", "mul_season.b",
                                   "rev_in_season.affine_weight", "rev_in_season.affine_bias",
                                   "rev_in_noise.affine_weight", "rev_in_noise.affine_bias"}
    assert any("gpt_layers 2" in note for note in report.notes)  # inferred from the keys, differs from the preset
    assert report.settings["gpt_layers"] == 2 and report.settings["shared_backbone"] is True

    config = EnECGExpertConfig("tempo", "tempo", 64, ["II", "V5"], settings={"preset": "tiny", "gpt_layers": 2})
    expert = EnECGTempoExpert(config, LEADS).eval()
    expert.load_pretrained(str(tmp_path / "out"))

    # Merged c_attn = base + (B @ A)^T * alpha / r, computed here from the upstream tensors.
    prefix = "gpt2_trend.base_model.model.h.1.attn.c_attn"
    a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
    expected = state[f"{prefix}.base_layer.weight"] + (b @ a).T * (LORA_ALPHA / LORA_R)
    torch.testing.assert_close(expert.gpt2_trend.h[1].attn.c_attn.weight, expected, atol=1e-6, rtol=1e-5)

    x = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        forecast_ref, embedding_ref = reference_tempo(state, peft_model, x.reshape(6, 64))
        torch.testing.assert_close(expert.forecast(x), forecast_ref.reshape(3, 2, -1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(expert.embed(x), embedding_ref.reshape(3, 2, -1).mean(1), atol=1e-5, rtol=1e-4)


def test_tempo_preset_mismatch_is_reported_on_load(tmp_path):
    state, _ = upstream_tempo_checkpoint()
    torch.save(state, tmp_path / "t.pth")
    convert_tempo(str(tmp_path / "t.pth"), str(tmp_path / "out"), preset="tiny", lora_alpha=LORA_ALPHA)
    expert = EnECGTempoExpert(EnECGExpertConfig("tempo", "tempo", 64, ["II"], settings={"preset": "tiny"}), LEADS)
    with pytest.raises(ValueError, match="gpt_layers: checkpoint 2 vs config 1"):
        expert.load_pretrained(str(tmp_path / "out"))


def test_tempo_stride_is_never_guessed_among_several_that_fit(tmp_path, capsys):
    """seq_len 64, patch 16, stride 16: strides 13-16 all give the 5 patches out_layer_* takes. The converter once
    took the smallest (13: embeddings 82 % off); it now needs --stride, and checks it and --seq-len."""
    from enecg_hf.tools.convert import main

    settings = dict(TEMPO_SETTINGS, stride=16)
    state, peft_model = upstream_tempo_checkpoint(settings=settings)
    torch.save(state, tmp_path / "t.pth")
    source, out = str(tmp_path / "t.pth"), str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"strides \[13, 14, 15, 16\] all give the 5 patches.*pass --stride"):
        convert_tempo(source, out, preset="tiny", lora_alpha=LORA_ALPHA)
    with pytest.raises(CheckpointError, match="--stride 8 gives 8 patches"):
        convert_tempo(source, out, preset="tiny", lora_alpha=LORA_ALPHA, stride=8)
    with pytest.raises(CheckpointError, match="--seq-len 336, but map_trend is 64 x 64"):
        convert_tempo(source, out, preset="tiny", lora_alpha=LORA_ALPHA, stride=16, seq_len=336)
    arguments = ["tempo", source, out, "--preset", "tiny", "--lora-alpha", str(LORA_ALPHA)]
    assert main(arguments) == 1 and "pass --stride" in capsys.readouterr().err
    assert main([*arguments, "--stride", "16", "--seq-len", "64"]) == 0

    config = EnECGExpertConfig("tempo", "tempo", 64, ["II"], settings={"preset": "tiny", "gpt_layers": 2, "stride": 16})
    expert = EnECGTempoExpert(config, LEADS).eval()
    expert.load_pretrained(out)
    x = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        embedding = reference_tempo(state, peft_model, x.reshape(2, 64), settings)[1]
        torch.testing.assert_close(expert.embed(x), embedding, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("change", ["missing", "extra", "lonely_lora"])
def test_tempo_converter_names_bad_keys(tmp_path, change):
    state, _ = upstream_tempo_checkpoint()
    if change == "missing":
        del state["prompt_layer_season.bias"]
        expected = "prompt_layer_season.bias"
    elif change == "extra":
        state["prompt_key_dict.prompt_key_0"] = torch.zeros(16)
        expected = "prompt_key_dict.prompt_key_0"
    else:
        del state["gpt2_trend.base_model.model.h.0.attn.c_attn.lora_B.default.weight"]
        expected = "gpt2_trend.base_model.model.h.0.attn.c_attn.lora_A.default.weight"
    torch.save(state, tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match=expected.replace(".", r"\.")):
        convert_tempo(str(tmp_path / "t.pth"), str(tmp_path / "out"), preset="tiny", lora_alpha=LORA_ALPHA)
    assert not (tmp_path / "out").exists()


def test_tempo_converter_reads_data_parallel_keys_and_drops_old_causal_mask_buffers(tmp_path):
    """A state dict saved from `nn.DataParallel` (every key under `module.`) holding the causal-mask buffers older
    transformers kept in GPT-2's attention converts as the plain one, saying what it stripped and dropped."""
    state, _ = upstream_tempo_checkpoint()
    torch.save(state, tmp_path / "plain.pth")
    plain = convert_tempo(str(tmp_path / "plain.pth"), str(tmp_path / "plain"), preset="tiny", lora_alpha=LORA_ALPHA)
    assert plain.notes[0].startswith(f"LoRA scaling alpha/r = {LORA_ALPHA}/r (alpha is not stored")
    buffers = {f"gpt2_trend.base_model.model.h.{i}.attn.{name}": torch.ones(1, 1, 4, 4)
               for i in range(2) for name in ("bias", "masked_bias")}
    torch.save({f"module.{k}": v for k, v in {**state, **buffers}.items()}, tmp_path / "parallel.pth")
    report = convert_tempo(str(tmp_path / "parallel.pth"), str(tmp_path / "parallel"), preset="tiny",
                           lora_alpha=LORA_ALPHA, n_head=4)
    assert report.notes[0] == "stripped the DataParallel prefix 'module.'"
    assert report.converted == plain.converted and report.merged_lora == plain.merged_lora
    assert {k: report.dropped[k] for k in buffers} == {
        k: "GPT-2 causal-mask buffer of older transformers, rebuilt at run time" for k in buffers}
    assert report.settings == {**plain.settings, "n_head": 4} and "n_head 4 (preset 2)" in report.notes[-1]


def test_tempo_converter_refuses_what_is_not_tempo_or_a_lora_that_does_not_fit(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth is not a TEMPO state dict: cannot find .*encoder\.weight"):
        convert_tempo(str(tmp_path / "other.pth"), str(tmp_path / "out"), preset="tiny")
    state, _ = upstream_tempo_checkpoint()
    key_a = "gpt2_trend.base_model.model.h.0.attn.c_attn.lora_A.default.weight"
    state[key_a] = torch.zeros(LORA_R, TEMPO_SETTINGS["d_model"] + 1)
    torch.save(state, tmp_path / "bad_lora.pth")
    with pytest.raises(CheckpointError, match=r"LoRA .*lora_A\.default\.weight / .*lora_B\.default\.weight: "
                                              r"delta \(48, 17\) does not fit \(16, 48\)"):
        convert_tempo(str(tmp_path / "bad_lora.pth"), str(tmp_path / "out"), preset="tiny", lora_alpha=LORA_ALPHA)
    state, _ = upstream_tempo_checkpoint()
    del state["gpt2_trend.base_model.model.h.1.attn.c_attn.base_layer.weight"]  # a LoRA pair without its base weight
    torch.save(state, tmp_path / "no_base.pth")
    with pytest.raises(CheckpointError, match=r"h\.1\.attn\.c_attn\.lora_A\.default\.weight"):
        convert_tempo(str(tmp_path / "no_base.pth"), str(tmp_path / "out"), preset="tiny", lora_alpha=LORA_ALPHA)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ ECG-FM
ECGFM = {"conv": [(16, 2, 2)] * 4, "dim": 32, "layers": 2, "heads": 2, "ffn": 64, "pos": 16, "groups": 4, "labels": 26}


def upstream_ecgfm_checkpoint(pos_style: str, seed: int = 0, prefix: str = "encoder.", e: dict = ECGFM) -> dict:
    """A fairseq-signals `ecg_transformer_classifier` checkpoint dict with random weights. Like upstream, it has a
    `post_extract_proj` only when the last conv width differs from the hidden width."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    d, first, width = e["dim"], e["conv"][0][0], e["conv"][-1][0]
    model = {}
    in_d = 12
    for i, (out, k, _) in enumerate(e["conv"]):
        model[f"{prefix}feature_extractor.conv_layers.{i}.0.weight"] = rand(out, in_d, k, scale=0.5)
        in_d = out
    model[f"{prefix}feature_extractor.conv_layers.0.2.weight"] = 1 + rand(first)
    model[f"{prefix}feature_extractor.conv_layers.0.2.bias"] = rand(first)
    model[f"{prefix}layer_norm.weight"], model[f"{prefix}layer_norm.bias"] = 1 + rand(width), rand(width)
    if width != d:
        model[f"{prefix}post_extract_proj.weight"], model[f"{prefix}post_extract_proj.bias"] = rand(d, width), rand(d)
    g_, v_ = 1 + rand(1, 1, e["pos"]).abs(), rand(d, d // e["groups"], e["pos"])
    pos = f"{prefix}conv_pos.pos_conv.0."
    if pos_style == "weight_g":
        model[pos + "weight_g"], model[pos + "weight_v"] = g_, v_
    else:
        model[pos + "parametrizations.weight.original0"], model[pos + "parametrizations.weight.original1"] = g_, v_
    model[pos + "bias"] = rand(d)
    for n in range(e["layers"]):
        p = f"{prefix}encoder.layers.{n}."
        for proj in ("q", "k", "v", "out"):
            model[f"{p}self_attn.{proj}_proj.weight"], model[f"{p}self_attn.{proj}_proj.bias"] = rand(d, d), rand(d)
        model[p + "self_attn_layer_norm.weight"], model[p + "self_attn_layer_norm.bias"] = 1 + rand(d), rand(d)
        model[p + "fc1.weight"], model[p + "fc1.bias"] = rand(e["ffn"], d), rand(e["ffn"])
        model[p + "fc2.weight"], model[p + "fc2.bias"] = rand(d, e["ffn"]), rand(d)
        model[p + "final_layer_norm.weight"], model[p + "final_layer_norm.bias"] = 1 + rand(d), rand(d)
    model[f"{prefix}encoder.layer_norm.weight"], model[f"{prefix}encoder.layer_norm.bias"] = 1 + rand(d), rand(d)
    if prefix:
        model["proj.weight"], model["proj.bias"] = rand(e["labels"], d), rand(e["labels"])
    else:  # a pretraining checkpoint: wav2vec 2.0 heads that embedding does not use
        model["mask_emb"], model["final_proj.weight"], model["final_proj.bias"] = rand(d), rand(8, d), rand(8)
    layers = " + ".join(f"[{tuple(layer)}]" for layer in e["conv"])
    cfg = {"model": {"_name": "ecg_transformer_classifier", "conv_feature_layers": layers, "in_d": 12,
                     "encoder_embed_dim": d, "encoder_layers": e["layers"], "encoder_attention_heads": e["heads"],
                     "encoder_ffn_embed_dim": e["ffn"], "conv_pos": e["pos"], "conv_pos_groups": e["groups"],
                     "layer_norm_first": False, "extractor_mode": "default", "num_labels": e["labels"]},
           "task": {"_name": "ecg_classification"}}
    return {
        "model": model, "cfg": cfg, "args": None,
        "optimizer_history": [{"criterion_name": "BinaryCrossEntropyCriterion", "optimizer_name": "Adam",
                               "lr_scheduler_state": {"best": 0.31}, "num_updates": 1200}],
        # fairseq's meters keep numpy scalars: the loader's allow-list is exercised here.
        "extra_state": {"epoch": 3, "best_loss": np.float64(0.31), "previous_training_time": 12.5},
        "last_optimizer_state": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4}]},
    }


def reference_ecgfm(model: dict, x: torch.Tensor, prefix: str = "encoder.", e: dict = ECGFM) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq-signals' ECG transformer written with plain torch ops on the upstream tensors (no transformers)."""
    p = prefix
    x = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, unbiased=False) + 1e-6)
    for i, (_, _, stride) in enumerate(e["conv"]):
        x = F.conv1d(x, model[f"{p}feature_extractor.conv_layers.{i}.0.weight"], stride=stride)
        if i == 0:
            x = F.group_norm(x, x.shape[1], model[f"{p}feature_extractor.conv_layers.0.2.weight"],
                             model[f"{p}feature_extractor.conv_layers.0.2.bias"])
        x = F.gelu(x)
    x = F.layer_norm(x.transpose(1, 2), (x.shape[1],), model[f"{p}layer_norm.weight"], model[f"{p}layer_norm.bias"])
    if f"{p}post_extract_proj.weight" in model:  # upstream: None when the conv width is the hidden width
        x = F.linear(x, model[f"{p}post_extract_proj.weight"], model[f"{p}post_extract_proj.bias"])
    pos = f"{p}conv_pos.pos_conv.0."
    g_ = model.get(pos + "weight_g", model.get(pos + "parametrizations.weight.original0"))
    v_ = model.get(pos + "weight_v", model.get(pos + "parametrizations.weight.original1"))
    weight = g_ * v_ / v_.norm(dim=(0, 1), keepdim=True)  # weight norm over dim 2
    conv = F.conv1d(x.transpose(1, 2), weight, model[pos + "bias"], padding=e["pos"] // 2, groups=e["groups"])
    if e["pos"] % 2 == 0:
        conv = conv[:, :, :-1]
    x = x + F.gelu(conv).transpose(1, 2)
    d, heads = e["dim"], e["heads"]
    x = F.layer_norm(x, (d,), model[f"{p}encoder.layer_norm.weight"], model[f"{p}encoder.layer_norm.bias"])
    for n in range(e["layers"]):
        q_ = f"{p}encoder.layers.{n}."

        def lin(name, h):
            return F.linear(h, model[q_ + name + ".weight"], model[q_ + name + ".bias"])

        B, T, _ = x.shape
        q, k, v = (lin(f"self_attn.{w}_proj", x).reshape(B, T, heads, -1).transpose(1, 2) for w in "qkv")
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        x = x + lin("self_attn.out_proj", attn.transpose(1, 2).reshape(B, T, d))
        x = F.layer_norm(x, (d,), model[q_ + "self_attn_layer_norm.weight"], model[q_ + "self_attn_layer_norm.bias"])
        x = x + lin("fc2", F.gelu(lin("fc1", x)))
        x = F.layer_norm(x, (d,), model[q_ + "final_layer_norm.weight"], model[q_ + "final_layer_norm.bias"])
    pooled = x.mean(dim=1)
    logits = F.linear(pooled, model["proj.weight"], model["proj.bias"]) if "proj.weight" in model else None
    return pooled, logits


@pytest.mark.parametrize("pos_style", ["weight_g", "parametrizations"])
def test_ecgfm_converter_matches_reference(tmp_path, pos_style):
    checkpoint = upstream_ecgfm_checkpoint(pos_style)
    torch.save(checkpoint, tmp_path / "ecg_fm.pt")
    report = convert_ecgfm(str(tmp_path / "ecg_fm.pt"), str(tmp_path / "out"), preset="tiny")
    assert len(report.converted) == len(checkpoint["model"])
    assert {"<cfg>", "<optimizer_history>", "<extra_state>", "<last_optimizer_state>"} <= set(report.dropped)
    assert report.settings["num_labels"] == 26 and report.settings["num_heads"] == 2

    config = EnECGExpertConfig("ecgfm", "ecgfm", 800, LEADS, settings={"preset": "tiny"})
    expert = EnECGEcgFmExpert(config, LEADS).eval()
    expert.load_pretrained(str(tmp_path / "out"))
    x = torch.randn(2, 12, 800, generator=torch.Generator().manual_seed(2)) * 3 + 1
    with torch.no_grad():
        pooled, logits = reference_ecgfm(checkpoint["model"], x)
        torch.testing.assert_close(expert.embed(x), pooled, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(expert.classify(x), logits, atol=1e-4, rtol=1e-4)


def test_ecgfm_pretraining_checkpoint_drops_pretraining_heads(tmp_path):
    checkpoint = upstream_ecgfm_checkpoint("parametrizations", prefix="")
    torch.save(checkpoint, tmp_path / "pre.pt")
    report = convert_ecgfm(str(tmp_path / "pre.pt"), str(tmp_path / "out"), preset="tiny")
    assert {"mask_emb", "final_proj.weight", "final_proj.bias"} <= set(report.dropped)
    assert report.settings["num_labels"] == 0
    config = EnECGExpertConfig("ecgfm", "ecgfm", 800, LEADS, settings={"preset": "tiny", "num_labels": 0})
    expert = EnECGEcgFmExpert(config, LEADS).eval()
    expert.load_pretrained(str(tmp_path / "out"))
    x = torch.randn(1, 12, 800, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(expert.embed(x), reference_ecgfm(checkpoint["model"], x, prefix="")[0],
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_ecgfm_converter_names_bad_keys(tmp_path, change):
    checkpoint = upstream_ecgfm_checkpoint("weight_g")
    if change == "missing":
        del checkpoint["model"]["encoder.encoder.layers.1.fc2.bias"]
        expected = "wav2vec2.encoder.layers.1.feed_forward.output_dense.bias"
    else:
        checkpoint["model"]["encoder.encoder.layers.0.adapter.weight"] = torch.zeros(3)
        expected = "encoder.encoder.layers.0.adapter.weight"
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=expected.replace(".", r"\.")):
        convert_ecgfm(str(tmp_path / "bad.pt"), str(tmp_path / "out"), preset="tiny")


def _converted_expert(folder: Path, settings: dict) -> EnECGEcgFmExpert:
    config = EnECGExpertConfig("ecgfm", "ecgfm", 800, LEADS, settings={"preset": "tiny", **settings})
    expert = EnECGEcgFmExpert(config, LEADS).eval()
    expert.load_pretrained(str(folder))
    return expert


def test_ecgfm_checkpoint_with_its_config_in_an_args_namespace(tmp_path):
    """Older fairseq checkpoints carry `cfg: None` and their settings as an argparse.Namespace in `args`, read with a
    weights-only load. Here it says 4 attention heads where the preset has 2 (the heads are not in the weights)."""
    import argparse

    settings = {**ECGFM, "heads": 4}
    checkpoint = upstream_ecgfm_checkpoint("weight_g", e=settings)
    checkpoint["args"] = argparse.Namespace(**checkpoint.pop("cfg")["model"], optimizer="adam", lr=[1e-4])
    checkpoint["cfg"] = None
    torch.save(checkpoint, tmp_path / "legacy.pt")
    report = convert_ecgfm(str(tmp_path / "legacy.pt"), str(tmp_path / "out"), preset="tiny")
    assert report.settings["num_heads"] == 4 and any("`args` namespace" in note for note in report.notes)
    expert = _converted_expert(tmp_path / "out", {"num_heads": 4})
    x = torch.randn(2, 12, 800, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(expert.embed(x), reference_ecgfm(checkpoint["model"], x, e=settings)[0],
                                   atol=1e-4, rtol=1e-4)
    # What the namespace says is checked like a cfg: a pre-LN encoder is refused.
    checkpoint["args"].layer_norm_first = True
    torch.save(checkpoint, tmp_path / "pre_ln.pt")
    with pytest.raises(CheckpointError, match="layer_norm_first=True"):
        convert_ecgfm(str(tmp_path / "pre_ln.pt"), str(tmp_path / "out2"), preset="tiny")


def test_ecgfm_encoder_without_post_extract_proj(tmp_path):
    """Conv width 32 = hidden width 32: upstream has no post_extract_proj and feeds the features on unprojected."""
    settings = {**ECGFM, "conv": [(32, 2, 2)] * 4}
    checkpoint = upstream_ecgfm_checkpoint("parametrizations", e=settings)
    assert not any("post_extract_proj" in key for key in checkpoint["model"])
    torch.save(checkpoint, tmp_path / "no_proj.pt")
    report = convert_ecgfm(str(tmp_path / "no_proj.pt"), str(tmp_path / "out"), preset="tiny")
    assert len(report.converted) == len(checkpoint["model"]) and any("identity" in note for note in report.notes)
    expert = _converted_expert(tmp_path / "out", {"conv_layers": [[32, 2, 2]] * 4})
    x = torch.randn(2, 12, 800, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pooled, logits = reference_ecgfm(checkpoint["model"], x, e=settings)
        torch.testing.assert_close(expert.embed(x), pooled, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(expert.classify(x), logits, atol=1e-4, rtol=1e-4)


def test_ecgfm_checkpoint_with_quantized_inputs_is_refused_with_the_reason(tmp_path):
    """With quantize_input=True upstream embeds through input_quantizer and project_inp (they are not pretraining-only
    modules: `remove_pretraining_modules` keeps them). This expert has no input quantizer: refused, saying why."""
    checkpoint = upstream_ecgfm_checkpoint("parametrizations", prefix="")
    generator = torch.Generator().manual_seed(8)
    checkpoint["model"].update({
        "input_quantizer.vars": torch.randn(1, 2 * 8, 16, generator=generator),
        "input_quantizer.weight_proj.weight": torch.randn(2 * 8, 16, generator=generator),
        "input_quantizer.weight_proj.bias": torch.randn(2 * 8, generator=generator),
        "project_inp.weight": torch.randn(32, 32, generator=generator), "project_inp.bias": torch.zeros(32)})
    checkpoint["cfg"]["model"]["quantize_input"] = True
    torch.save(checkpoint, tmp_path / "quantized.pt")
    with pytest.raises(CheckpointError, match=r"quantize_input=True.*input_quantizer.*input_quantizer\.vars"):
        convert_ecgfm(str(tmp_path / "quantized.pt"), str(tmp_path / "out"), preset="tiny")
    assert not (tmp_path / "out").exists()


def test_ecgfm_settings_missing_from_the_cfg_come_from_the_preset_saying_so(tmp_path):
    """Without `conv_feature_layers` and `encoder_attention_heads` in the cfg, the strides and the head count are the
    preset's; without `preset`, a checkpoint with a classifier is checked against "ecg-fm"."""
    checkpoint = upstream_ecgfm_checkpoint("parametrizations")
    for key in ("conv_feature_layers", "encoder_attention_heads"):
        del checkpoint["cfg"]["model"][key]
    torch.save(checkpoint, tmp_path / "sparse_cfg.pt")
    report = convert_ecgfm(str(tmp_path / "sparse_cfg.pt"), str(tmp_path / "out"), preset="tiny")
    assert report.notes == ["conv strides not in cfg; taken from the preset: [2, 2, 2, 2]",
                            "encoder_attention_heads not in cfg; 2 from the preset"]
    assert report.settings["conv_layers"] == [[16, 2, 2]] * 4 and report.settings["num_heads"] == 2
    torch.save(upstream_ecgfm_checkpoint("parametrizations"), tmp_path / "ecg_fm.pt")
    report = convert_ecgfm(str(tmp_path / "ecg_fm.pt"), str(tmp_path / "default"))
    assert report.notes == ["checkpoint differs from the preset: conv_layers [[16, 2, 2], [16, 2, 2], [16, 2, 2], "
                            "[16, 2, 2]] (preset [[256, 2, 2], [256, 2, 2], [256, 2, 2], [256, 2, 2]]), conv_pos 16 "
                            "(preset 128), conv_pos_groups 4 (preset 16), hidden_size 32 (preset 768), "
                            "intermediate_size 64 (preset 3072), num_heads 2 (preset 12), num_layers 2 (preset 12)"]
    assert report.settings == {**EnECGEcgFmExpert.PRESETS["tiny"], "conv_layers": [[16, 2, 2]] * 4}


@pytest.mark.parametrize("change, expected", [
    ("not_fairseq", "is not a fairseq checkpoint: expected a dict with a 'model' entry"),
    ("extractor_mode", "extractor_mode 'layer_norm' is not supported"),
    ("in_d", "cfg in_d 8 but the first conv reads 12"),
    ("two_layouts", "encoder.conv_pos.pos_conv.0.parametrizations.weight.original0 and encoder.conv_pos.pos_conv.0."
                    "weight_g both give wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    ("no_encoder_norm", "does not look like an ECG-FM checkpoint: cannot find 'wav2vec2.encoder.layer_norm.weight'"),
])
def test_ecgfm_converter_refuses_checkpoints_it_cannot_convert_faithfully(tmp_path, change, expected):
    checkpoint = upstream_ecgfm_checkpoint("parametrizations")
    model_cfg = checkpoint["cfg"]["model"]
    if change == "not_fairseq":
        checkpoint = checkpoint["model"]
    elif change == "extractor_mode":
        model_cfg["extractor_mode"] = "layer_norm"
    elif change == "in_d":
        model_cfg["in_d"] = 8
    elif change == "two_layouts":  # the old weight-norm key beside the new one
        checkpoint["model"] = {"encoder.conv_pos.pos_conv.0.weight_g": torch.ones(1, 1, 16), **checkpoint["model"]}
    else:
        del checkpoint["model"]["encoder.encoder.layer_norm.weight"]
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        convert_ecgfm(str(tmp_path / "bad.pt"), str(tmp_path / "out"), preset="tiny")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ unsafe pickles
class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("converter", ["tempo", "ecgfm"])
def test_pickle_that_runs_code_is_refused(tmp_path, converter):
    marker = tmp_path / "pwned"
    payload = {"model": {"w": torch.zeros(1)}, "cfg": _Exploit(str(marker))}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"Refusing to load .*system"):
        {"tempo": convert_tempo, "ecgfm": convert_ecgfm}[converter](str(tmp_path / "evil.pt"), str(tmp_path / "out"))
    assert not marker.exists()
    # A plain (non-torch) pickle is refused too.
    import pickle

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError, match="Refusing to load"):
        load_torch_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ MOMENT
@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_moment_converter_old_config_round_trip(tmp_path, weights_format):
    pytest.importorskip("momentfm")
    from safetensors.torch import save_file

    from enecg_hf.expert_moment import EnECGMomentExpert

    config = EnECGExpertConfig("moment", "moment", 64, ["II", "V1"], settings={"preset": "tiny"})
    torch.manual_seed(0)
    original = EnECGMomentExpert(config, LEADS).eval()
    randomize_(original, 4)
    folder = tmp_path / "MOMENT-1-tiny"
    folder.mkdir()
    state = {k: v.clone().contiguous() for k, v in original.backbone.state_dict().items()}
    state["head.linear.weight"] = torch.zeros(8, 32)  # the pretraining reconstruction head
    if weights_format == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    # An old MOMENT-1-large style config.json: no t5_config.
    (folder / "config.json").write_text(json.dumps({"task_name": "reconstruction", "d_model": 32, "seq_len": 512,
                                                    "patch_len": 8, "transformer_type": "encoder_only"}))
    report = convert_moment(str(folder), str(tmp_path / "out"), preset="tiny")
    assert report.dropped == {"head.linear.weight": "pretraining reconstruction head, not part of the embedding model"}
    assert any("no t5_config" in note for note in report.notes)

    loaded = EnECGMomentExpert(config, LEADS).eval()
    loaded.load_pretrained(str(tmp_path / "out"))
    x = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), original.embed(x))


@pytest.mark.slow
def test_convert_command_line(tmp_path, capsys):
    from enecg_hf.tools.convert import main

    state, _ = upstream_tempo_checkpoint()
    torch.save(state, tmp_path / "t.pth")
    command = [sys.executable, "-m", "enecg_hf.tools.convert", "tempo", str(tmp_path / "t.pth"), str(tmp_path / "out"),
               "--preset", "tiny", "--lora-alpha", str(LORA_ALPHA)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "merged LoRA pairs: 2" in result.stdout and "dropped: 8" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "expert_config.json").is_file()

    del state["map_trend.bias"]
    torch.save(state, tmp_path / "t.pth")
    assert main(command[3:]) == 1
    assert "map_trend.bias" in capsys.readouterr().err
