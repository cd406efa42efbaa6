"""Loading with a fresh head, freezing, LoRA targets and saving."""

import pytest
import torch

from finetune.config import AdapterConfig, AdapterType, ModelConfig
from finetune.adapters import AdapterError
from finetune.model import ModelError, build_model, load_trainable_state, save_model, trainable_state

LABELS = {0: "negative", 1: "positive", 2: "neutral"}


def test_fresh_head_with_label_maps(tiny_bert):
    model, info = build_model(ModelConfig(name_or_path=tiny_bert), AdapterConfig(), LABELS)
    assert model.config.num_labels == 3
    assert model.config.id2label == LABELS and model.config.label2id["neutral"] == 2
    assert info.head_modules == ["classifier"]
    assert info.trainable_params == info.total_params


def test_freeze_base_trains_only_the_head(tiny_bert):
    model, info = build_model(ModelConfig(name_or_path=tiny_bert, freeze="base"), AdapterConfig(), LABELS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    assert info.trainable_params == 32 * 3 + 3


def test_lora_auto_targets_attention_and_keeps_head_trainable(tiny_bert):
    adapter = AdapterConfig(type=AdapterType.lora, r=4, alpha=8)
    model, info = build_model(ModelConfig(name_or_path=tiny_bert), adapter, LABELS)
    assert info.adapter_targets == ["query", "key", "value"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n and "query" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    assert not any("intermediate" in n or "word_embeddings" in n for n in trainable)
    assert 0 < info.trainable_params < info.total_params


def test_wrong_lora_target_lists_the_valid_ones(tiny_bert):
    adapter = AdapterConfig(type=AdapterType.lora, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=r"\['q_proj'\] are not Linear layers.*valid: \[.*'query'.*\]"):
        build_model(ModelConfig(name_or_path=tiny_bert), adapter, LABELS)


def test_config_overrides_reach_the_built_model_and_a_misspelt_field_is_an_error(tiny_bert):
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.25}
    model, _ = build_model(ModelConfig(name_or_path=tiny_bert, config_overrides=overrides), AdapterConfig(), LABELS)
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.25
    # The modules are built from the overridden config (dropout is fixed when the model is built).
    assert model.bert.encoder.layer[0].output.dropout.p == 0.0
    assert model.bert.encoder.layer[0].attention.self.dropout.p == 0.25
    with pytest.raises(ModelError, match=r"model.config_overrides.hiden_dropout_prob: BertConfig has no field.*hidden_dropout_prob"):
        build_model(ModelConfig(name_or_path=tiny_bert, config_overrides={"hiden_dropout_prob": 0.0}), AdapterConfig(), LABELS)
    # Labels come from the data, and a method is no field.
    for key in ("num_labels", "to_dict"):
        with pytest.raises(ModelError, match=rf"model.config_overrides.{key}: '{key}' is not a field finetune lets you"):
            build_model(ModelConfig(name_or_path=tiny_bert, config_overrides={key: 1}), AdapterConfig(), LABELS)


def test_a_misspelt_config_override_fails_in_the_early_model_check(tiny_bert):
    from transformers import AutoTokenizer

    from finetune.model import check_model

    cfg = ModelConfig(name_or_path=tiny_bert, config_overrides={"hiden_dropout_prob": 0.0})
    with pytest.raises(ModelError, match="hiden_dropout_prob"):
        check_model(cfg, AdapterConfig(), AutoTokenizer.from_pretrained(tiny_bert), 32)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model.name_or_path='.*nothing-here'"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "nothing-here")), AdapterConfig(), LABELS)


def test_best_state_round_trip_restores_trainable_weights(tiny_bert):
    model, _ = build_model(ModelConfig(name_or_path=tiny_bert, freeze="base"), AdapterConfig(), LABELS)
    saved = trainable_state(model)
    assert set(saved) == {"classifier.weight", "classifier.bias"}
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    load_trainable_state(model, saved)
    assert torch.equal(model.classifier.weight, saved["classifier.weight"])


def test_saved_full_model_reloads_with_label_names(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, _ = build_model(ModelConfig(name_or_path=tiny_bert), AdapterConfig(), LABELS)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    save_model(model, tok, tmp_path / "model", LABELS)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert again.config.id2label == LABELS
    batch = tok(["the movie was great"], return_tensors="pt")
    model.eval()
    assert torch.equal(model(**batch).logits, again(**batch).logits)


def test_checkpoint_with_another_head_size_gets_a_fresh_head(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    three, _ = build_model(ModelConfig(name_or_path=tiny_bert), AdapterConfig(), LABELS)
    save_model(three, AutoTokenizer.from_pretrained(tiny_bert), tmp_path / "three", LABELS)
    two, info = build_model(ModelConfig(name_or_path=str(tmp_path / "three")), AdapterConfig(), {0: "no", 1: "yes"})
    assert two.classifier.out_features == 2 and two.config.id2label == {0: "no", 1: "yes"}
    assert info.head_modules == ["classifier"]
    # The encoder weights came from the checkpoint.
    assert torch.equal(two.bert.encoder.layer[0].attention.self.query.weight,
                       three.bert.encoder.layer[0].attention.self.query.weight)  # fmt: skip
