"""What the local Hub stand-in (hub_server.py) serves for the Hub recipes: a tiny random BERT under
the id `bert-base-uncased`, and small parquet datasets laid out like `nyu-mll/glue` (sst2, mrpc,
stsb), `google-research-datasets/go_emotions` (simplified) and `lhoestq/conll2003` (words and
ClassLabel NER tags; a tiny random BERT as `bert-base-cased` too): one folder per config,
`{split}-00000-of-00001.parquet` files, and a README whose YAML `configs:` / `dataset_info:` give the
real column names, features and label names. Texts are made of the tiny tokenizer's vocabulary."""

import io
import random
from pathlib import Path

import yaml

from conftest import NEGATIVE, NEUTRAL, POSITIVE, make_tiny_checkpoint
from hub_server import HubRepo

SPLIT_SIZES = {"train": 40, "validation": 16, "test": 8}
GO_EMOTIONS = ("admiration amusement anger annoyance approval caring confusion curiosity desire disappointment "
               "disapproval disgust embarrassment excitement fear gratitude grief joy love nervousness optimism "
               "pride realization relief remorse sadness surprise neutral").split()  # fmt: skip
GLUE_LABELS = {"sst2": ["negative", "positive"], "mrpc": ["not_equivalent", "equivalent"]}
# lhoestq/conll2003's ner_tags names, in its ClassLabel order.
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def _sentence(rng, word=None):
    words = rng.sample(NEUTRAL, rng.randint(3, 7))
    words.insert(rng.randint(0, len(words)), word or rng.choice(POSITIVE + NEGATIVE))
    return " ".join(words)


def _glue_rows(config, split, rng):
    """Columns of one GLUE split; test splits carry label -1 (no label), as on the Hub."""
    rows = []
    for i in range(SPLIT_SIZES[split]):
        positive = i % 2 == 1
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        if config == "sst2":
            row = {"sentence": _sentence(rng, word), "label": int(positive)}
        else:
            first = _sentence(rng, word)
            second = " ".join(rng.sample(first.split(), len(first.split()))) if positive else _sentence(rng)
            label = int(positive) if config == "mrpc" else round(rng.uniform(3.0, 5.0) if positive else rng.uniform(0, 2), 2)
            row = {"sentence1": first, "sentence2": second, "label": label}
        rows.append({**row, "label": -1 if split == "test" else row["label"], "idx": i})
    return {name: [r[name] for r in rows] for name in rows[0]}


def _go_emotions_rows(split, rng):
    rows = {"text": [], "labels": [], "id": []}
    for i in range(SPLIT_SIZES[split]):
        labels = sorted(rng.sample(range(len(GO_EMOTIONS)), rng.choice([1, 1, 2])))
        rows["text"].append(_sentence(rng))
        rows["labels"].append(labels)
        rows["id"].append(f"e{rng.getrandbits(32):08x}")
    return rows


def _conll_rows(split, rng):
    """Sentences of the tiny vocabulary; a sentiment word is a person (alone, or two words: B-PER
    I-PER), 'movie' / 'film' a location."""
    rows = {"id": [], "tokens": [], "ner_tags": []}
    for i in range(SPLIT_SIZES[split]):
        words = rng.sample(NEUTRAL, rng.randint(3, 6))
        tags = [CONLL_TAGS.index("B-LOC") if w in ("movie", "film") else 0 for w in words]
        at = rng.randint(0, len(words))
        name = rng.sample(POSITIVE + NEGATIVE, rng.randint(1, 2))
        words[at:at] = name
        tags[at:at] = [CONLL_TAGS.index("B-PER")] + [CONLL_TAGS.index("I-PER")] * (len(name) - 1)
        rows["id"].append(str(i))
        rows["tokens"].append(words)
        rows["ner_tags"].append(tags)
    return rows


def _features(config):
    from datasets import ClassLabel, Features, List, Value

    if config == "conll2003":
        return Features({"id": Value("string"), "tokens": List(Value("string")),
                         "ner_tags": List(ClassLabel(names=CONLL_TAGS))})  # fmt: skip
    if config == "sst2":
        return Features({"sentence": Value("string"), "label": ClassLabel(names=GLUE_LABELS["sst2"]), "idx": Value("int32")})
    if config == "simplified":
        return Features({"text": Value("string"), "labels": List(ClassLabel(names=GO_EMOTIONS)), "id": Value("string")})
    label = ClassLabel(names=GLUE_LABELS["mrpc"]) if config == "mrpc" else Value("float32")
    return Features({"sentence1": Value("string"), "sentence2": Value("string"), "label": label, "idx": Value("int32")})


def _yaml_features(features):
    """The README's `features:` list as the Hub writes it (class_label names keyed '0', '1', ...)."""
    from datasets import ClassLabel, List

    def dtype(feature):
        if isinstance(feature, ClassLabel):
            return {"dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(feature.names)}}}}
        if isinstance(feature, List):
            return {"sequence": dtype(feature.feature)["dtype"]}
        return {"dtype": feature.dtype}

    return [{"name": name, **dtype(feature)} for name, feature in features.items()]


def _parquet(table) -> bytes:
    buffer = io.BytesIO()
    table.to_parquet(buffer)
    return buffer.getvalue()


def dataset_repo(title, configs, make_rows, seed=0, default=None) -> HubRepo:
    """A Hub dataset repo with one folder per config and a README describing each config."""
    from datasets import Dataset

    rng = random.Random(seed)
    files, card_configs, infos = {}, [], []
    for config in configs:
        features = _features(config)
        splits = []
        for split, rows in SPLIT_SIZES.items():
            table = Dataset.from_dict(make_rows(config, split, rng), features=features)
            files[f"{config}/{split}-00000-of-00001.parquet"] = _parquet(table)
            splits.append({"name": split, "num_bytes": table.data.nbytes, "num_examples": rows})
        card_configs.append({"config_name": config, **({"default": True} if config == default else {}),
                             "data_files": [{"split": s, "path": f"{config}/{s}-*"} for s in SPLIT_SIZES]})  # fmt: skip
        infos.append({"config_name": config, "features": _yaml_features(features),
                      "splits": splits})  # fmt: skip
    card = yaml.safe_dump({"configs": card_configs, "dataset_info": infos}, sort_keys=False)
    files["README.md"] = f"---\n{card}---\n\n# {title} (a small stand-in for tests)\n".encode()
    return HubRepo(files)


def model_repo(folder: Path) -> HubRepo:
    return HubRepo({p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()})


def served_repos(tmp: Path) -> dict:
    """(repo_type, repo_id) -> HubRepo for every Hub id the shipped recipes name."""
    return {
        ("model", "bert-base-uncased"): model_repo(make_tiny_checkpoint(tmp / "bert-base-uncased")),
        ("model", "bert-base-cased"): model_repo(make_tiny_checkpoint(tmp / "bert-base-cased")),
        ("dataset", "nyu-mll/glue"): dataset_repo("GLUE", ["mrpc", "sst2", "stsb"],
                                                  lambda config, split, rng: _glue_rows(config, split, rng)),
        ("dataset", "google-research-datasets/go_emotions"): dataset_repo(
            "GoEmotions", ["simplified"], lambda config, split, rng: _go_emotions_rows(split, rng), default="simplified"
        ),
        ("dataset", "lhoestq/conll2003"): dataset_repo(
            "CoNLL-2003", ["conll2003"], lambda config, split, rng: _conll_rows(split, rng), default="conll2003"
        ),
    }  # fmt: skip
