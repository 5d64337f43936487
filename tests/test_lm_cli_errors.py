"""revdeq-train's user errors: each is one line on stderr and exit status 2, found before
any work it would waste (data preparation, training steps); and a run with nothing to
train says so instead of naming a checkpoint it never wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revdeq_kernels.lm.cli import train_main
from tests.test_lm_helpers import single_thread, small_config  # noqa: F401  (single_thread: autouse fixture)


def _config_file(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(small_config(tmp_path, **overrides).to_dict()), encoding="utf-8")  # JSON is YAML
    return path


def _one_line_error(capsys, argv: list[str]) -> str:
    assert train_main(argv) == 2, f"revdeq-train {' '.join(argv)} did not exit with status 2"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), f"expected one error line, got {err}"
    return err[0]


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1.0e-3\nbatch_size: [1, 2\nseed: 3\n", encoding="utf-8")
    line = _one_line_error(capsys, ["--config", str(bad)])
    assert f"{bad}:3:5: not valid YAML" in line, line
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"lr: \xff\xfe\n")
    assert f"{binary} is not UTF-8 text" in _one_line_error(capsys, ["--config", str(binary)])
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert f"config file {folder} is a directory" in _one_line_error(capsys, ["--config", str(folder)])


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    """revdeq-train --config tiny out_dir=tiny, run twice in one folder: the second run found the
    first one's tiny/ and refused it as a config file that is a directory."""
    from revdeq_kernels.lm.config import read_yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    values, source = read_yaml("tiny")
    assert values["method"] == "reversible" and source.endswith("tiny.yaml"), source
    (tmp_path / "mine").write_text("lr: 1.0e-3\n", encoding="utf-8")
    assert read_yaml("mine")[0] == {"lr": 1.0e-3}, "a file without a .yaml suffix is still read as a config"


def test_an_unusable_out_dir_is_refused_before_the_data_is_prepared(tmp_path, capsys):
    config = _config_file(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = _one_line_error(capsys, ["--config", str(config), f"out_dir={blocker / 'run'}"])
    assert f"out_dir={str(blocker / 'run')!r}: {blocker} is a file" in line, line
    line = _one_line_error(capsys, ["--config", str(config), f"out_dir={blocker}"])
    assert f"{blocker} exists and is not a directory" in line, line
    assert not (tmp_path / "cache").exists(), "the data was prepared before out_dir was checked"


def test_splits_too_short_are_all_reported_before_training(tmp_path, capsys):
    config = _config_file(tmp_path, seq_len=2000, batch_size=1)
    line = _one_line_error(capsys, ["--config", str(config)])
    assert "splits too short for windows of seq_len+1 = 2001 tokens" in line, line
    assert "validation has" in line and "test has" in line and "fewer than one window" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists(), "training started before the splits were checked"


def test_a_binary_data_file_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.txt").write_text("some text\n" * 50)
    binary = data / "program.bin"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    config = _config_file(tmp_path)
    line = _one_line_error(capsys, ["--config", str(config), f"data_files={data / 'ok.txt'},{binary}"])
    assert f"data file {binary} is not text: it holds a NUL byte at offset 7" in line, line
    latin = data / "latin1.txt"
    latin.write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 100)
    line = _one_line_error(capsys, ["--config", str(config), f"data_files={latin}"])
    assert f"data file {latin} is not UTF-8 text: 200 of" in line, line


def test_a_few_stray_bytes_in_real_text_are_kept(tmp_path):
    from revdeq_kernels.lm.sources import read_text_file

    path = tmp_path / "mostly.txt"
    path.write_bytes(b"plain text line\n" * 200 + b"one stray \xff byte\n")
    assert read_text_file(path).count("\ufffd") == 1


def test_max_iters_0_says_nothing_was_trained(tmp_path, capsys):
    config = _config_file(tmp_path)
    assert train_main(["--config", str(config), "max_iters=0"]) == 0
    out = capsys.readouterr().out
    assert "nothing was trained (step 0 >= max_iters=0): no checkpoint was written" in out, out
    assert "checkpoint" not in out.split("nothing was trained")[0].splitlines()[-1]
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("bad", ["max_iters=-1", "lr=fast", "seq_len=0"])
def test_config_value_errors_stay_one_line(tmp_path, capsys, bad):
    config = _config_file(tmp_path)
    line = _one_line_error(capsys, ["--config", str(config), bad])
    assert bad.split("=")[0] in line, line
