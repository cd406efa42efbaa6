"""ONNX export (fp32 and int8), finetune.predict backend=onnx and finetune.serve of a token-classification
run (issues 21 and 22), on one tiny NER run (tests/ner_toy.py) that exported itself at the end of training."""

import json

import httpx
import numpy as np
import pytest

from ner_toy import make_ner_checkpoint, ner_rows, write_jsonl
from test_e2e import run_in_process
from test_token_task import ner_overrides

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory):
    """(run directory with onnx/, validation file): the tiny NER BERT trained with save.export=onnx."""
    import torch

    tmp = tmp_path_factory.mktemp("ner-export")
    checkpoint = make_ner_checkpoint(tmp / "bert")
    files = {"train": write_jsonl(tmp / "train.jsonl", ner_rows(120, 1)),
             "validation": write_jsonl(tmp / "validation.jsonl", ner_rows(30, 2))}  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_in_process(ner_overrides(checkpoint, files, tmp / "run", "save.export=onnx", "plots=false"))
    finally:
        torch.set_num_threads(threads)
    return tmp / "run", files["validation"]


def validation_words(run):
    return [json.loads(line)["words"] for line in (run / "predictions" / "validation.jsonl").read_text().splitlines()]


def token_logits(model_dir, sentences, onnx_dir=None):
    """(per-token logits of a padded batch of word lists, straight from transformers or ONNX Runtime;
    its attention mask)."""
    import torch
    from transformers import AutoTokenizer

    from finetune.model import load_saved_model

    enc = AutoTokenizer.from_pretrained(model_dir)(sentences, is_split_into_words=True, padding=True, truncation=True,
                                                   max_length=32, return_tensors="np")  # fmt: skip
    if onnx_dir is None:
        with torch.no_grad():
            model = load_saved_model(model_dir).eval()
            return model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy(), enc["attention_mask"] == 1
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    return session.run(["logits"], feed)[0], enc["attention_mask"] == 1


def test_training_export_of_a_token_run_matches_pytorch_per_token(ner_run):
    run, _ = ner_run
    meta = json.loads((run / "onnx" / "finetune.json").read_text())
    check = meta["export"]
    assert meta["task"] == "token_classification" and meta["tokens_column"] == "tokens"
    assert check["check_rows"] == 30 and "validation sentences of" in check["check_source"]
    assert check["max_abs_logit_diff"] <= 1e-4 and check["label_agreement"] is None and check["agreement_unit"] == "words"
    sentences = validation_words(run)
    for batch in (sentences[:7], sentences[7:10]):  # other batch sizes and lengths than the export's example
        (ref, mask), (got, _) = token_logits(run / "model", batch), token_logits(run / "model", batch, run / "onnx")
        assert got.shape == ref.shape and ref.ndim == 3 and np.abs(got - ref)[mask].max() <= 1e-4


def test_int8_export_of_a_token_run_is_checked_on_word_tags_and_entities(ner_run, tmp_path, capsys):
    import onnx

    from finetune import export

    run, _ = ner_run
    export.main([f"model={run}", "quantize=int8", f"output={tmp_path / 'int8'}"])
    out = capsys.readouterr().out
    assert "of words, entity F1 against PyTorch's 100.0%" in out
    check = json.loads((tmp_path / "int8" / "finetune.json").read_text())["export"]
    assert check["quantize"] == "int8" and check["label_agreement"] >= 0.99 and check["entity_agreement"] >= 0.99
    # The per-token classifier (a MatMul on [batch, sequence, hidden]) stays fp32, as a Gemm head would.
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    producer = {out: n for n in graph.node for out in n.output}
    head = next(producer[n.input[0]] for n in graph.node if n.op_type == "Add" and "classifier.bias" in n.input)
    assert head.op_type == "MatMul" and sum(n.op_type == "MatMulInteger" for n in graph.node) == 12  # 2 layers x 6
    # Independently: the int8 graph tags every validation word as PyTorch does.
    sentences = validation_words(run)
    (ref, mask), (got, _) = token_logits(run / "model", sentences), token_logits(run / "model", sentences, tmp_path / "int8")
    assert (ref.argmax(-1)[mask] == got.argmax(-1)[mask]).mean() >= 0.99


def test_word_check_counts_words_and_entities(ner_run):
    from transformers import AutoTokenizer

    from finetune.tasks import get_task

    run, _ = ner_run
    meta = json.loads((run / "onnx" / "finetune.json").read_text())  # O, B-LOC, I-LOC, B-PER, I-PER
    check = get_task("token_classification").export_check(AutoTokenizer.from_pretrained(run / "model"), meta)
    rows = [{"words": ["johnson", "mary", "went"]}, {"words": ["to", "paris"]}]
    # tokens: [CLS] john ##son mary went [SEP] / [CLS] to paris [SEP]; the argmax at each word's first piece
    ref = [np.eye(5)[[0, 3, 0, 4, 0, 0]], np.eye(5)[[0, 0, 1, 0]]]  # PER(johnson mary), LOC(paris)
    got = [np.eye(5)[[0, 3, 4, 0, 0, 0]], np.eye(5)[[0, 0, 1, 0]]]  # PER(johnson), LOC(paris): "mary" tagged O
    assert check.agreement(rows, ref, got) == {"label_agreement": 4 / 5, "entity_agreement": 2 * 1 / (2 + 2)}  # LOC agrees
    assert check.agreement(rows, ref, ref) == {"label_agreement": 1.0, "entity_agreement": 1.0}


def test_predict_backend_onnx_gives_pytorchs_tags_and_entities(ner_run):
    from finetune.predict import predict

    run, _ = ner_run
    words = [{"tokens": w} for w in validation_words(run)]
    onnx_tags = predict(str(run), words, progress=False, backend="onnx")
    assert onnx_tags == predict(str(run), words, progress=False, backend="torch")
    texts = [{"text": " ".join(w["tokens"])} for w in words] + [{"text": "johnson went to parisville today"}]
    torch_entities = predict(str(run), texts, progress=False)
    onnx_entities = predict(str(run / "onnx"), texts, progress=False)
    assert any(r["entities"] for r in torch_entities)
    for t, o in zip(torch_entities, onnx_entities):
        assert o["text"] == t["text"] and [{**e, "score": pytest.approx(e["score"], abs=1e-5)} for e in t["entities"]] \
            == o["entities"]  # fmt: skip


def test_serve_answers_a_token_run_with_finetune_predicts_entities(ner_run, tmp_path):
    from finetune.predict import predict
    from test_serve import Server

    run, _ = ner_run
    texts = ["johnson went to parisville today", "the anna met mary in london", "a maryson saw berlin"]
    expected = predict(str(run), [{"text": t} for t in texts], progress=False)
    server = Server(run, ("max_wait_ms=1",), tmp_path / "serve.log")
    try:
        server.wait_ready()
        info = httpx.get(f"{server.url}/info").json()
        assert info["task"] == "token_classification" and info["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
        answer = server.post({"inputs": texts})
        assert answer.status_code == 200, answer.text
        got = answer.json()["predictions"]
    finally:
        server.stop()
    assert [g["text"] for g in got] == texts and any(g["entities"] for g in got)
    for g, e in zip(got, expected):
        assert g["entities"] == [{**x, "score": pytest.approx(x["score"], abs=1e-5)} for x in e["entities"]]
