"""ONNX export (fp32 and int8), finetune.predict backend=onnx and finetune.serve of a token-classification
run (issues 21 and 22), on one tiny NER run (tests/ner_toy.py) that exported itself at the end of training."""

import json

import httpx
import numpy as np
import pytest

from ner_toy import ner_rows
from test_token_task import train_ner_world

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory):
    """(run directory with onnx/, validation file): the tiny NER BERT trained with save.export=onnx."""
    _, files, run, _ = train_ner_world(tmp_path_factory.mktemp("ner-export"), ner_rows(120, 1), ner_rows(30, 2),
                                       "save.export=onnx", "plots=false")  # fmt: skip
    return run, files["validation"]


@pytest.fixture(scope="module")
def plain_ner(ner_run, tmp_path_factory):
    """The run's token model saved as a Hub NER model is: save_pretrained, no finetune.json, no problem_type."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    run, _ = ner_run
    out = tmp_path_factory.mktemp("plain-ner") / "model"
    model = AutoModelForTokenClassification.from_pretrained(run / "model")
    model.config.problem_type = None
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(run / "model").save_pretrained(out)
    assert not (out / "finetune.json").exists() and json.loads((out / "config.json").read_text()).get("problem_type") is None
    return out


def validation_words(run):
    return [json.loads(line)["words"] for line in (run / "predictions" / "validation.jsonl").read_text().splitlines()]


def token_logits(model_dir, sentences, onnx_dir=None):
    """(per-token logits of a padded batch of word lists, straight from transformers or ONNX Runtime;
    its attention mask; the encoding)."""
    import torch
    from transformers import AutoTokenizer

    from finetune.model import load_saved_model

    enc = AutoTokenizer.from_pretrained(model_dir)(sentences, is_split_into_words=True, padding=True, truncation=True,
                                                   max_length=32, return_tensors="np")  # fmt: skip
    if onnx_dir is None:
        with torch.no_grad():
            model = load_saved_model(model_dir).eval()
            return model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy(), enc["attention_mask"] == 1, enc
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    return session.run(["logits"], feed)[0], enc["attention_mask"] == 1, enc


def first_piece_tags(logits, enc, names):
    """Per sentence, the tag at each word's first sub-token (the words the encoding holds)."""
    out = []
    for i, row in enumerate(logits):
        ids = enc.word_ids(i)
        firsts = [p for p, w in enumerate(ids) if w is not None and (p == 0 or ids[p - 1] != w)]
        out.append([names[int(row[p].argmax())] for p in firsts])
    return out


def test_training_export_of_a_token_run_matches_pytorch_per_token(ner_run):
    run, _ = ner_run
    meta = json.loads((run / "onnx" / "finetune.json").read_text())
    check = meta["export"]
    assert meta["task"] == "token_classification" and meta["tokens_column"] == "tokens"
    assert check["check_rows"] == 30 and "validation sentences of" in check["check_source"]
    assert check["max_abs_logit_diff"] <= 1e-4 and check["label_agreement"] is None and check["agreement_unit"] == "words"
    sentences = validation_words(run)
    for batch in (sentences[:7], sentences[7:10]):  # other batch sizes and lengths than the export's example
        (ref, mask, _), (got, _, _) = token_logits(run / "model", batch), token_logits(run / "model", batch, run / "onnx")
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
    assert head.op_type == "MatMul" and sum(n.op_type == "MatMulIntegerToFloat" for n in graph.node) == 12  # 2 layers x 6
    # Independently: the int8 graph tags the validation words (at their first sub-token) and finds
    # the entities as PyTorch does.
    from finetune.tagging import entities

    sentences = validation_words(run)
    names = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    ref, _, enc = token_logits(run / "model", sentences)
    got, _, _ = token_logits(run / "model", sentences, tmp_path / "int8")
    ref_tags, got_tags = first_piece_tags(ref, enc, names), first_piece_tags(got, enc, names)
    pairs = [(a, b) for r, g in zip(ref_tags, got_tags) for a, b in zip(r, g)]
    assert len(pairs) == sum(map(len, sentences)) and sum(a == b for a, b in pairs) / len(pairs) >= 0.99
    ref_entities = {(i, *e) for i, tags in enumerate(ref_tags) for e in entities(tags)}
    got_entities = {(i, *e) for i, tags in enumerate(got_tags) for e in entities(tags)}
    assert ref_entities and 2 * len(ref_entities & got_entities) / (len(ref_entities) + len(got_entities)) >= 0.99


def test_int8_gate_is_on_word_tags_and_leaves_nothing_behind(ner_run, tmp_path, monkeypatch):
    from finetune import export
    from finetune.export import ExportError

    run, _ = ner_run
    monkeypatch.setattr(export, "INT8_MIN_LABEL_AGREEMENT", 1.01)  # no int8 graph can pass
    with pytest.raises(ExportError, match=r"int8 model gives the same tag as PyTorch on only [\d.]+% of words \(entity "
                                          r"F1 against PyTorch's [\d.]+%\) of 30 validation sentences"):  # fmt: skip
        export.export_onnx(str(run), str(tmp_path / "int8"), quantize="int8")
    assert list(tmp_path.iterdir()) == []


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
    none = [np.eye(5)[[0] * 6], np.eye(5)[[0] * 4]]  # every word O on both sides: no entity to disagree on
    assert check.agreement(rows, none, none) == {"label_agreement": 1.0, "entity_agreement": 1.0}


def test_predict_backend_onnx_gives_pytorchs_tags_and_entities(ner_run):
    from finetune.predict import predict

    run, _ = ner_run
    words = [{"tokens": w} for w in validation_words(run)]
    import finetune.predict as predict_module

    seen_workers, ordered_outputs = [], predict_module.ordered_outputs

    def spy(runner, batches):
        seen_workers.append(runner.workers)
        return ordered_outputs(runner, batches)

    predict_module.ordered_outputs = spy
    try:  # threads=2: two batches of 4 sentences side by side, as for sequence models
        onnx_tags = predict(str(run), words, progress=False, backend="onnx", threads=2, batch_size=4)
    finally:
        predict_module.ordered_outputs = ordered_outputs
    assert seen_workers and set(seen_workers) == {2}
    assert onnx_tags == predict(str(run), words, progress=False, backend="torch")
    assert any(t != "O" for r in onnx_tags for t in r["tags"])  # the equality above is not all-O against all-O
    texts = [{"text": " ".join(w["tokens"])} for w in words] + [{"text": "johnson went to parisville today"}]
    torch_entities = predict(str(run), texts, progress=False)
    onnx_entities = predict(str(run / "onnx"), texts, progress=False)
    assert any(r["entities"] for r in torch_entities)
    for t, o in zip(torch_entities, onnx_entities):
        assert o["text"] == t["text"] and [{**e, "score": pytest.approx(e["score"], abs=1e-5)} for e in t["entities"]] \
            == o["entities"]  # fmt: skip


def test_token_predict_on_an_export_imports_neither_torch_nor_datasets(ner_run, tmp_path):
    from finetune.predict import predict, read_rows
    from test_export import onnx_process

    run, _ = ner_run
    words = [{"tokens": w} for w in validation_words(run)[:6]]
    for rows in (words, [{"text": " ".join(w["tokens"])} for w in words]):  # word lists; raw text
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        got, imported = onnx_process(run / "onnx", tmp_path / "rows.jsonl")
        assert imported == [] and got == predict(str(run / "onnx"), read_rows(str(tmp_path / "rows.jsonl")), progress=False)


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


def test_a_plain_token_folder_predicts_word_lists_and_text(ner_run, plain_ner):
    """A Hub NER model (no finetune.json, no problem_type) is read as token classification by its head."""
    from finetune.predict import predict

    run, _ = ner_run
    words = [{"tokens": w} for w in validation_words(run)[:8]]
    tags = predict(str(plain_ner), words, progress=False)
    assert tags == predict(str(run), words, progress=False) and any(t != "O" for r in tags for t in r["tags"])
    texts = [{"text": "johnson went to parisville today"}, {"text": "the anna met mary in london"}]
    entities = predict(str(plain_ner), texts, progress=False)
    assert entities == predict(str(run), texts, progress=False) and all(r["entities"] for r in entities)


def test_a_plain_token_folder_exports_with_the_word_check(plain_ner, tmp_path):
    from finetune.export import export_onnx
    from finetune.predict import predict

    report = export_onnx(str(plain_ner), str(tmp_path / "onnx"))
    meta = json.loads((tmp_path / "onnx" / "finetune.json").read_text())
    assert meta["task"] == "token_classification" and report.agreement_unit == "words"
    assert report.max_abs_logit_diff <= 1e-4 and report.check_source.startswith("built-in English sentences")
    words = [{"tokens": ["johnson", "went", "to", "parisville"]}, {"tokens": ["the", "anna", "met", "mary", "in", "london"]}]
    assert predict(str(tmp_path / "onnx"), words, progress=False) == predict(str(plain_ner), words, progress=False)


def test_the_torchscript_exporter_gives_token_logits_the_tasks_axes(ner_run, tmp_path):
    """The fallback exporter names the logits' dynamic axes from the task (Task.logit_axes): per token, a sequence axis."""
    import onnx
    from transformers import AutoTokenizer

    from finetune import export
    from finetune.model import load_saved_model
    from finetune.tasks import get_task

    run, _ = ner_run
    meta = json.loads((run / "onnx" / "finetune.json").read_text())
    check = get_task(meta["task"]).export_check(AutoTokenizer.from_pretrained(run / "model"), meta)
    export._export_graph(load_saved_model(run / "model").eval(), check, tmp_path / "model.onnx", 18, "torchscript")
    logits = onnx.load(str(tmp_path / "model.onnx")).graph.output[0]
    assert [d.dim_param for d in logits.type.tensor_type.shape.dim[:2]] == ["batch", "sequence"]


def fake_runner(batch):
    """Logits that say which token they belong to (its id), whatever the padding around it."""
    return np.stack([batch["input_ids"] * 1.0] + [np.zeros(batch["input_ids"].shape)] * 4, axis=-1)


def test_word_check_reads_a_windowed_run_in_windows(ner_run):
    """A run trained with data.long_text=window is checked on the windows finetune.predict reads, every word counted."""
    from transformers import AutoTokenizer

    from finetune.tasks import get_task
    from finetune.word_windows import encode_words

    run, _ = ner_run
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    meta = {**json.loads((run / "onnx" / "finetune.json").read_text()),
            "max_length": 8, "long_text": "window", "window_stride": 2}  # fmt: skip
    check = get_task(meta["task"]).export_check(tokenizer, meta)
    rows = [{"words": "the a met in went to and saw from is was today".split()}, {"words": ["john", "went", "to", "paris"]}]
    windows = encode_words(tokenizer, [r["words"] for r in rows], 8, 2)
    ref = check.outputs(fake_runner, rows)
    assert len(ref) == len(windows) > len(rows)
    assert [len(r) for r in ref] == [len(ids) for ids in windows.encoding["input_ids"]]
    got = [r.copy() for r in ref]
    got[len(windows) - 2][-2, 1] = 1e9  # "today", the first sentence's last word (its last window, before [SEP]): B-LOC
    assert check.agreement(rows, ref, got) == {"label_agreement": 15 / 16, "entity_agreement": 0.0}


def test_word_check_takes_each_rows_tokens_by_its_attention_mask(ner_run):
    from transformers import AutoTokenizer

    from finetune.tasks import get_task

    run, _ = ner_run
    meta = json.loads((run / "onnx" / "finetune.json").read_text())
    rows = [{"words": ["johnson", "went", "to", "parisville", "today"]}, {"words": ["to", "paris"]}]
    outputs = {}
    for side in ("right", "left"):
        tokenizer = AutoTokenizer.from_pretrained(run / "model", padding_side=side)
        outputs[side] = get_task(meta["task"]).export_check(tokenizer, meta).outputs(fake_runner, rows)
        own_tokens = tokenizer([r["words"] for r in rows], is_split_into_words=True)["input_ids"]
        assert [r[:, 0].tolist() for r in outputs[side]] == own_tokens
