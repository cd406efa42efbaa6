"""Token classification building blocks: tag schemes, label lists, row checks, entities
(finetune.tagging), sub-token alignment and word windows (finetune.word_windows)."""

import random

import numpy as np
import pytest

from conftest import VOCAB
from finetune.data_checks import DataError
from finetune.tagging import (TagError, check_rows, continuation_ids, detect_scheme, encode_tags, entities, label_list,
                              names_to_tags, simple_entities, to_iob2)  # fmt: skip
from finetune.word_windows import (IGNORE, align_labels, assemble_words, best_windows, encode_words, window_labels,
                                   word_spans, word_tags)  # fmt: skip

# The tiny test vocabulary plus word pieces, so that some words split into several sub-tokens.
PIECES = ["##s", "##ly", "new", "york", "paris", "john", "smith", "met", "in"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB + PIECES)})
    assert tok.is_fast
    assert tok(["goods"], is_split_into_words=True).tokens() == ["[CLS]", "good", "##s", "[SEP]"]
    return tok


# ---------------------------------------------------------------------------------------------
# Schemes
# ---------------------------------------------------------------------------------------------
def test_iob1_is_read_as_iob2_without_counting_repairs():
    rows = [["I-PER", "I-PER", "O", "I-LOC", "B-LOC"], ["O", "I-ORG"]]
    read = to_iob2(rows)
    assert read.scheme == "iob1"
    assert read.tags == [["B-PER", "I-PER", "O", "B-LOC", "B-LOC"], ["O", "B-ORG"]]
    assert read.repairs.count == 0 and read.repairs.message() == ""


def test_bioes_is_read_as_iob2():
    rows = [["S-PER", "O", "B-ORG", "I-ORG", "E-ORG", "S-LOC", "S-LOC", "B-MISC", "E-MISC"]]
    read = to_iob2(rows)
    assert read.scheme == "bioes"
    assert read.tags == [["B-PER", "O", "B-ORG", "I-ORG", "I-ORG", "B-LOC", "B-LOC", "B-MISC", "I-MISC"]]
    assert read.repairs.count == 0


def test_iob2_reads_back_unchanged():
    rows = [["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]]
    read = to_iob2(rows)
    assert read.scheme == "iob2" and read.tags == rows and read.repairs.count == 0


def test_an_i_after_o_in_iob2_starts_an_entity_as_in_conlleval_and_is_counted():
    from seqeval.metrics.sequence_labeling import get_entities

    rows = [["B-PER", "I-PER"], ["O", "I-LOC", "I-LOC", "B-ORG", "I-PER"], ["I-MISC"]]
    read = to_iob2(rows)
    assert read.scheme == "iob2"
    assert read.tags == [["B-PER", "I-PER"], ["O", "B-LOC", "I-LOC", "B-ORG", "B-PER"], ["B-MISC"]]
    assert read.repairs.count == 3 and read.repairs.first == (1, 1, "I-LOC")
    assert "3 entity chunk(s)" in read.repairs.message("train.jsonl") and "row 2, word 2: 'I-LOC'" in read.repairs.message()
    # The repaired tags hold the entities seqeval (conlleval mode) reads in the original ones.
    for original, repaired in zip(rows, read.tags):
        assert [(k, s, e + 1) for k, s, e in get_entities(original)] == entities(repaired)


def test_a_bioes_continuation_after_no_entity_is_repaired_and_counted():
    read = to_iob2([["O", "E-PER", "S-LOC", "I-LOC", "E-LOC"]])
    assert read.tags == [["O", "B-PER", "B-LOC", "B-LOC", "I-LOC"]]
    assert read.repairs.count == 2


def test_the_scheme_given_wins_over_detection():
    rows = [["B-PER", "O", "I-LOC"]]  # detected as IOB2: the I-LOC would be a repair
    assert detect_scheme(rows) == "iob2" and to_iob2(rows).repairs.count == 1
    read = to_iob2(rows, scheme="iob1")
    assert read.scheme == "iob1" and read.repairs.count == 0 and read.tags == [["B-PER", "O", "B-LOC"]]


def test_a_bioes_tag_under_an_iob_scheme_is_refused():
    with pytest.raises(TagError, match=r"row 1, word 2 has the tag 'S-PER', a BIOES tag, but data.tag_scheme=iob2"):
        to_iob2([["O", "S-PER"]], scheme="iob2")


@pytest.mark.parametrize("bad", ["X-PER", "B_PER", "b-PER", "B-", "PER", ""])
def test_a_tag_no_scheme_reads_is_refused_naming_row_word_and_tag(bad):
    with pytest.raises(TagError, match=rf"dev.jsonl: row 2, word 3 has the tag '{bad}', which no tag scheme reads") as err:
        to_iob2([["O"], ["B-PER", "I-PER", bad]], place="dev.jsonl")
    assert isinstance(err.value, DataError) and "e.g. 'B-PER'" in str(err.value)


def test_an_unknown_scheme_name_is_refused():
    with pytest.raises(TagError, match=r"data.tag_scheme='bilou' is not a tag scheme"):
        to_iob2([["O"]], scheme="bilou")


# ---------------------------------------------------------------------------------------------
# Label lists, integer tags, row checks
# ---------------------------------------------------------------------------------------------
def test_label_list_is_o_then_b_and_i_per_type_sorted_whatever_the_row_order():
    rows = [["B-PER", "O", "B-LOC", "I-LOC"], ["B-MISC"]]
    expected = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-PER", "I-PER"]
    assert label_list(rows) == expected
    assert label_list(rows[::-1]) == expected


def test_integer_tags_read_with_their_names():
    names = ["O", "B-PER", "I-PER"]
    assert names_to_tags([[1, 2, 0], [0]], names) == [["B-PER", "I-PER", "O"], ["O"]]
    with pytest.raises(TagError, match=r"train: row 2 holds the tag id 3, but the tag names are"):
        names_to_tags([[1, 2, 0], [0, 3]], names, place="train")
    with pytest.raises(TagError, match=r"row 1 holds the tag id -1"):
        names_to_tags([[-1]], names)


def test_a_validation_tag_unknown_to_the_training_data_is_refused_naming_the_row():
    label2id = {n: i for i, n in enumerate(label_list([["B-PER", "O"]]))}
    assert encode_tags([["B-PER", "I-PER", "O"]], label2id) == [[1, 2, 0]]
    with pytest.raises(TagError, match=r"validation.jsonl: row 2 has the tag 'B-LOC', which the training data never uses"):
        encode_tags([["O"], ["O", "B-LOC"]], label2id, place="validation.jsonl")


def test_words_and_tags_of_different_lengths_are_refused_naming_the_row():
    check_rows([["a", "b"]], [["O", "O"]])
    with pytest.raises(TagError, match=r"train.jsonl: row 2 has 3 words but 2 tags"):
        check_rows([["a"], ["a", "b", "c"]], [["O"], ["O", "O"]], place="train.jsonl")


def test_an_empty_sentence_is_refused_naming_the_row():
    with pytest.raises(TagError, match=r"row 3 is an empty sentence"):
        check_rows([["a"], ["b"], []], [["O"], ["O"], []])


def test_a_row_that_is_not_a_list_of_words_is_refused():
    with pytest.raises(TagError, match=r"row 1 holds 'EU rejects' \(str\) where a list is expected"):
        check_rows(["EU rejects"], [["B-ORG", "O"]])
    with pytest.raises(TagError, match=r"row 1 holds the word 3 \(int\), not text"):
        check_rows([["a", 3]], [["O", "O"]])


# ---------------------------------------------------------------------------------------------
# Entities
# ---------------------------------------------------------------------------------------------
def test_entities_by_hand():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG", "I-ORG", "B-MISC", "I-PER"]
    assert entities(tags) == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 7), ("MISC", 7, 8), ("PER", 8, 9)]


def test_entities_match_seqeval_default_mode_on_random_tags():
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(0)
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for _ in range(300):
        tags = [rng.choice(names) for _ in range(rng.randint(1, 12))]
        assert entities(tags) == [(k, s, e + 1) for k, s, e in get_entities(tags)], tags


# ---------------------------------------------------------------------------------------------
# Sub-token alignment
# ---------------------------------------------------------------------------------------------
NAMES = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def test_first_sub_token_carries_the_label_the_others_are_ignored(tokenizer):
    enc = encode_words(tokenizer, [["new", "york", "goods", "the"]], max_length=32)
    assert enc.encoding.tokens(0) == ["[CLS]", "new", "york", "good", "##s", "the", "[SEP]"]
    labels = [[1, 2, 3, 0]]  # B-LOC I-LOC B-MISC O
    assert window_labels(enc, labels) == [[IGNORE, 1, 2, 3, IGNORE, 0, IGNORE]]


def test_label_all_tokens_gives_continuation_pieces_the_i_tag(tokenizer):
    enc = encode_words(tokenizer, [["goods", "badly", "new"]], max_length=32)
    assert enc.encoding.tokens(0) == ["[CLS]", "good", "##s", "bad", "##ly", "new", "[SEP]"]
    labels = [[3, 4, 1]]  # B-MISC I-MISC B-LOC
    assert continuation_ids(NAMES) == [0, 2, 2, 4, 4]
    assert window_labels(enc, labels, label_all_tokens=True, continuation=continuation_ids(NAMES)) == [
        [IGNORE, 3, 4, 4, 4, 1, IGNORE]]  # fmt: skip


def test_align_labels_by_hand():
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert align_labels(word_ids, [1, 0, 3]) == [IGNORE, 1, IGNORE, 0, 3, IGNORE, IGNORE, IGNORE]
    assert align_labels(word_ids, [1, 0, 3], label_all_tokens=True) == [IGNORE, 1, 1, 0, 3, 3, 3, IGNORE]


# ---------------------------------------------------------------------------------------------
# Windows over long sentences
# ---------------------------------------------------------------------------------------------
def test_word_spans_by_hand():
    assert word_spans([1] * 10, room=4, stride=2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    # Whole words only: a 2-token word never splits between windows; the shared words hold <= 2 tokens.
    assert word_spans([2, 1, 2, 1, 1], room=4, stride=2) == [(0, 2), (1, 4), (3, 5)]
    # A word longer than a window stands alone (its pieces are truncated), and windows still advance.
    assert word_spans([1, 9, 1], room=4, stride=3) == [(0, 1), (1, 2), (2, 3)]
    assert word_spans([1] * 10, room=4) == [(0, 4)]
    assert word_spans([], room=4, stride=2) == [(0, 0)]


def _position_logits(enc):
    """Per window, per token: logits that say (window, position), to see where a word was read."""
    return [np.array([[k, p] for p in range(len(ids))], dtype=float) for k, ids in enumerate(enc.word_ids)]


def test_each_word_is_read_once_from_the_window_where_it_has_most_context(tokenizer):
    sentence = ["the"] * 10
    enc = encode_words(tokenizer, [["a"], sentence], max_length=6, stride=2)  # 4 words per window
    assert enc.sentence == [0, 1, 1, 1, 1] and enc.spans[1:] == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert enc.windowed_sentences == 1 and enc.truncated_words == 0
    words = assemble_words(enc, _position_logits(enc))
    assert words[0].tolist() == [[0, 1]]
    # Overlapping words go to the window where they are farther from an edge: word 3 sits at the
    # last place of window 1 but in the middle of window 2.
    assert [int(k) for k, _ in words[1]] == [1, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert [int(p) for _, p in words[1]] == [1, 2, 3, 2, 3, 2, 3, 2, 3, 4]


def test_windows_keep_multi_piece_words_whole_and_label_each_window(tokenizer):
    sentence = ["goods", "the", "badly", "new", "york"]
    enc = encode_words(tokenizer, [sentence], max_length=6, stride=2)  # 4 tokens per window
    assert enc.spans == [(0, 2), (1, 4), (3, 5)]
    assert [enc.encoding.tokens(k) for k in range(len(enc))] == [
        ["[CLS]", "good", "##s", "the", "[SEP]"], ["[CLS]", "the", "bad", "##ly", "new", "[SEP]"],
        ["[CLS]", "new", "york", "[SEP]"]]  # fmt: skip
    labels = [[3, 0, 3, 1, 2]]
    assert window_labels(enc, labels) == [[IGNORE, 3, IGNORE, 0, IGNORE], [IGNORE, 0, 3, IGNORE, 1, IGNORE],
                                          [IGNORE, 1, 2, IGNORE]]  # fmt: skip
    chosen = best_windows(enc)[0]
    assert chosen == [(0, 1), (0, 3), (1, 2), (1, 4), (2, 2)]


def test_without_windows_words_past_max_length_are_counted_and_predicted_o(tokenizer):
    enc = encode_words(tokenizer, [["the"] * 6, ["a", "a"], ["new"] * 5], max_length=6)
    assert enc.spans == [(0, 4), (0, 2), (0, 4)]
    assert enc.truncated_words == 3 and enc.truncated_sentences == 2 and enc.windowed_sentences == 0
    logits = [np.tile([1.0, 0.0], (len(ids), 1)) for ids in enc.word_ids]  # every token: tag 0
    words = assemble_words(enc, logits)
    assert np.isnan(words[0][4:]).all() and not np.isnan(words[0][:4]).any()
    assert word_tags(words, ["B-PER", "O"]) == [["B-PER"] * 4 + ["O"] * 2, ["B-PER"] * 2, ["B-PER"] * 4 + ["O"]]


def test_a_stride_that_leaves_no_room_is_refused(tokenizer):
    with pytest.raises(DataError, match=r"data.window_stride=4 leaves no room"):
        encode_words(tokenizer, [["a"]], max_length=6, stride=4)


# ---------------------------------------------------------------------------------------------
# Raw text: entities as pipeline("token-classification", aggregation_strategy="simple")
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_model(tokenizer, tmp_path_factory):
    import torch
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(4)  # a seed whose random tags mix O, B- and I- and group several multi-token entities
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, id2label=dict(enumerate(names)),
                        label2id={n: i for i, n in enumerate(names)})  # fmt: skip
    model = BertForTokenClassification(config).eval()
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    path = tmp_path_factory.mktemp("tiny-ner")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


TEXTS = ["john smith met the goods in new york", "paris is very good, really!", "zebra smith in paris and lovely york",
         "the movie was great", "new york new york goods badly"]  # fmt: skip


def test_simple_entities_match_the_transformers_pipeline(token_model):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    expected = pipeline("token-classification", model=token_model, aggregation_strategy="simple", device="cpu")(TEXTS)
    tok = AutoTokenizer.from_pretrained(token_model)
    model = AutoModelForTokenClassification.from_pretrained(token_model).eval()
    groups = 0
    for text, want in zip(TEXTS, expected):
        enc = tok(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
        probs = torch.softmax(logits, -1).numpy()
        keep = [i for i, special in enumerate(enc["special_tokens_mask"]) if not special]
        got = simple_entities(text, [enc.tokens()[i] for i in keep], [enc["offset_mapping"][i] for i in keep],
                              probs[keep], model.config.id2label, tok.convert_tokens_to_string, tok.unk_token)  # fmt: skip
        assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in got] == [
            (e["entity_group"], e["word"], e["start"], e["end"]) for e in want], text  # fmt: skip
        assert [e["score"] for e in got] == pytest.approx([float(e["score"]) for e in want], abs=1e-6)
        groups += sum(len(tok.tokenize(e["word"])) > 1 for e in want)
    found = [e["word"] for e in sum(expected, [])]
    # The texts exercise grouping (entities of several tokens), O tokens left out, and an unknown word.
    assert groups >= 3 and len(found) < sum(len(tok.tokenize(t)) for t in TEXTS) and "zebra" in found
