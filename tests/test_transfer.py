"""Transfer learning across encoder architectures: freezing, adapters, reloads (tiny random models)."""

import re

import pytest
import torch

from conftest import VOCAB, make_tokenizer
from finetune.adapters import AdapterError
from finetune.config import AdapterConfig, AdapterType, ModelConfig
from finetune.model import (
    ModelError,
    build_model,
    layer_depths,
    load_saved_model,
    save_merged,
    save_model,
    unfreeze_next_layer,
)
from finetune.optim import build_optimizer
from finetune.config import OptimizerConfig

LABELS = {0: "sports", 1: "world", 2: "business"}

# Per architecture, written out by hand (not derived from finetune's code): where the embeddings
# and the encoder layers live, which modules form the classification head.
ARCH = {
    "bert": dict(emb="bert.embeddings.", layers="bert.encoder.layer.", head=["classifier"]),
    "roberta": dict(emb="roberta.embeddings.", layers="roberta.encoder.layer.", head=["classifier"]),
    "distilbert": dict(emb="distilbert.embeddings.", layers="distilbert.transformer.layer.",
                       head=["pre_classifier", "classifier"]),
    "deberta-v2": dict(emb="deberta.embeddings.", layers="deberta.encoder.layer.", head=["pooler", "classifier"]),
    "modernbert": dict(emb="model.embeddings.", layers="model.layers.", head=["head", "classifier"]),
}  # fmt: skip


def tiny_config(arch):
    from transformers import BertConfig, DebertaV2Config, DistilBertConfig, ModernBertConfig, RobertaConfig

    common = dict(vocab_size=len(VOCAB), max_position_embeddings=64, pad_token_id=0)
    if arch == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **common)
    if arch == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                             **{**common, "max_position_embeddings": 66})  # fmt: skip
    if arch == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, **common)
    if arch == "deberta-v2":
        return DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                               **common)  # fmt: skip
    return ModernBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                            bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3, **common)  # fmt: skip


@pytest.fixture(scope="session", params=list(ARCH))
def checkpoint(request, tmp_path_factory):
    """(arch, path): a tiny 'pre-trained' encoder of this architecture, saved without a head."""
    from transformers import AutoModel, BertTokenizer

    arch = request.param
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(arch.replace("-", "_"))
    AutoModel.from_config(tiny_config(arch)).save_pretrained(path)
    inputs = ["input_ids", "attention_mask"] + ([] if arch in ("distilbert", "modernbert") else ["token_type_ids"])
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, model_input_names=inputs).save_pretrained(path)
    return arch, str(path)


def batch(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["the movie was great", "a dull boring plot", "it was fine and very nice"], padding=True,
              return_tensors="pt")  # fmt: skip
    enc["labels"] = torch.tensor([0, 1, 2])
    return enc


def train_steps(model, enc, steps=3, lr=1e-2):
    optimizer = build_optimizer(model, OptimizerConfig(), lr)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**{k: v for k, v in enc.items() if k != "labels"}).logits,
                                                 enc["labels"])  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def expected_trainable(arch, names, spec):
    a = ARCH[arch]
    in_head = lambda n: any(n.startswith(h + ".") for h in a["head"])  # noqa: E731
    if spec == "none":
        frozen = lambda n: False  # noqa: E731
    elif spec == "base":
        frozen = lambda n: not in_head(n)  # noqa: E731
    elif spec == "embeddings":
        frozen = lambda n: n.startswith(a["emb"])  # noqa: E731
    elif spec.startswith("layers:"):
        k = int(spec.split(":")[1])
        frozen = lambda n: n.startswith(a["emb"]) or any(n.startswith(f"{a['layers']}{i}.") for i in range(k))  # noqa: E731
    else:
        frozen = lambda n: re.search(spec[len("regex:"):], n) is not None and not in_head(n)  # noqa: E731
    return {n for n in names if not frozen(n)}


@pytest.mark.parametrize("spec", ["none", "base", "embeddings", "layers:1", "layers:2", r"regex:\.(query|key|value|q_lin|k_lin|v_lin|query_proj|key_proj|value_proj|Wqkv)\."])
def test_freeze_strategies_freeze_exactly_and_frozen_weights_stay_bit_identical(checkpoint, spec):
    arch, path = checkpoint
    model, info = build_model(ModelConfig(name_or_path=path, freeze=spec), AdapterConfig(), LABELS)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(arch, names, spec)
    assert sorted(info.head_modules) == sorted(ARCH[arch]["head"])
    if spec != "none":
        assert len(trainable) < len(names)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, batch(path))
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} should have changed"
        else:
            assert torch.equal(param, before[name]), f"{name} should be bit-identical"


def test_layers_beyond_depth_and_regex_matching_nothing_fail_listing_what_is_valid(checkpoint):
    arch, path = checkpoint
    with pytest.raises(ModelError, match=r"has 2 encoder layers; valid: layers:0 \.\. layers:2"):
        build_model(ModelConfig(name_or_path=path, freeze="layers:3"), AdapterConfig(), LABELS)
    with pytest.raises(ModelError, match="matches no parameter"):
        build_model(ModelConfig(name_or_path=path, freeze="regex:no_such_module"), AdapterConfig(), LABELS)
    with pytest.raises(AdapterError, match=r"not Linear layers.*valid: \["):
        build_model(ModelConfig(name_or_path=path), AdapterConfig(type=AdapterType.lora, target_modules=["nope"]), LABELS)


@pytest.mark.parametrize("adapter_type", [AdapterType.lora, AdapterType.ia3])
def test_adapters_reload_with_standard_loaders_and_merge_for_pipeline(checkpoint, adapter_type, tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    arch, path = checkpoint
    model, info = build_model(ModelConfig(name_or_path=path), AdapterConfig(type=adapter_type), LABELS)
    assert info.adapter_targets and info.trainable_params < info.total_params
    enc = batch(path)
    train_steps(model, enc, lr=5e-2)
    inputs = {k: v for k, v in enc.items() if k != "labels"}
    with torch.no_grad():
        trained = model(**inputs).logits

    tok = AutoTokenizer.from_pretrained(path)
    save_model(model, tok, tmp_path / "adapter", LABELS)
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(
        str(tmp_path / "adapter"), num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained)
        torch.testing.assert_close(load_saved_model(tmp_path / "adapter").eval()(**inputs).logits, trained)

    save_merged(model, tok, tmp_path / "merged", LABELS)
    clf = pipeline("text-classification", model=str(tmp_path / "merged"), top_k=None)
    scores = {d["label"]: d["score"] for d in clf(["the movie was great"])[0]}
    assert set(scores) == set(LABELS.values())
    expected = torch.softmax(trained[0], -1)
    for i, name in LABELS.items():
        assert scores[name] == pytest.approx(expected[i].item(), abs=1e-5)


def test_added_tokens_train_under_freezing_and_reload(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from finetune.model import load_tokenizer

    cfg = ModelConfig(name_or_path=tiny_bert, freeze="base", add_tokens=["covid19", "mrna"])
    tok = load_tokenizer(cfg)
    model, info = build_model(cfg, AdapterConfig(), LABELS, tokenizer=tok)
    old = len(VOCAB)
    assert info.new_token_ids == [old, old + 1]
    enc = tok(["covid19 mrna the movie", "a dull covid19 plot", "mrna great"], padding=True, return_tensors="pt")
    assert old in enc["input_ids"] and tok.unk_token_id not in enc["input_ids"]
    enc["labels"] = torch.tensor([0, 1, 2])
    emb_before = model.get_input_embeddings().weight.detach().clone()
    train_steps(model, enc)
    emb = model.get_input_embeddings().weight.detach()
    assert torch.equal(emb[:old], emb_before[:old])
    assert not torch.equal(emb[old:], emb_before[old:])

    save_model(model, tok, tmp_path / "m", LABELS)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert torch.equal(again.get_input_embeddings().weight, emb)


def test_head_dropout_and_reinit_head(checkpoint, tmp_path):
    arch, path = checkpoint
    model, info = build_model(ModelConfig(name_or_path=path, head_dropout=0.37), AdapterConfig(), LABELS)
    base = getattr(model, model.base_model_prefix)
    base_dropouts = {id(m) for m in base.modules()}
    head_p = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and id(m) not in base_dropouts]
    head_p += [m.drop_prob for m in model.modules() if type(m).__name__ == "StableDropout"]
    assert 0.37 in head_p

    # A fine-tuned checkpoint of the same label count keeps its head... unless reinit_head.
    save_model(model, make_tokenizer(), tmp_path / "ft", LABELS)
    head = ARCH[arch]["head"][-1]
    kept, _ = build_model(ModelConfig(name_or_path=str(tmp_path / "ft")), AdapterConfig(), LABELS)
    fresh, _ = build_model(ModelConfig(name_or_path=str(tmp_path / "ft"), reinit_head=True), AdapterConfig(), LABELS)
    key = next(n for n, p in model.named_parameters() if n.startswith(head + ".") and p.ndim == 2)
    w = lambda m: dict(m.named_parameters())[key]  # noqa: E731
    assert torch.equal(w(kept), w(model)) and not torch.equal(w(fresh), w(model))


def test_gradual_unfreezing_and_layer_depths(tiny_bert):
    model, _ = build_model(ModelConfig(name_or_path=tiny_bert, freeze="base"), AdapterConfig(), LABELS)
    assert unfreeze_next_layer(model) == "bert.encoder.layer.1"
    assert all(p.requires_grad for p in model.bert.encoder.layer[1].parameters())
    assert not any(p.requires_grad for p in model.bert.encoder.layer[0].parameters())
    assert unfreeze_next_layer(model) == "bert.encoder.layer.0"
    assert unfreeze_next_layer(model) == "bert.embeddings"
    depths = layer_depths(model)
    assert depths["bert.embeddings.word_embeddings.weight"] == 0
    assert depths["bert.encoder.layer.1.attention.self.query.weight"] == 2
    assert depths["classifier.weight"] == 3


def test_layer_decay_gives_each_depth_its_rate(tiny_bert):
    model, _ = build_model(ModelConfig(name_or_path=tiny_bert), AdapterConfig(), LABELS)
    opt = build_optimizer(model, OptimizerConfig(layer_decay=0.5), 1e-3, depths=layer_depths(model))
    rate = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert rate["classifier.weight"] == pytest.approx(1e-3)
    assert rate["bert.encoder.layer.1.output.dense.weight"] == pytest.approx(5e-4)
    assert rate["bert.encoder.layer.0.output.dense.weight"] == pytest.approx(2.5e-4)
    assert rate["bert.embeddings.word_embeddings.weight"] == pytest.approx(1.25e-4)
    decay = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert decay["bert.encoder.layer.0.output.LayerNorm.weight"] == 0.0 and decay["classifier.bias"] == 0.0
    assert decay["classifier.weight"] == 0.01


def _reload_matches(model, tok, tmp_path, inputs):
    with torch.no_grad():
        trained = model.eval()(**inputs).logits
    save_model(model, tok, tmp_path / "adapter", LABELS)
    with torch.no_grad():
        torch.testing.assert_close(load_saved_model(tmp_path / "adapter").eval()(**inputs).logits, trained)


def test_any_peft_method_through_adapter_peft(tiny_bert, tmp_path):
    adapter = AdapterConfig(type=AdapterType.peft, peft_type="loha", options={"r": 4, "alpha": 8})
    model, info = build_model(ModelConfig(name_or_path=tiny_bert), adapter, LABELS)
    assert type(model.peft_config["default"]).__name__ == "LoHaConfig"
    assert info.adapter_targets == ["query", "key", "value"]
    assert any("hada_w1" in n for n, p in model.named_parameters() if p.requires_grad)
    enc = batch(tiny_bert)
    train_steps(model, enc, lr=5e-2)
    _reload_matches(model, make_tokenizer(), tmp_path, {k: v for k, v in enc.items() if k != "labels"})

    bad = AdapterConfig(type=AdapterType.peft, peft_type="loha", options={"rank": 4})
    with pytest.raises(AdapterError, match=r"\['rank'\] are not fields of peft.LoHaConfig; valid: \[.*'r'"):
        build_model(ModelConfig(name_or_path=tiny_bert), bad, LABELS)
    with pytest.raises(AdapterError, match="is not a PEFT method; valid"):
        build_model(ModelConfig(name_or_path=tiny_bert), AdapterConfig(type=AdapterType.peft, peft_type="nope"), LABELS)


def test_added_tokens_with_lora_train_and_reload(tiny_bert, tmp_path):
    from finetune.model import load_tokenizer

    cfg = ModelConfig(name_or_path=tiny_bert, add_tokens=["covid19"])
    tok = load_tokenizer(cfg)
    model, info = build_model(cfg, AdapterConfig(type=AdapterType.lora), LABELS, tokenizer=tok)
    assert info.new_token_ids == [len(VOCAB)]
    enc = tok(["covid19 the movie", "a dull covid19 plot", "great"], padding=True, return_tensors="pt")
    enc["labels"] = torch.tensor([0, 1, 2])
    train_steps(model, enc, lr=5e-2)
    _reload_matches(model, tok, tmp_path, {k: v for k, v in enc.items() if k != "labels"})
