from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from stm_ray.data import load_task
from stm_ray.eval import evaluate, evaluate_run, exact_search
from stm_ray.eval.metrics import ndcg_at_k, rank
from stm_ray.modeling import Embedder
from tests.conftest import DOCS, write_beir


def test_ndcg_hand_computed_with_linear_gains():
    rel = {"a": 2, "b": 1, "c": 0}
    ranked = ["c", "b", "a"]
    dcg = 0 / math.log2(2) + 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(ranked, rel, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["x"], rel, 10) == 0.0


def test_ties_break_by_document_id_descending():
    assert rank({"d1": 0.5, "d3": 0.5, "d2": 0.9}) == ["d2", "d3", "d1"]


def test_metrics_equal_pytrec_eval_on_random_runs():
    import pytrec_eval

    rng = random.Random(0)
    docs = [f"d{i}" for i in range(60)]
    qrels = {f"q{i}": {d: rng.choice([0, 1, 1, 2]) for d in rng.sample(docs, rng.randint(1, 5))} for i in range(40)}
    qrels = {q: r for q, r in qrels.items() if any(v > 0 for v in r.values())}
    run = {q: {d: round(rng.random(), 2) for d in rng.sample(docs, 30)} for q in qrels}  # rounding makes ties
    ours, _ = evaluate_run(run, qrels, [1, 5, 10])
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,5,10", "recall.1,5,10"})
    ref = ev.evaluate(run)
    for k in (1, 5, 10):
        assert ours[f"ndcg_at_{k}"] == pytest.approx(np.mean([v[f"ndcg_cut_{k}"] for v in ref.values()]), abs=1e-12)
        assert ours[f"recall_at_{k}"] == pytest.approx(np.mean([v[f"recall_{k}"] for v in ref.values()]), abs=1e-12)


def test_chunked_search_equals_brute_force():
    rng = np.random.default_rng(0)
    q, c = rng.normal(size=(37, 16)), rng.normal(size=(1000, 16))
    s, i = exact_search(q, c, top_k=10, corpus_chunk_size=64, query_chunk_size=5)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    full = qn @ cn.T
    np.testing.assert_array_equal(i, np.argsort(-full, axis=1)[:, :10])
    np.testing.assert_allclose(s, np.sort(full, axis=1)[:, ::-1][:, :10], atol=1e-5)


def test_our_ndcg_equals_mteb_on_the_same_run_tiny(tiny_bert_dir, tiny_beir, tmp_path):
    e = Embedder.from_pretrained(tiny_bert_dir, query_instruction="query: ")
    r = evaluate(e, f"beir:{tiny_beir}", "test", use_mteb=True, output=tmp_path / "r.json", show_progress=False)
    assert r.mteb_scores is not None
    for key in ("ndcg_at_10", "recall_at_10", "mrr_at_10"):
        assert round(r.scores[key], 4) == round(r.mteb_scores[key], 4), key


def test_our_ndcg_equals_mteb_minilm_icd10_subset():
    e = Embedder.from_pretrained("minilm")
    r = evaluate(e, "icd10:3,7", "test", use_mteb=True, show_progress=False)
    assert r.num_queries > 30
    assert round(r.ndcg_at_10, 4) == round(r.mteb_scores["ndcg_at_10"], 4)
    assert 0.1 < r.ndcg_at_10 < 0.95


def test_results_json_is_mteb_format(tiny_bert_dir, tiny_beir, tmp_path):
    import mteb

    out = tmp_path / "r.json"
    r = evaluate(tiny_bert_dir, f"beir:{tiny_beir}", "test", output=out, show_progress=False)
    data = json.loads(out.read_text())
    assert data["scores"]["test"][0]["ndcg_at_10"] == pytest.approx(r.ndcg_at_10)
    assert data["scores"]["test"][0]["main_score"] == pytest.approx(r.ndcg_at_10)
    tr = mteb.TaskResult.model_validate({k: v for k, v in data.items() if k != "stm_ray"})
    assert tr.scores["test"][0]["ndcg_at_10"] == pytest.approx(r.ndcg_at_10)


def test_cli_evaluate_prints_table_and_writes_json(tiny_bert_dir, tiny_beir, tmp_path, capsys):
    from stm_ray.cli import main

    out = tmp_path / "res.json"
    assert main(["evaluate", "--model", tiny_bert_dir, "--task", f"beir:{tiny_beir}", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NDCG@10" in text and f"beir:{tiny_beir}" in text
    assert "ndcg_at_10" in json.loads(out.read_text())["scores"]["test"][0]
    assert main(["evaluate", "--model", tiny_bert_dir, "--task", f"beir:{tiny_beir}", "--split", "dev"]) == 2
    assert "no split 'dev'" in capsys.readouterr().err


def test_search_uses_all_documents_across_chunks(tiny_bert_dir, tiny_beir):
    from stm_ray.config import EvalConfig

    e = Embedder.from_pretrained(tiny_bert_dir)
    a = evaluate(e, f"beir:{tiny_beir}", eval_cfg=EvalConfig(corpus_chunk_size=3), show_progress=False)
    b = evaluate(e, f"beir:{tiny_beir}", eval_cfg=EvalConfig(corpus_chunk_size=1000), show_progress=False)
    assert a.scores == pytest.approx(b.scores)
    assert load_task(f"beir:{tiny_beir}").corpus.num_rows == 8


def test_scores_per_dimension_equal_a_truncated_model(tiny_bert_dir, tiny_beir):
    """eval.dimensions scores cuts of the same encode; each equals encoding with the embedder itself truncating."""
    from stm_ray.config import EvalConfig
    from stm_ray.eval.evaluate import evaluate_split

    e = Embedder.from_pretrained(tiny_bert_dir)
    res = evaluate(e, f"beir:{tiny_beir}", eval_cfg=EvalConfig(dimensions=[64, 32, 8, 4]), show_progress=False)
    assert sorted(res.by_dimension) == [4, 8]  # 32 is the full size, 64 above it: not cuts
    assert res.to_mteb_json()["stm_ray"]["by_dimension"]["8"] == res.by_dimension[8]
    e.truncate_dim = 4
    assert e.encode_corpus(["wheezing"]).shape == (1, 4)
    split = load_task(f"beir:{tiny_beir}").split("test")
    cut = evaluate_split(e, split, k_values=(10,), top_k=10)
    assert cut.scores["ndcg_at_10"] == pytest.approx(res.by_dimension[4]["ndcg_at_10"])
    assert cut.scores["ndcg_at_10"] != pytest.approx(res.ndcg_at_10)  # 4 of 32 coordinates rank differently


@pytest.mark.slow
@pytest.mark.scifact
def test_minilm_reproduces_mteb_scifact():
    from tests.conftest import SCIFACT

    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT} (set STM_RAY_SCIFACT to a BEIR SciFact folder)")
    r = evaluate("minilm", f"beir:{SCIFACT}", "test", show_progress=False)
    assert r.num_queries == 300
    assert r.ndcg_at_10 == pytest.approx(0.6451, abs=0.001)


def test_base_evaluation_reuses_the_corpus_embeddings_mining_cached(tiny_bert_dir, beir_train_dev, tmp_path):
    """The evaluate stage and the searches' dev sets take the base model's corpus embeddings from the cache that
    dense mining wrote (same model config, same corpus) instead of encoding the corpus again; a different corpus
    or model config never finds them."""
    from stm_ray.config import load_config
    from stm_ray.eval.evaluate import evaluate_tasks
    from stm_ray.synth.negatives import cached_corpus_embeddings, corpus_cache_path
    from stm_ray.tune.dev import cached_dev_embeddings, dev_sets

    spec = f"beir:{beir_train_dev}"
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.tasks=[{spec}]",
                             f"model.name_or_path={tiny_bert_dir}", "search.dev_corpus_size=5",
                             "search.dev_max_queries=3", "search.dev_pool_depth=1"])
    task = load_task(spec)
    assert cached_corpus_embeddings(cfg, spec, cfg.model, task) is None
    fresh = evaluate_tasks(cfg, show_progress=False)[0]
    emb = Embedder.from_config(cfg.model)
    real = emb.encode_corpus(task.doc_texts())
    path = corpus_cache_path(tmp_path / "run" / "synth", spec, cfg.model, task)
    path.parent.mkdir(parents=True)
    np.save(path, real)
    again = evaluate_tasks(cfg, show_progress=False)[0]
    assert again.ndcg_at_10 == pytest.approx(fresh.ndcg_at_10) and again.task == spec
    # the cache is what is used: reversed document embeddings score differently
    np.save(path, real[::-1].copy())
    assert evaluate_tasks(cfg, show_progress=False)[0].scores != fresh.scores
    # the dev sets get the rows of their pooled documents, in their order
    np.save(path, real)
    dev = dev_sets(cfg)
    assert len(dev[0].corpus) == 5
    cut = cached_dev_embeddings(cfg, dev, cfg.model)
    np.testing.assert_allclose(cut[0], emb.encode_corpus(dev[0].corpus), atol=1e-5)
    # another model config or another corpus: no cache
    other = cfg.model.model_copy(update={"max_length": 16})
    assert cached_corpus_embeddings(cfg, spec, other, task) is None and cached_dev_embeddings(cfg, dev, other) is None
    changed = write_beir(tmp_path / "changed", docs={**DOCS, "d1": ("Other", "another text")})
    assert corpus_cache_path(tmp_path / "run" / "synth", spec, cfg.model, load_task(f"beir:{changed}")) != path
