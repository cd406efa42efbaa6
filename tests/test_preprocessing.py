"""One preprocessing path: training (tokenize_splits), augmented training batches
(AugmentingCollator) and finetune.predict encode the same rows into the same token ids."""

import pytest
from datasets import Dataset, DatasetDict

from conftest import make_tokenizer
from finetune.batching import AugmentingCollator
from finetune.config import DataConfig
from finetune.data import LABELS, tokenize_splits
from finetune.predict import encoded_batches

MAX_LENGTH = 12
LONG = "the movie was very good and the plot was really great and the acting was superb"
SHORT = "dull film"
# (text, pair): both over-long, short + long, long + short, both short. A path that truncated
# only the first or only the second text, or not at all, would give other ids on some row.
ROWS = [(LONG, LONG + " nice"), (SHORT, LONG), (LONG, SHORT), ("great", "awful plot")]


class _Epoch:
    epoch = 0  # what AugmentingCollator reads from its batch sampler


def _unpadded(input_ids, attention_mask):
    return [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]


@pytest.mark.parametrize("with_pairs", [True, False], ids=["pairs", "single"])
def test_training_augmented_batches_and_predict_encode_identically(with_pairs):
    tokenizer = make_tokenizer()
    cfg = DataConfig(text_column="sentence", text_pair_column="other" if with_pairs else None, max_length=MAX_LENGTH)
    rows = [{"sentence": t, "other": p, LABELS: 0} for t, p in ROWS]

    training = tokenize_splits(DatasetDict({"train": Dataset.from_list(rows)}), tokenizer, cfg)["train"]["input_ids"]

    # Augmentation off (all probabilities 0): the collator's own encoding is what is compared.
    collator = AugmentingCollator(tokenizer, cfg, _Epoch(), seed=0)
    batch = collator([{**row, "__index__": i} for i, row in enumerate(rows)])
    augmented = _unpadded(batch["input_ids"], batch["attention_mask"])

    predicted = [None] * len(rows)
    for idx, enc in encoded_batches(tokenizer, rows, "sentence", cfg.text_pair_column, MAX_LENGTH, batch_size=3):
        for i, ids in zip(idx, _unpadded(enc["input_ids"], enc["attention_mask"])):
            predicted[i] = ids

    assert training == augmented == predicted
    # And all three are the tokenizer's own truncation, computed here (not through finetune.data).
    expected = [tokenizer(t, p if with_pairs else None, truncation=True, max_length=MAX_LENGTH)["input_ids"] for t, p in ROWS]
    assert training == expected
    # The rows really are cut (else the test could not see a path that forgot to truncate).
    assert max(len(ids) for ids in training) == MAX_LENGTH
    assert len(tokenizer(LONG)["input_ids"]) > MAX_LENGTH
    assert tokenizer.unk_token_id not in training[0]
