"""Language-model configuration: presets, overrides, and every kind of config error."""

from __future__ import annotations

import json

import pytest

from revdeq_kernels.lm import ConfigError, load_config, parse_overrides, preset_names, valid_keys
from revdeq_kernels.lm.cli import train_main


def test_presets_load_and_wt103_is_the_paper_setting():
    assert {"tiny", "small", "wt103"} <= set(preset_names())
    for name in preset_names():
        load_config(name)
    cfg = load_config("wt103")
    paper = dict(seq_len=448, d_model=768, n_heads=12, beta=0.5, max_steps=4, tol=1e-3, lr=3e-4,
                 batch_size=32, vocab_size=50304, dataset="wikitext-103", tokenizer="gpt2")
    got = {k: getattr(cfg, k) for k in paper}
    assert got == paper, f"wt103 differs from the paper's setting: {got} vs {paper}"


def test_overrides_are_typed():
    cfg = load_config("tiny", ["lr=3e-4", "method=explicit", "n_layers=2", "state_dtype=null",
                               "data_files=a.txt,b.txt", "amp=off", "progress=no", "backend=torch"])
    assert (cfg.lr, cfg.method, cfg.n_layers, cfg.state_dtype) == (3e-4, "explicit", 2, None)
    assert (cfg.data_files, cfg.amp, cfg.progress, cfg.backend) == (["a.txt", "b.txt"], "off", False, "torch")
    assert parse_overrides(["max-steps=6"]) == {"max_steps": 6}


def test_unknown_key_lists_every_valid_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["learning_rate=1e-3"])
    message = str(info.value)
    assert "'learning_rate'" in message and all(key in message for key in valid_keys()), message
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("d_model: 64\nn_head: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'n_head' in .*mine.yaml \(did you mean 'n_heads'\?\)"):
        load_config(str(yaml_file))


@pytest.mark.parametrize("override,match", [
    ("n_heads=x", "n_heads .*expected an integer"),
    ("max_iters=1.5", "max_iters .*expected an integer"),
    ("progress=maybe", "progress .*expected true or false"),
    ("beta=1", r"beta=1.0: must be in \(0, 2\) and != 1"),
    ("depth_reg=-1", r"depth_reg=-1.0: must be >= 0 \(0: off\)"),
    ("d_model=30", "d_model=30: must be divisible by n_heads=4"),
    ("state_dtype=float16", "state_dtype='float16': must be one of"),
    ("method=anderson", "method='anderson': must be one of reversible, unrolled, implicit, phantom, broyden, explicit"),
    ("dataset=files", "dataset=files needs data_files"),
    ("min_lr=1", r"min_lr=1.0: must be in \[0, lr="),
    ("vocab_size=0", "vocab_size=0: must be >= 1"),
    ("seed", "is not key=value"),
    ("rng=global", r"rng='global': must be one of per_solve, per_evaluation \(both replay"),
    ("penalty_masks=same", "penalty_masks='same': must be one of fresh, solve"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


def test_penalty_masks_solve_needs_one_mask_per_solve():
    with pytest.raises(ConfigError, match="penalty_masks='solve': 'solve' replays the solve's one set of masks, "
                                          "and rng=per_evaluation draws a new one per evaluation"):
        load_config("tiny", ["rng=per_evaluation", "penalty_masks=solve"])
    assert load_config("tiny", ["rng=per_evaluation"]).penalty_masks == "fresh"


def test_missing_preset_and_file():
    with pytest.raises(ConfigError, match="no config preset 'huge'; presets: small, tiny, wt103"):
        load_config("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/cfg.yaml")


def test_cli_reports_config_errors_and_prints_the_config(capsys):
    assert train_main(["--config", "tiny", "bogus=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err
    assert train_main(["--config", "tiny", "--print-config", "seq_len=64"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 64


@pytest.mark.parametrize("amp, device, capability, expected", [
    ("auto", "cpu", None, None),
    ("auto", "cuda", (9, 0), "bfloat16"),   # H100 / H200: native bf16
    ("auto", "cuda", (8, 0), "bfloat16"),   # A100
    ("auto", "cuda", (7, 5), "float16"),    # T4: no native bf16, fp16 with loss scaling
    ("auto", "cuda", (7, 0), "float16"),    # V100
    ("bf16", "cpu", None, "bfloat16"),
    ("fp16", "cpu", None, "float16"),
    ("off", "cuda", (9, 0), None),
])
def test_amp_picks_the_autocast_dtype_by_device(monkeypatch, amp, device, capability, expected):
    import torch

    from revdeq_kernels.lm.runtime import amp_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    got = amp_dtype(load_config("tiny", [f"amp={amp}"]), torch.device(device))
    assert got == (None if expected is None else getattr(torch, expected)), f"amp={amp} on {device} {capability}: {got}"
