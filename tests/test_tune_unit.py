"""Search building blocks without a cluster: instruction prefixes, pooled dev corpora, grids, candidates."""

from __future__ import annotations

import json

import pytest

from stm_ray.config import load_config
from stm_ray.data import RetrievalSplit
from stm_ray.merge.search import _grid_points, _read_point
from stm_ray.modeling import instruction_prefix
from stm_ray.tune.dev import pooled_split


def test_instruction_prefix():
    assert instruction_prefix(None) == "" and instruction_prefix("  ") == ""
    assert instruction_prefix("Find the code") == "Instruct: Find the code\nQuery: "
    assert instruction_prefix("query: ") == "query: "
    assert instruction_prefix("Instruct: x\nQuery: ") == "Instruct: x\nQuery: "


def _split(n_docs=50):
    ids = [f"d{i}" for i in range(n_docs)]
    docs = [f"document {i} about {'asthma' if i % 7 == 0 else 'fracture'} number {i}" for i in range(n_docs)]
    return RetrievalSplit("t", "dev", ["q1", "q2"], ["asthma attack", "fracture of femur"], ids, docs,
                          {"q1": {"d3": 1}, "q2": {"d44": 2, "d45": 0}})


def test_pooled_split_keeps_judged_and_bm25_candidates():
    sp = _split()
    pooled = pooled_split(sp, 10, depth=3)
    assert len(pooled.corpus_ids) == 10
    assert {"d3", "d44", "d45"} <= set(pooled.corpus_ids)
    assert "d7" in pooled.corpus_ids or "d0" in pooled.corpus_ids  # BM25 hits for "asthma"
    assert pooled.corpus == [sp.corpus[int(d[1:])] for d in pooled.corpus_ids]  # ids and texts stay aligned
    assert pooled_split(sp, 10, depth=3).corpus_ids == pooled.corpus_ids  # deterministic
    assert pooled_split(sp, 100, depth=3) is sp and pooled_split(sp, None, depth=3) is sp


def test_grid_points_follow_the_paper_grid():
    pts = _grid_points(["a", "b"], ["linear", "ties"], [0.0, 0.5, 1.0], [0.3, 0.6])
    assert len([p for p in pts if p["method"] == "linear"]) == 9
    assert len([p for p in pts if p["method"] == "ties"]) == 18
    default = load_config(None, []).merge
    assert len(_grid_points(["a", "b"], ["linear"], default.weight_grid, default.density_grid)) == 100
    with_base = _grid_points(["a", "base"], ["linear", "ties"], [0.0, 1.0], [0.5])
    assert all("w_base" not in p for p in with_base if p["method"] == "ties")
    assert _read_point({"point": pts[-1]}, ["a", "b"]) == ("ties", {"a": 1.0, "b": 1.0}, 0.6)
    assert _read_point({"method": "linear", "w_a": 0.2, "w_b": 0.0, "density": 0.9}, ["a", "b"]) == \
        ("linear", {"a": 0.2, "b": 0.0}, None)


def test_candidates_include_none_builtins_config_and_synth_pool(tmp_path, tiny_beir):
    from stm_ray.tune import candidate_instructions

    (tmp_path / "synth" / "instructions").mkdir(parents=True)
    (tmp_path / "synth" / "instructions" / "t.json").write_text(json.dumps({"instructions": ["Pooled one", "Mine"]}))
    (tmp_path / "synth" / "instructions" / "bad.json").write_text("{not json")
    cfg = load_config(None, [f"run_dir={tmp_path}", f"data.tasks=[beir:{tiny_beir}]", "search.instructions=[Mine]"])
    c = candidate_instructions(cfg)
    assert c[0] == "" and "Mine" in c and "Pooled one" in c and len(c) == len(set(c))
    off = candidate_instructions(cfg.model_copy(update={"search": cfg.search.model_copy(update={"use_synth_pool": False})}))
    assert "Pooled one" not in off


@pytest.mark.parametrize("bad", ["merge.methods=[slerp]", "merge.weight_step=0", "search.searcher=bayes"])
def test_bad_search_config_is_a_clear_error(bad):
    from stm_ray.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[-1]):
        load_config(None, [bad])


def test_embedder_formats_query_instructions_only(tiny_bert_dir):
    from stm_ray.modeling import Embedder

    emb = Embedder.from_pretrained(tiny_bert_dir, query_instruction="Find the code", document_instruction="passage:")
    assert emb.query_instruction == "Instruct: Find the code\nQuery: "
    assert emb.document_instruction == "passage:"  # a document prefix is never wrapped as a query instruction
    emb.query_instruction = "Match the query"  # setting a sentence later stores the prefix too
    assert emb.query_instruction == "Instruct: Match the query\nQuery: "
    emb.query_instruction = None
    assert emb.query_instruction == ""


def test_dev_score_at_a_chosen_dimension(tiny_bert_dir, tiny_beir):
    """merge.dimension: trials are scored on cut embeddings, as the Embedder cutting them itself would score."""
    from stm_ray.data import load_task
    from stm_ray.modeling import Embedder
    from stm_ray.tune.dev import score_embedder

    sp = load_task(f"beir:{tiny_beir}").split("test")
    sp.task = "t"
    emb = Embedder.from_pretrained(tiny_bert_dir)
    full, cut = score_embedder(emb, [sp]), score_embedder(emb, [sp], dimension=4)
    emb.truncate_dim = 4
    assert cut.as_dict() == score_embedder(emb, [sp]).as_dict() and cut.ndcg_at_10 != full.ndcg_at_10
    assert load_config(None, ["merge.dimension=128"]).merge.dimension == 128


def test_merge_trials_fit_the_time_budget(caplog):
    """A merge search that would run for hours on this machine runs the trials that fit, and says so."""
    from stm_ray.merge.search import MERGE_S, MIN_TRIALS, trial_budget

    assert trial_budget(24, 10.0, 1, None) == 24
    assert trial_budget(24, 10.0, 1, 1800.0) == 24  # 24 x 15 s fits
    with caplog.at_level("WARNING"):
        n = trial_budget(24, 300.0, 1, 1800.0)  # ~5 min per trial (the corpus): 2 h -> 5 trials
    assert n == int(1800 // (300 + MERGE_S)) == 5
    assert "24 trials would take about 122 min" in caplog.text and "merge.time_budget_s=null" in caplog.text
    assert trial_budget(24, 3000.0, 1, 1800.0) == MIN_TRIALS
    assert trial_budget(24, 300.0, 2, 1800.0) == 11  # two at once
