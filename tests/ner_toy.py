"""A tiny NER world for token-classification tests: a BERT of a few dozen word pieces with a fast
tokenizer (some words split into pieces, so that sub-token alignment matters), and sentences
whose entities are decided by the words themselves."""

from __future__ import annotations

import json
import random
from pathlib import Path

PERSONS = ["john", "mary", "johnson", "maryson", "anna"]  # johnson = john ##son
PLACES = ["paris", "london", "berlin", "parisville"]  # parisville = paris ##ville
FILLER = "the a met in went to and saw from is was today".split()
PIECES = ["##son", "##ville", "##s"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NER_VOCAB = SPECIAL + ["john", "mary", "anna", "paris", "london", "berlin"] + FILLER + PIECES


def make_ner_checkpoint(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(NER_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(path)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(NER_VOCAB)})
    enc = tok(["johnson", "went", "to", "parisville"], is_split_into_words=True)
    assert tok.is_fast and tok.unk_token_id not in enc["input_ids"], "tiny NER tokenizer maps words to [UNK]"
    assert len(enc["input_ids"]) == 8, "johnson / parisville must split into word pieces"
    tok.save_pretrained(path)
    return path


def ner_rows(n: int, seed: int):
    """Rows {"tokens", "ner_tags"}: one or two entities (B-PER / B-LOC, two-word persons with I-PER)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(1, 2)):
            tokens += rng.sample(FILLER, rng.randint(1, 3))
            tags += ["O"] * (len(tokens) - len(tags))
            if rng.random() < 0.5:
                name = rng.sample(PERSONS, rng.randint(1, 2))
                tokens += name
                tags += ["B-PER"] + ["I-PER"] * (len(name) - 1)
            else:
                tokens.append(rng.choice(PLACES))
                tags.append("B-LOC")
        tokens.append(rng.choice(FILLER))
        tags.append("O")
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
