"""Tags of token classification (NER): reading tag schemes, label lists, checks of tagged rows,
entities from tags, and entities from raw-text token scores as the Hugging Face pipeline groups them.

Every scheme read (IOB1, IOB2, BIOES) becomes IOB2 (``B-PER I-PER O``), the one scheme training,
metrics and predictions use. Where a chunk starts on an ``I-X`` (after ``O``, at the start of a
sentence, or after another type), it is read as conlleval reads it: as ``B-X``. In IOB1 that is the
scheme itself; in IOB2 and BIOES it is a repair, counted in ``Repairs`` so that the caller can warn
once. Sub-token alignment and windows over long sentences: ``finetune.word_windows``.

Rows in messages count from 1, as data_checks counts them; ``place`` names the file or split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from numbers import Integral
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from finetune.data_checks import DataError

OUTSIDE = "O"
SCHEMES = ("auto", "iob1", "iob2", "bioes")
_TAG = re.compile(r"^([BIES])-(.+)$")
# Prefixes that continue the chunk before them when its type matches (conlleval).
_CONTINUE = {"I", "E"}
_INSIDE = {"B", "I"}


class TagError(DataError):
    """A tag that no scheme reads, tags that do not fit their tokens, or a tag unknown to the model."""


@dataclass
class Repairs:
    """The chunks that started on a continuation tag (``I-X`` after ``O``, ...) and were read as ``B-X``.
    ``first``: (row, word, tag) of the first one, rows and words counting from 0."""

    count: int = 0
    first: Optional[Tuple[int, int, str]] = None

    def message(self, place: str = "the data") -> str:
        """One warning line for the caller's log; empty when nothing was repaired."""
        if not self.count:
            return ""
        row, word, tag = self.first
        return (f"{place}: {self.count} entity chunk(s) start with a continuation tag (first: row {row + 1}, "
                f"word {word + 1}: '{tag}' after no entity of its type); read as B-{tag[2:]}, as conlleval and "
                "seqeval read them.")  # fmt: skip


@dataclass
class TaggedRows:
    """Tag sequences read and turned into IOB2: ``tags`` (one list of strings per row), the scheme
    they were read in, and the repairs made."""

    tags: List[List[str]]
    scheme: str
    repairs: Repairs = field(default_factory=Repairs)


def _split(tag: str) -> Tuple[str, str]:
    if tag == OUTSIDE:
        return OUTSIDE, ""
    m = _TAG.match(tag)
    return (m.group(1), m.group(2)) if m else ("", "")


def check_rows(tokens: Sequence, tags: Sequence, place: str = "the data") -> None:
    """Every row holds a non-empty list of words (strings) and as many tags.

    Raises:
        TagError: naming the row, what it holds and the fix.
    """
    for i, (words, row_tags) in enumerate(zip(tokens, tags)):
        if not isinstance(words, (list, tuple)) or not isinstance(row_tags, (list, tuple)):
            bad = words if not isinstance(words, (list, tuple)) else row_tags
            raise TagError(f"{place}: row {i + 1} holds {bad!r} ({type(bad).__name__}) where a list is expected: "
                           "each row needs a list of words and a list of as many tags (e.g. "
                           '{"tokens": ["EU", "rejects"], "ner_tags": ["B-ORG", "O"]}).')  # fmt: skip
        if not words:
            raise TagError(f"{place}: row {i + 1} is an empty sentence (no words). Remove the row: a sentence "
                           "without words has nothing to tag.")  # fmt: skip
        if len(words) != len(row_tags):
            raise TagError(f"{place}: row {i + 1} has {len(words)} words but {len(row_tags)} tags "
                           f"(words {list(words)[:8]}{'...' if len(words) > 8 else ''}). Each word needs "
                           "exactly one tag: fix the row or remove it.")  # fmt: skip
        bad = next((w for w in words if not isinstance(w, str)), None)
        if bad is not None:
            raise TagError(f"{place}: row {i + 1} holds the word {bad!r} ({type(bad).__name__}), not text. "
                           "Words must be strings.")  # fmt: skip


def names_to_tags(tag_ids: Sequence[Sequence[int]], names: Sequence[str], place: str = "the data") -> List[List[str]]:
    """Integer tags (a ``ClassLabel`` column) as their names.

    Raises:
        TagError: an id outside ``names``, naming the row.
    """
    out = []
    for i, row in enumerate(tag_ids):
        bad = next((t for t in row if not (isinstance(t, Integral) and 0 <= t < len(names))), None)
        if bad is not None:
            raise TagError(f"{place}: row {i + 1} holds the tag id {bad!r}, but the tag names are {list(names)} "
                           f"(ids 0 to {len(names) - 1}). Give the tag names the column was written with, "
                           "or fix the row.")  # fmt: skip
        out.append([names[t] for t in row])
    return out


def _check_tags(tags: Sequence[Sequence[str]], scheme: str, place: str, scheme_key: str) -> None:
    allowed = "BIES" if scheme in ("auto", "bioes") else "BI"
    for i, row in enumerate(tags):
        for j, tag in enumerate(row):
            prefix, _ = _split(tag) if isinstance(tag, str) else ("", "")
            if prefix == OUTSIDE or (prefix and prefix in allowed):
                continue
            if prefix:  # a BIOES tag where IOB was asked for
                raise TagError(f"{place}: row {i + 1}, word {j + 1} has the tag '{tag}', a BIOES tag, but "
                               f"{scheme_key}={scheme} reads only B-/I-/O tags. Set {scheme_key}=bioes (or "
                               "auto), or fix the tags.")  # fmt: skip
            raise TagError(f"{place}: row {i + 1}, word {j + 1} has the tag {tag!r}, which no tag scheme reads. "
                           "Tags are 'O' or a prefix, a hyphen and the entity type: B-/I- (IOB1, IOB2) or "
                           "B-/I-/E-/S- (BIOES), e.g. 'B-PER', 'I-PER'. Rewrite the tags in one of these "
                           "schemes (integer tags need their names).")  # fmt: skip


def detect_scheme(tags: Sequence[Sequence[str]]) -> str:
    """'bioes' when an E- or S- tag occurs; else 'iob2' when some B-X starts a chunk after no X
    (IOB1 writes B- only between two chunks of one type); else 'iob1' when some I-X does; else 'iob2'."""
    starts_on_i = False
    for row in tags:
        prev_prefix, prev_type = OUTSIDE, ""
        for tag in row:
            prefix, kind = _split(tag)
            if prefix in ("E", "S"):
                return "bioes"
            follows = prev_prefix in _INSIDE and prev_type == kind
            if prefix == "B" and not follows:
                return "iob2"
            starts_on_i |= prefix == "I" and not follows
            prev_prefix, prev_type = prefix, kind
    return "iob1" if starts_on_i else "iob2"


def to_iob2(tags: Sequence[Sequence[str]], scheme: str = "auto", place: str = "the data",
            scheme_key: str = "data.tag_scheme") -> TaggedRows:  # fmt: skip
    """Tag sequences in IOB1, IOB2 or BIOES (``scheme``, or detected over all rows with 'auto') as IOB2.

    A chunk that starts on a continuation tag (I-X, or E-X in BIOES, after O, at the start, or after
    another type or an E-/S- tag) starts as B-X, as conlleval reads it; outside IOB1 it is counted
    in ``repairs``.

    Raises:
        TagError: a tag no scheme reads (``X-PER``, ``B_PER``), or a BIOES tag with scheme iob1/iob2.
    """
    if scheme not in SCHEMES:
        raise TagError(f"{scheme_key}={scheme!r} is not a tag scheme; use one of {list(SCHEMES)}.")
    _check_tags(tags, scheme, place, scheme_key)
    scheme = detect_scheme(tags) if scheme == "auto" else scheme
    repairs, out = Repairs(), []
    for i, row in enumerate(tags):
        prev_prefix, prev_type, new = OUTSIDE, "", []
        for j, tag in enumerate(row):
            prefix, kind = _split(tag)
            if prefix == OUTSIDE:
                new.append(OUTSIDE)
            elif prefix in _CONTINUE and prev_prefix in _INSIDE and prev_type == kind:
                new.append(f"I-{kind}")
            else:
                new.append(f"B-{kind}")
                if prefix in _CONTINUE and not (scheme == "iob1" and prefix == "I"):
                    repairs.count += 1
                    repairs.first = repairs.first or (i, j, tag)
            prev_prefix, prev_type = prefix, kind
        out.append(new)
    return TaggedRows(out, scheme, repairs)


def label_list(tags: Sequence[Sequence[str]]) -> List[str]:
    """The tag names of IOB2 rows in a stable order: O, then B-X and I-X for each entity type X
    sorted by name (I-X is kept even where the rows hold only single-word X entities)."""
    kinds = sorted({_split(t)[1] for row in tags for t in row} - {""})
    return [OUTSIDE] + [f"{p}-{k}" for k in kinds for p in "BI"]


def encode_tags(tags: Sequence[Sequence[str]], label2id: Dict[str, int], place: str = "the data") -> List[List[int]]:
    """IOB2 rows as label ids.

    Raises:
        TagError: a tag the label list (built from the training data) does not hold, naming the row.
    """
    out = []
    for i, row in enumerate(tags):
        try:
            out.append([label2id[t] for t in row])
        except KeyError:
            bad = next(t for t in row if t not in label2id)
            raise TagError(f"{place}: row {i + 1} has the tag '{bad}', which the training data never uses "
                           f"(its tags: {list(label2id)}). Fix the tag, add training rows with this entity "
                           "type, or remove the row.") from None  # fmt: skip
    return out


def continuation_ids(names: Sequence[str]) -> List[int]:
    """For each label id, the id its word's continuation sub-tokens carry with label_all_tokens:
    B-X becomes I-X (as transformers' run_ner.py does), every other tag stays."""
    index = {n: i for i, n in enumerate(names)}
    return [index.get(f"I-{n[2:]}", i) if n.startswith("B-") else i for i, n in enumerate(names)]


def entities(tags: Sequence[str]) -> List[Tuple[str, int, int]]:
    """The entities of one row of IOB2 tags, as (type, first word, end word exclusive), chunked as
    conlleval and seqeval's default mode chunk: an I-X after no X starts an entity."""
    out, start, kind = [], None, ""
    for j, tag in enumerate(list(tags) + [OUTSIDE]):
        prefix, k = _split(tag)
        if start is not None and (prefix != "I" or k != kind):
            out.append((kind, start, j))
            start = None
        if prefix in ("B", "I") and start is None:
            start, kind = j, k
    return out


# ---------------------------------------------------------------------------------------------
# Raw text: entities from token scores, as pipeline("token-classification", aggregation_strategy="simple")
# ---------------------------------------------------------------------------------------------
def simple_entities(text: str, tokens: Sequence[str], offsets: Sequence[Tuple[int, int]], probs,
                    id2label: Dict[int, str], tokens_to_string: Callable[[List[str]], str],
                    unk_token: Optional[str] = None) -> List[dict]:  # fmt: skip
    """The entities of ``text`` from the class probabilities of its tokens (special tokens left out),
    grouped as the transformers pipeline's ``aggregation_strategy="simple"`` groups them: each token
    takes its most probable tag; neighbouring tokens of one type join unless the later one is B-;
    groups of O are dropped. Each entity: ``entity_group`` (the type), ``score`` (the mean of its
    tokens' probabilities), ``word`` (its tokens as text, ``tokens_to_string``: the tokenizer's
    ``convert_tokens_to_string``; an unknown token reads as its text), ``start`` and ``end``
    (character offsets in ``text``)."""
    groups: List[List[dict]] = []
    for token, (start, end), p in zip(tokens, offsets, probs):
        best = max(range(len(p)), key=lambda c: p[c])  # first of equal maxima, as numpy's argmax
        tag = id2label[best]
        bi, kind = (tag[0], tag[2:]) if tag[:2] in ("B-", "I-") else ("I", tag)
        item = {"bi": bi, "kind": kind, "score": float(p[best]), "start": int(start), "end": int(end),
                "word": text[start:end] if token == unk_token else token}  # fmt: skip
        if groups and bi != "B" and groups[-1][-1]["kind"] == kind:
            groups[-1].append(item)
        else:
            groups.append([item])
    return [{"entity_group": g[0]["kind"], "score": sum(t["score"] for t in g) / len(g),
             "word": tokens_to_string([t["word"] for t in g]), "start": g[0]["start"], "end": g[-1]["end"]}
            for g in groups if g[0]["kind"] != OUTSIDE]  # fmt: skip
