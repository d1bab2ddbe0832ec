"""Tests for pq_lightning.data and pq_lightning.builtin_corpus."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch

from pq_lightning import builtin_corpus
from pq_lightning.data import (
    CalibrationData,
    EvalData,
    eval_windows,
    join_texts,
    load_texts,
    make_windows,
    parse_hf_source,
    tokenize_text,
    windows_fingerprint,
)

# ------------------------------------------------------------------------------------------------
# make_windows
# ------------------------------------------------------------------------------------------------


def test_make_windows_all_chunks_in_order_match_a_plain_loop():
    ids = list(range(100, 203))  # 103 tokens: 25 chunks of 4, tail of 3 dropped
    got = make_windows(ids, seqlen=5, num_samples=None, bos_id=7, seed=0)
    expected = [[7, *ids[4 * j : 4 * j + 4]] for j in range(25)]
    assert got.dtype == torch.long
    assert got.tolist() == expected


def test_make_windows_without_bos_uses_seqlen_text_tokens():
    got = make_windows(torch.arange(10), seqlen=3, num_samples=None, bos_id=None, seed=0)
    assert got.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_make_windows_sampling_is_deterministic_disjoint_and_prefix_stable():
    ids = torch.arange(1000, 1000 + 40 * 9)  # 40 chunks of 9 text tokens
    a = make_windows(ids, seqlen=10, num_samples=12, bos_id=1, seed=3)
    assert a.shape == (12, 10)
    assert torch.equal(a, make_windows(ids, seqlen=10, num_samples=12, bos_id=1, seed=3))
    assert not torch.equal(a, make_windows(ids, seqlen=10, num_samples=12, bos_id=1, seed=4))
    assert (a[:, 0] == 1).all()
    # every window is one aligned chunk of the stream, and no chunk is used twice
    starts = []
    for row in a[:, 1:]:
        start = int(row[0]) - 1000
        assert start % 9 == 0
        assert row.tolist() == list(range(1000 + start, 1000 + start + 9))
        starts.append(start)
    assert len(set(starts)) == 12
    # drawing more windows keeps the first ones (holdout draws extend the calibration draw)
    more = make_windows(ids, seqlen=10, num_samples=15, bos_id=1, seed=3)
    assert torch.equal(more[:12], a)


def test_make_windows_too_little_text_says_found_and_needed():
    with pytest.raises(ValueError, match=r"found 10 tokens, need 12"):
        make_windows(list(range(10)), seqlen=5, num_samples=3, bos_id=0, seed=0)
    with pytest.raises(ValueError, match=r"found 3 tokens, need 4"):
        make_windows([1, 2, 3], seqlen=5, num_samples=None, bos_id=0, seed=0)
    with pytest.raises(ValueError, match="seqlen must be at least 2"):
        make_windows(list(range(10)), seqlen=1, num_samples=None, bos_id=None, seed=0)


# ------------------------------------------------------------------------------------------------
# eval_windows
# ------------------------------------------------------------------------------------------------

TEXT = "The quick brown fox jumps over the lazy dog. " * 30


def test_eval_windows_protocol(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    window = 7
    got = eval_windows(TEXT, tiny_tokenizer, window=window)
    n = len(ids) // window
    expected = [[tiny_tokenizer.bos_token_id, *ids[i * window : (i + 1) * window]] for i in range(n)]
    assert got.tolist() == expected
    assert got.shape == (n, 8)
    assert eval_windows(TEXT, tiny_tokenizer, window=window, max_windows=3).tolist() == expected[:3]
    assert tokenize_text(TEXT, tiny_tokenizer).tolist() == ids


def test_eval_windows_default_is_512_tokens(tiny_tokenizer):
    got = eval_windows(TEXT * 4, tiny_tokenizer)
    assert got.shape[1] == 512 and got.shape[0] >= 1
    assert (got[:, 0] == tiny_tokenizer.bos_token_id).all()


# ------------------------------------------------------------------------------------------------
# text sources
# ------------------------------------------------------------------------------------------------


def test_builtin_corpus_is_large_and_deterministic():
    docs = builtin_corpus.builtin_documents()
    text = builtin_corpus.builtin_text()
    assert len(text) >= 300_000
    assert text == "\n\n".join(docs)
    rebuilt = []  # recomputed without the cache
    for name in builtin_corpus.BUILTIN_MODULES:
        rebuilt.extend(builtin_corpus._module_documents(name))
    assert tuple(rebuilt) == docs
    assert list(builtin_corpus.BUILTIN_MODULES) == sorted(builtin_corpus.BUILTIN_MODULES)
    assert docs[0].startswith("argparse\n\n")
    assert load_texts("builtin") == list(docs)


def test_load_txt_and_jsonl(tmp_path, tiny_tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text(" first line\n\nsecond = line \n", encoding="utf-8")
    assert load_texts(str(txt)) == [" first line\n\nsecond = line \n"]
    jsonl = tmp_path / "b.jsonl"
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    rows = [{"text": "plain row"}, {}, {"messages": messages}]
    jsonl.write_text("\n".join(json.dumps(r) if r else "" for r in rows) + "\n", encoding="utf-8")
    got = load_texts(str(jsonl), tokenizer=tiny_tokenizer)
    assert got == ["plain row", "<s>user: hello</s>\n<s>assistant: hi there</s>\n"]
    assert got[1] == tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match="need a tokenizer"):
        load_texts(str(jsonl))
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.jsonl:1: expected a 'text' string"):
        load_texts(str(bad))
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_texts(str(tmp_path / "missing.txt"))


def test_join_texts():
    assert join_texts(["only one \n"]) == "only one \n"
    assert join_texts(["a", "  ", "b"]) == "a\n\nb"


def test_parse_hf_source():
    assert parse_hf_source("hf:wikitext/wikitext-2-raw-v1:validation") == (
        "wikitext/wikitext-2-raw-v1",
        None,
        "validation",
    )
    assert parse_hf_source("hf:Salesforce/wikitext:wikitext-2-raw-v1:test") == (
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "test",
    )
    assert parse_hf_source("hf:c4") == ("c4", None, "train")
    assert parse_hf_source("hf:c4:validation", split="train") == ("c4", None, "train")
    with pytest.raises(ValueError, match="hf:NAME"):
        parse_hf_source("hf:a:b:c:d")


def test_hf_source_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install datasets.*local \.txt or \.jsonl"):
        load_texts("hf:wikitext/wikitext-2-raw-v1:validation")


def test_hf_source_with_a_stand_in_datasets_module(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if config is None:
            raise FileNotFoundError(f"Dataset {name} not found")
        return [{"text": "row one\n"}, {"text": "  \n"}, {"text": "row two\n"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    got = load_texts("hf:wikitext/wikitext-2-raw-v1:validation")
    assert got == ["row one\n", "row two\n"]
    assert calls == [
        ("wikitext/wikitext-2-raw-v1", None, "validation"),
        ("wikitext", "wikitext-2-raw-v1", "validation"),
    ]
    calls.clear()
    with pytest.raises(OSError, match="Could not load 'hf:nothing'"):
        load_texts("hf:nothing")
    assert calls == [("nothing", None, "train")]


# ------------------------------------------------------------------------------------------------
# CalibrationData / EvalData
# ------------------------------------------------------------------------------------------------


def test_calibration_data_windows_and_loaders(tiny_tokenizer):
    data = CalibrationData.from_tokenizer(tiny_tokenizer, seqlen=32, num_samples=6, batch_size=4, seed=5)
    data.setup("fit")
    ids = tokenize_text(join_texts(load_texts("builtin")), tiny_tokenizer)
    reference = make_windows(ids, seqlen=32, num_samples=6, bos_id=tiny_tokenizer.bos_token_id, seed=5)
    assert torch.equal(data.windows, reference)
    batches = list(data.train_dataloader())
    assert [b["input_ids"].shape for b in batches] == [(4, 32), (2, 32)]
    assert all(set(b) == {"input_ids"} and b["input_ids"].dtype == torch.long for b in batches)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), reference)
    assert torch.equal(torch.cat([b["input_ids"] for b in data.val_dataloader()]), reference)
    assert data.fingerprint() == windows_fingerprint(reference)
    other = CalibrationData.from_tokenizer(tiny_tokenizer, seqlen=32, num_samples=6, seed=6)
    assert other.fingerprint() != data.fingerprint()
    with pytest.raises(ValueError, match="holdout_fraction > 0"):
        data.holdout_dataloader()


def test_calibration_holdout_is_disjoint_and_leaves_calibration_unchanged(tiny_tokenizer):
    plain = CalibrationData.from_tokenizer(tiny_tokenizer, seqlen=16, num_samples=10, seed=1)
    held = CalibrationData.from_tokenizer(
        tiny_tokenizer, seqlen=16, num_samples=10, seed=1, holdout_fraction=0.25
    )
    assert held.num_holdout == 2  # round(0.25 * 10) = 2 (round half to even)
    assert torch.equal(held.windows, plain.windows)
    hold = held.holdout_windows
    assert hold.shape == (2, 16)
    calib_rows = {tuple(r) for r in held.windows.tolist()}
    assert not any(tuple(r) in calib_rows for r in hold.tolist())
    assert torch.equal(torch.cat([b["input_ids"] for b in held.holdout_dataloader()]), hold)
    assert torch.equal(torch.cat([b["input_ids"] for b in held.val_dataloader()]), hold)
    tiny_fraction = CalibrationData.from_tokenizer(
        tiny_tokenizer, seqlen=16, num_samples=10, holdout_fraction=0.01
    )
    assert tiny_fraction.num_holdout == 1


def test_calibration_head_is_the_draw_of_fewer_windows(tiny_tokenizer):
    """The probe's window subsample: the first n windows, the same a draw of n windows gives."""
    data = CalibrationData.from_tokenizer(tiny_tokenizer, seqlen=16, num_samples=10, seed=3, holdout_fraction=0.2)
    head = data.head(4)
    fewer = CalibrationData.from_tokenizer(tiny_tokenizer, seqlen=16, num_samples=4, seed=3)
    assert torch.equal(head.windows, fewer.windows) and torch.equal(head.windows, data.windows[:4])
    assert head.fingerprint() == fewer.fingerprint() and head.holdout_windows.shape == (0, 16)
    assert torch.equal(torch.cat([b["input_ids"] for b in head.train_dataloader()]), data.windows[:4])
    assert data.head(10) is data and data.head(50) is data
    with pytest.raises(ValueError, match="at least one window"):
        data.head(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seqlen": 1}, "seqlen must be at least 2"),
        ({"num_samples": 0}, "num_samples must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"holdout_fraction": 1.0}, r"holdout_fraction must be in \[0, 1\)"),
    ],
)
def test_calibration_data_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibrationData(**kwargs)


def test_calibration_data_too_little_text(tmp_path, tiny_tokenizer):
    small = tmp_path / "small.txt"
    small.write_text("The quick brown fox.", encoding="utf-8")
    data = CalibrationData.from_tokenizer(tiny_tokenizer, source=str(small), seqlen=16, num_samples=4)
    with pytest.raises(ValueError, match=r"Too little text: found \d+ tokens, need 60"):
        data.setup()


def test_eval_data_from_file_and_builtin_fallback(tmp_path, tiny_tokenizer):
    path = tmp_path / "eval.txt"
    path.write_text(TEXT, encoding="utf-8")
    data = EvalData.from_tokenizer(tiny_tokenizer, path=str(path), window=7, max_windows=5, batch_size=2)
    expected = eval_windows(TEXT, tiny_tokenizer, window=7, max_windows=5)
    batches = list(data.val_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), expected)
    assert data.fingerprint() == windows_fingerprint(expected)
    fallback = EvalData.from_tokenizer(tiny_tokenizer, window=15, max_windows=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback.setup("validate")
    assert any("builtin corpus" in str(w.message) for w in caught)
    builtin_ids = tokenize_text(join_texts(load_texts("builtin")), tiny_tokenizer)
    assert fallback.windows[:, 1:].tolist() == builtin_ids[: 3 * 15].view(3, 15).tolist()
