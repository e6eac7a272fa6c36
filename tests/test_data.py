"""Tests of grassopt.train.data on the real SOTU corpus and on small user corpora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from grassopt.train import data
from grassopt.train.data import (
    BatchSampler,
    TokenizedCorpus,
    iter_eval_batches,
    load_documents,
    num_eval_batches,
    prepare,
)

VOCAB = 1024  # small vocabulary: the SOTU tokenizer trains once per session in a few seconds


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A fixed folder in the session's base temp dir, so test_model.py reuses the same entry.
    root = tmp_path_factory.getbasetemp() / "grassopt-cache"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def sotu_docs() -> list[str]:
    return load_documents()


@pytest.fixture(scope="session")
def sotu(cache_root: Path) -> TokenizedCorpus:
    return prepare(vocab_size=VOCAB, cache_dir=cache_root, progress=False)


def write_txt_corpus(folder: Path, texts: list[str]) -> Path:
    """Write ``texts`` as .txt files, some in a subfolder; return the folder."""
    (folder / "sub").mkdir(parents=True)
    for i, text in enumerate(texts):
        sub = "sub/" if i % 2 else ""
        (folder / f"{sub}doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------
# SOTU corpus, split, tokenizer
# --------------------------------------------------------------------------------------


def test_sotu_documents_are_read_from_the_package(sotu_docs: list[str]) -> None:
    assert len(sotu_docs) == 249
    first = (data.sotu_speeches_dir() / "1790-Washington-1.txt").read_text(encoding="utf-8")
    assert sotu_docs[0] == first
    assert first.startswith("Fellow-Citizens of the Senate")
    assert load_documents("sotu") == sotu_docs


def test_split_is_disjoint_complete_and_by_document(
    sotu: TokenizedCorpus, sotu_docs: list[str]
) -> None:
    meta = sotu.meta
    train, val = meta["train_docs"], meta["val_docs"]
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(len(sotu_docs)))
    assert len(val) == round(0.05 * 249) == meta["n_val_docs"]
    assert meta["n_docs"] == 249 and len(meta["doc_names"]) == 249
    # Each split is its documents followed by EOS, so it holds exactly one EOS per document:
    # a literal "<|endoftext|>" in the text could never produce the EOS id.
    assert int(np.count_nonzero(sotu.train == sotu.eos_id)) == len(train)
    assert int(np.count_nonzero(sotu.val == sotu.eos_id)) == len(val)
    # The validation stream is exactly the validation documents, tokenized, in order.
    expected = []
    for i in val:
        expected += sotu.encode(sotu_docs[i]) + [sotu.eos_id]
    np.testing.assert_array_equal(np.asarray(sotu.val), np.asarray(expected))
    assert meta["val_tokens"] == len(sotu.val) and meta["train_tokens"] == len(sotu.train)


def test_split_depends_only_on_seed() -> None:
    a = data.split_documents(249, 0.05, seed=1234)
    assert a == data.split_documents(249, 0.05, seed=1234)
    assert a != data.split_documents(249, 0.05, seed=1235)
    assert data.split_documents(2, 0.01, seed=0)[1] != []  # at least one validation doc
    assert data.split_documents(2, 0.99, seed=0)[0] != []  # at least one training doc
    with pytest.raises(ValueError, match="at least 2"):
        data.split_documents(1, 0.05, seed=0)


def test_tokens_decode_to_the_original_text(sotu: TokenizedCorpus, sotu_docs: list[str]) -> None:
    assert sotu.vocab_size == VOCAB and sotu.tokenizer.get_vocab_size() == VOCAB
    assert sotu.train.dtype == np.uint16 and isinstance(sotu.train, np.memmap)
    assert int(sotu.train.max()) < sotu.vocab_size
    for split, ids in (("train_docs", sotu.train), ("val_docs", sotu.val)):
        first_doc = sotu.meta[split][0]
        end = int(np.argmax(np.asarray(ids) == sotu.eos_id))
        assert sotu.decode(ids[:end]) == sotu_docs[first_doc]
        assert sotu.decode(torch.tensor(ids[: end + 1].astype(np.int64))).endswith(
            data.EOS_TOKEN
        )
    tricky = "Caf\u00e9 \u2014 \u00bd <|endoftext|> \U0001f600\n\n  tabs\t"
    ids = sotu.encode(tricky)
    assert sotu.eos_id not in ids
    assert sotu.decode(ids) == tricky


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def test_cache_is_reused(
    sotu: TokenizedCorpus, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tokenizer was retrained although the cache exists")

    monkeypatch.setattr(data, "_train_tokenizer", no_training)
    again = prepare(vocab_size=VOCAB, cache_dir=cache_root, progress=False)
    assert again.from_cache
    assert again.cache_dir == sotu.cache_dir
    np.testing.assert_array_equal(again.train, sotu.train)
    np.testing.assert_array_equal(again.val, sotu.val)
    assert again.tokenizer.to_str() == sotu.tokenizer.to_str()
    assert sorted(p.name for p in sotu.cache_dir.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.npy",
        "val.npy",
    ]
    # Nothing temporary is left beside the entries.
    assert not [p for p in sotu.cache_dir.parent.iterdir() if p.name.startswith(".tmp")]


def test_cache_is_keyed_by_corpus_and_settings(
    tmp_path: Path, sotu_docs: list[str]
) -> None:
    folder = write_txt_corpus(tmp_path / "corpus", [d[:4000] for d in sotu_docs[:6]])
    cache = tmp_path / "cache"
    a = prepare(folder, vocab_size=300, cache_dir=cache, progress=False)
    assert not a.from_cache
    b = prepare(folder, vocab_size=400, cache_dir=cache, progress=False)
    assert not b.from_cache and b.cache_dir != a.cache_dir and b.vocab_size == 400
    c = prepare(folder, vocab_size=300, split_seed=7, cache_dir=cache, progress=False)
    assert not c.from_cache and c.cache_dir not in (a.cache_dir, b.cache_dir)
    assert prepare(folder, vocab_size=300, cache_dir=cache, progress=False).from_cache
    # Editing one document changes the key.
    (folder / "doc00.txt").write_text(sotu_docs[0][:4000] + " Amended.", encoding="utf-8")
    d = prepare(folder, vocab_size=300, cache_dir=cache, progress=False)
    assert not d.from_cache and d.cache_dir not in (a.cache_dir, b.cache_dir, c.cache_dir)


def test_cache_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRASSOPT_CACHE", str(tmp_path / "env"))
    assert data.default_cache_root() == tmp_path / "env"
    assert data.default_cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("GRASSOPT_CACHE")
    assert data.default_cache_root() == Path.home() / ".cache" / "grassopt"


def test_interrupted_build_leaves_no_entry(
    tmp_path: Path, sotu_docs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_txt_corpus(tmp_path / "corpus", [d[:3000] for d in sotu_docs[:4]])
    cache = tmp_path / "cache"
    real_save = np.save

    def crash_on_val(path: object, arr: np.ndarray) -> None:
        if str(path).endswith("val.npy"):
            raise OSError("disk full")
        real_save(path, arr)  # type: ignore[arg-type]

    monkeypatch.setattr(np, "save", crash_on_val)
    with pytest.raises(OSError, match="disk full"):
        prepare(folder, vocab_size=300, cache_dir=cache, progress=False)
    assert list((cache / "corpora").iterdir()) == []  # neither an entry nor a temp dir
    monkeypatch.setattr(np, "save", real_save)
    ok = prepare(folder, vocab_size=300, cache_dir=cache, progress=False)
    assert not ok.from_cache and len(ok.val) > 0

    # A damaged entry (a file deleted by hand) is rebuilt, not half-loaded.
    (ok.cache_dir / "val.npy").unlink()
    rebuilt = prepare(folder, vocab_size=300, cache_dir=cache, progress=False)
    assert not rebuilt.from_cache and rebuilt.cache_dir == ok.cache_dir
    np.testing.assert_array_equal(rebuilt.val, ok.val)


# --------------------------------------------------------------------------------------
# User corpora and errors
# --------------------------------------------------------------------------------------


def test_txt_folder_corpus(tmp_path: Path, sotu_docs: list[str]) -> None:
    texts = [d[:3000] for d in sotu_docs[10:16]]
    folder = write_txt_corpus(tmp_path / "corpus", texts)
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")  # dropped
    (folder / "notes.md").write_text("not a document", encoding="utf-8")  # ignored
    docs = load_documents(folder)
    # Sorted by relative path: top-level even-numbered files, then sub/ odd-numbered ones.
    assert docs == texts[0::2] + texts[1::2]
    ds = prepare(str(folder), vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    assert ds.meta["n_docs"] == 6 and ds.meta["source"] == str(folder)
    assert ds.meta["doc_names"][-1] == "sub/doc05.txt"
    assert len(ds.train) + len(ds.val) == ds.meta["train_tokens"] + ds.meta["val_tokens"]
    val_doc = ds.meta["val_docs"][0]
    end = int(np.argmax(np.asarray(ds.val) == ds.eos_id))
    assert ds.decode(ds.val[:end]) == docs[val_doc]


def test_tokenizer_is_trained_on_training_documents_only(
    tmp_path: Path, sotu_docs: list[str]
) -> None:
    texts = [d[:3000] for d in sotu_docs[30:40]]
    _, (val_doc,) = data.split_documents(len(texts), 0.05, seed=1234)
    texts[val_doc] += " quixotrembling" * 300  # a word that only a validation document has
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(texts):  # flat and zero-padded: file order == list order
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    ds = prepare(folder, vocab_size=600, cache_dir=tmp_path / "cache", progress=False)
    assert ds.meta["val_docs"] == [val_doc]
    assert len(ds.encode(" quixotrembling")) > 3  # not learned as a token
    assert len(ds.encode(" the")) == 1  # common training words are


def test_jsonl_corpus(tmp_path: Path, sotu_docs: list[str]) -> None:
    texts = [d[:3000] for d in sotu_docs[20:25]]
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # trailing blank lines
    assert load_documents(path) == texts
    ds = prepare(path, vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    assert ds.meta["n_docs"] == 5 and ds.meta["doc_names"][0] == "corpus.jsonl:1"
    assert ds.decode(ds.train[: int(np.argmax(np.asarray(ds.train) == ds.eos_id))]) == (
        texts[ds.meta["train_docs"][0]]
    )


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist.*folder of .txt"):
        load_documents(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(missing, cache_dir=tmp_path / "cache")


def test_unusable_corpora_are_clear_errors(tmp_path: Path) -> None:
    empty_folder = tmp_path / "no_txt"
    empty_folder.mkdir()
    (empty_folder / "a.md").write_text("text", encoding="utf-8")
    with pytest.raises(ValueError, match="no_txt contains no .txt files"):
        load_documents(empty_folder)

    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("", encoding="utf-8")
    (blank / "b.txt").write_text(" \n\t ", encoding="utf-8")
    with pytest.raises(ValueError, match="blank is empty.*all 2 documents"):
        load_documents(blank)

    other = tmp_path / "corpus.csv"
    other.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="neither a folder nor a .jsonl"):
        load_documents(other)


def test_bad_jsonl_names_the_line(tmp_path: Path) -> None:
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "fine"}\n{"body": "oops"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_text.jsonl, line 2: no 'text' field"):
        load_documents(no_text)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n\n{"text": "b"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl, line 3: not valid JSON"):
        load_documents(broken)

    wrong_type = tmp_path / "wrong.jsonl"
    wrong_type.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: 'text' is a int"):
        load_documents(wrong_type)

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        load_documents(empty)


def test_too_small_corpus_is_a_clear_error(tmp_path: Path) -> None:
    folder = write_txt_corpus(tmp_path / "small", ["A short speech.", "Another one here."])
    ds = prepare(folder, vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    n = len(ds.train)
    with pytest.raises(ValueError, match=rf"training split has {n} tokens.*needs at least 2049"):
        ds.sampler(batch_size=8, seq_len=256)
    ds.check_size(batch_size=1, seq_len=n - 1)  # exactly enough: no error
    with pytest.raises(ValueError, match="seq_len=256 needs at least 257"):
        BatchSampler(ds.train, batch_size=1, seq_len=256)
    with pytest.raises(ValueError, match="uint16"):
        prepare(folder, vocab_size=70000, cache_dir=tmp_path / "cache")
    single = write_txt_corpus(tmp_path / "single", ["Only one document."])
    with pytest.raises(ValueError, match="at least 2 are needed"):
        prepare(single, vocab_size=300, cache_dir=tmp_path / "cache", progress=False)


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def test_batches_are_shifted_windows_of_the_training_split(sotu: TokenizedCorpus) -> None:
    sampler = sotu.sampler(batch_size=4, seq_len=32, seed=3)
    x, y = sampler.next()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = torch.from_numpy(np.asarray(sotu.train).astype(np.int64))
    for row_x, row_y in zip(x, y):
        # Find the window in the stream: it must be contiguous there.
        starts = torch.nonzero(train[: len(train) - 32] == row_x[0]).flatten()
        assert any(
            torch.equal(train[s : s + 32], row_x) and torch.equal(train[s + 1 : s + 33], row_y)
            for s in starts.tolist()
        )
    same = sotu.sampler(batch_size=4, seq_len=32, seed=3).next()
    other = sotu.sampler(batch_size=4, seq_len=32, seed=4).next()
    assert torch.equal(same[0], x) and not torch.equal(other[0], x)


def test_sampler_reaches_every_window_and_no_further() -> None:
    tokens = np.arange(10, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=16, seq_len=4, seed=0)
    starts = set()
    for _ in range(20):
        x, y = sampler.next()
        starts.update(x[:, 0].tolist())
        assert torch.equal(y, x + 1)  # contiguous windows of 0, 1, 2, ...
    assert starts == set(range(6))  # windows [s, s + 5) for s = 0 .. 10 - 5


def test_sampler_resumes_exactly(sotu: TokenizedCorpus, tmp_path: Path) -> None:
    sampler = BatchSampler(sotu.train, batch_size=4, seq_len=64, seed=11)
    for _ in range(3):
        sampler.next()
    torch.save(sampler.state_dict(), tmp_path / "sampler.pt")
    uninterrupted = [sampler.next() for _ in range(3)]

    resumed = BatchSampler(sotu.train, batch_size=4, seq_len=64, seed=999)
    resumed.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    assert resumed.batches_drawn == 3 and resumed.seed == 11
    for (x0, y0), (x1, y1) in zip(uninterrupted, (next(resumed) for _ in range(3))):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)

    wrong = BatchSampler(sotu.train, batch_size=4, seq_len=32, seed=11)
    with pytest.raises(ValueError, match="seq_len=64"):
        wrong.load_state_dict(sampler.state_dict())


def test_sampler_device_argument(sotu: TokenizedCorpus) -> None:
    x, y = BatchSampler(sotu.train, 2, 8, device="meta").next()
    assert x.device.type == "meta" and y.device.type == "meta"


@pytest.mark.parametrize(
    ("n", "batch_size", "seq_len"), [(1, 4, 8), (2, 4, 8), (33, 2, 8), (40, 3, 8)]
)
def test_eval_batches_cover_small_streams(n: int, batch_size: int, seq_len: int) -> None:
    tokens = np.arange(n, dtype=np.uint16)
    batches = list(iter_eval_batches(tokens, batch_size, seq_len))
    assert len(batches) == num_eval_batches(n, batch_size, seq_len)
    targets = [int(t) for _, y in batches for t in y.flatten()]
    inputs = [int(t) for x, _ in batches for t in x.flatten()]
    assert targets == list(range(1, n)) and inputs == list(range(0, n - 1))
    for x, y in batches:
        assert x.shape == y.shape and x.shape[1] <= seq_len and x.shape[0] <= batch_size


def test_eval_batches_cover_the_validation_split_once(sotu: TokenizedCorpus) -> None:
    val = np.asarray(sotu.val).astype(np.int64)
    batch_size, seq_len = 8, 256
    batches = list(iter_eval_batches(sotu.val, batch_size, seq_len))
    predicted = sum(y.numel() for _, y in batches)
    assert predicted == len(val) - 1
    np.testing.assert_array_equal(torch.cat([y.flatten() for _, y in batches]).numpy(), val[1:])
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens within a window
    last_len = (len(val) - 1) % seq_len
    assert last_len and batches[-1][0].shape == (1, last_len)
    assert all(x.shape[1] == seq_len for x, _ in batches[:-1])
    # The exact mean of any per-token quantity is the sum over batches / predicted tokens.
    per_token = {int(t): float(t) % 7 for t in np.unique(val)}
    total = sum(sum(per_token[int(t)] for t in y.flatten()) for _, y in batches)
    assert total / predicted == pytest.approx(np.mean([per_token[int(t)] for t in val[1:]]))


@pytest.mark.slow
def test_default_sotu_at_full_vocab(tmp_path: Path) -> None:
    """prepare() with the default settings gives the documented SOTU numbers."""
    ds = prepare(cache_dir=tmp_path, progress=False)
    assert ds.vocab_size == 8192 and ds.meta["n_docs"] == 249
    assert ds.meta["n_val_docs"] == 12 and ds.meta["n_train_docs"] == 237
    assert 2_000_000 < len(ds.train) < 3_000_000 and 50_000 < len(ds.val) < 200_000
