"""Distillation: teacher scores (a reranker, or LLM feedback through vLLM) written as shard columns, and the
distillation losses (KL, LLM-Embedder's stabilized form, MarginMSE) next to InfoNCE in Ray Train."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import make_shards


def _student(seed: int = 0, b: int = 4, n: int = 3, d: int = 8):
    from stm_ray.train.loss import masked_logits

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g, requires_grad=True)
    docs = torch.randn(b * (1 + n), d, generator=g, requires_grad=True)
    target = torch.arange(b)
    logits = masked_logits(q, docs, target, temperature=0.05)
    group = torch.cat([target[:, None], b + torch.arange(b * n).reshape(b, n)], dim=1)
    return q, docs, logits, group


@pytest.mark.parametrize("kind", ["kl", "stabilized", "margin_mse"])
def test_a_teacher_in_the_wrong_order_gives_a_larger_loss(kind):
    from stm_ray.train.loss import distill_loss

    q, docs, logits, group = _student()
    agree = logits.gather(1, group).detach()  # a teacher that ranks as the student does
    right = distill_loss(logits, group, agree, kind=kind)
    wrong = distill_loss(logits, group, -agree, kind=kind)
    right, wrong_value = float(right.detach()), float(wrong.detach())
    assert wrong_value > right + 1.0, (kind, right, wrong_value)
    if kind != "stabilized":  # the student already matches this teacher
        assert right == pytest.approx(0.0, abs=1e-5)
    wrong.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_stabilized_equals_its_definition():
    """LLM-Embedder's form by hand for one query: candidates by teacher rank (positive first), each a cross-entropy
    over the whole row with the ones above it masked, weighted by the teacher's softmax."""
    from stm_ray.train.loss import distill_loss

    _, _, logits, group = _student(seed=3, b=1)
    teacher = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    got = distill_loss(logits, group, teacher, kind="stabilized", teacher_temperature=0.5)
    w = torch.softmax(teacher[0] / 0.5, dim=0)
    order = [0, 2, 3, 1]  # positive, then negatives by teacher score
    row, total, hidden = logits[0].detach(), 0.0, []
    for k in order:
        col = int(group[0, k])
        keep = [c for c in range(len(row)) if c not in hidden]
        total += float(w[k]) * -(row[col] - torch.logsumexp(row[keep], 0)).item()
        hidden.append(col)
    assert float(got) == pytest.approx(total, rel=1e-5)


def test_unscored_and_masked_candidates_are_left_out():
    from stm_ray.train.loss import distill_loss, masked_logits

    q, docs, logits, group = _student()
    t = logits.gather(1, group).detach().clone()
    t[1, 2] = math.nan  # one candidate without a score
    t[2] = math.nan  # a row without scores
    valid = torch.ones(len(docs), dtype=torch.bool)
    valid[4 + 3 * 3 + 1] = False  # a padding slot of query 3
    masked = masked_logits(q, docs, torch.arange(4), temperature=0.05, doc_valid=valid)
    for kind in ("kl", "stabilized", "margin_mse"):
        loss = distill_loss(masked, group, t, kind=kind)
        loss.backward(retain_graph=True)
        assert torch.isfinite(loss) and torch.isfinite(q.grad).all()
        q.grad = None
    nothing = distill_loss(logits, group, torch.full_like(t, math.nan), kind="kl")
    assert float(nothing) == 0.0


def test_contrastive_step_adds_weighted_distillation():
    from stm_ray.train.loss import contrastive_step_loss, distill_loss, info_nce

    q, docs, logits, group = _student()
    valid = torch.ones(len(docs), dtype=torch.bool)
    keys = torch.arange(len(docs))
    teacher = -logits.gather(1, group).detach()
    kw = dict(n_neg=3, doc_valid=valid, doc_keys=keys, temperature=0.05, gather=True)
    plain = contrastive_step_loss(q, docs, **kw)
    assert float(plain) == pytest.approx(float(info_nce(q, docs, torch.arange(4), temperature=0.05)))
    d = SimpleNamespace(loss="kl", weight=0.3, teacher_temperature=1.0)
    both = contrastive_step_loss(q, docs, teacher=teacher, distill=d, **kw)
    assert float(both) == pytest.approx(float(plain) + 0.3 * float(distill_loss(logits, group, teacher)), rel=1e-5)


def test_shard_schema_2_and_older_shards(tmp_path):
    from stm_ray.data.shards import SCHEMA_VERSION, VERSION_KEY, read_shards, write_shard
    from stm_ray.data.task import DataError, DataReport
    from stm_ray.train.batching import TrainRows, build_batch

    rows = [{"query_id": f"q{i}", "query": f"query {i}", "positive_id": f"d{i}", "positive": f"doc {i}",
             "negatives": ["bm25 one", "llm one", "dense one"],
             "negative_sources": ["mined-bm25", "synthetic", "mined-dense"], "instruction": "", "task": "t",
             "expert": "e"} for i in range(4)]
    old = pa.Table.from_pylist(rows)
    pq.write_table(old, tmp_path / "v1.parquet")  # schema 1: no score columns
    t1 = read_shards(tmp_path / "v1.parquet")
    assert t1.column("positive_score").null_count == 4
    r1 = TrainRows.from_table(t1, scores=True)
    assert r1.scored == 0
    assert torch.isnan(build_batch(r1, np.arange(4), n_neg=2, instruction_mode="fixed", fixed_instruction="",
                                   pool=[], seed=1, step=0).teacher).all()

    scored = [{**r, "positive_score": 10.0 + i, "negative_scores": [1.0, 2.0, 3.0]} for i, r in enumerate(rows)]
    scored[1]["negative_scores"] = [1.0]  # wrong length
    scored[2]["positive_score"] = None
    scored[2]["negative_scores"] = None  # an unscored row is fine
    path = write_shard(pa.Table.from_pylist(scored), tmp_path / "v2" / "part-00000.parquet")
    assert pq.read_schema(path).metadata[VERSION_KEY] == str(SCHEMA_VERSION).encode()
    report = DataReport()
    t2 = read_shards(tmp_path / "v2", report=report)
    assert t2.num_rows == 3 and "field 'negative_scores': length 1 differs from negatives (3)" in str(report.problems[0])
    with pytest.raises(DataError, match=r"part-00000.parquet:1: field 'negative_scores'"):
        read_shards(tmp_path / "v2", strict=True)

    # scores follow their negatives through the source filter and the per-step sampling
    r2 = TrainRows.from_table(t2, ["synthetic", "mined-dense"], scores=True)
    assert r2.negatives[0] == ["llm one", "dense one"] and r2.negative_scores[0] == [2.0, 3.0]
    assert r2.scored == 2 and r2.positive_scores[1] is None
    b = build_batch(r2, np.arange(3), n_neg=2, instruction_mode="fixed", fixed_instruction="", pool=[], seed=5, step=7)
    flat = b.docs[3:]  # the negatives of the three rows, in slot order
    score_of = {"llm one": 2.0, "dense one": 3.0}
    assert b.teacher[0, 0] == 10.0 and [float(x) for x in b.teacher[0, 1:]] == [score_of[x] for x in flat[:2]]
    assert torch.isnan(b.teacher[1]).all()


def test_llm_feedback_prompts_and_mean_logprob(tiny_llama_dir):
    from transformers import AutoTokenizer

    from stm_ray.teacher.scores import feedback_prompts, mean_logprob

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    items = [{"query": "salmonella fever", "document": "Salmonella infection from food. " * 200},
             {"query": "flu", "document": "Influenza is a viral infection."}]
    feedback_prompts(items, tok, "Write a query.\n\nDocument: {document}", max_len=128)
    for it in items:
        assert len(it["ids"]) <= 128
        assert tok.decode(it["ids"][it["prefix"]:]) == it["query"]
        assert tok.decode(it["ids"][:it["prefix"]]).rstrip().endswith("assistant")
    ids = [5, 6, 7, 8]
    lps = [None, {"6": {"logprob": -1.0}}, {7: {"logprob": -2.0}, 9: {"logprob": -0.1}}, {8: {"logprob": -3.0}}]
    assert mean_logprob(lps, ids, 2) == pytest.approx(-2.5)
    assert math.isnan(mean_logprob(lps, ids, 0))


def test_teacher_config_errors(tmp_path):
    from stm_ray.config import ConfigError, load_config
    from stm_ray.pipeline import run_pipeline
    from stm_ray.teacher.scores import teacher_fingerprint

    with pytest.raises(ConfigError, match="teacher.kind=reranker needs teacher.reranker"):
        load_config(None, ["teacher.kind=reranker"])
    with pytest.raises(ConfigError, match="train.distill needs teacher scores"):
        load_config(None, ["train.distill.loss=kl"])
    with pytest.raises(ConfigError, match="needs synth.engine=vllm"):
        load_config(None, ["teacher.kind=llm", "synth.engine=openai", "synth.base_url=http://127.0.0.1:1/v1"])
    with pytest.raises(ConfigError, match="stage 'teacher' needs teacher.kind"):
        run_pipeline(load_config(None, [f"run_dir={tmp_path}"]), stages=["teacher"], show_progress=False)
    shards = make_shards(tmp_path / "s", "t", experts=("e",))
    cfg = load_config(None, [f"run_dir={tmp_path}", "teacher.kind=reranker", "teacher.reranker=nowhere",
                             f"train.shards={shards}"])
    with pytest.raises(ConfigError, match="no reranker folder at nowhere"):
        teacher_fingerprint(cfg)
    named = load_config(None, [f"run_dir={tmp_path}", "teacher.kind=reranker", "teacher.reranker=cross-encoder",
                               "rerank.rerankers=[cross-encoder]", f"train.shards={shards}"])
    with pytest.raises(ConfigError, match="the rerankers stage writes it"):
        teacher_fingerprint(named)


@pytest.mark.slow  # ~80 s; the losses and the teacher config are unit-tested in the fast tier
def test_reranker_teacher_and_distilled_training_on_ray(tmp_path, ray_local, tiny_beir, tiny_bert_dir):
    """The loop's teacher and train stages: a cross-encoder's logits become the shards' score columns (equal to
    its own scores), an expert trains with them (KL next to InfoNCE: another loss curve than InfoNCE alone), a
    rerun reuses both, and a changed teacher redoes the scores, which makes the expert's fingerprint change."""
    from stm_ray.config import load_config
    from stm_ray.data.shards import read_shards
    from stm_ray.pipeline import run_pipeline
    from stm_ray.rerank.model import CrossEncoderReranker, load_reranker

    shards = make_shards(tmp_path / "shards", f"beir:{tiny_beir}", experts=("alpha",), copies=2)
    CrossEncoderReranker.from_pretrained(tiny_bert_dir, max_length=64).save(tmp_path / "ce")
    base = [f"data.tasks=[beir:{tiny_beir}]", f"train.shards={shards}", f"model.name_or_path={tiny_bert_dir}",
            "train.batch_size=4", "train.max_steps=4", "train.evaluate_dev=false", "train.negatives_per_query=2",
            "train.learning_rate=1e-3", "train.checkpoint_every=100"]
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *base, "teacher.kind=reranker",
                             f"teacher.reranker={tmp_path / 'ce'}", "teacher.batch_size=8",
                             "train.distill.loss=kl", "train.distill.weight=2.0"])
    m = run_pipeline(cfg, stages=["teacher", "train", "evaluate"], show_progress=False)
    st = m["stages"]
    assert st["teacher"]["status"] == "done" and st["train"]["status"] == "done"
    assert set(st["evaluate"]["counts"]["ndcg_at_10"]) == {"base", "expert-alpha"}
    c = st["teacher"]["counts"]
    n = read_shards(shards).num_rows
    assert c["rows"] == c["rows_scored"] == n and c["pairs"] == 3 * n and c["pairs_failed"] == 0
    scored = read_shards(tmp_path / "run" / "teacher")
    assert scored.num_rows == n and scored.column("positive_score").null_count == 0
    ce = load_reranker(str(tmp_path / "ce"))
    row = scored.slice(0, 1).to_pylist()[0]
    want = ce.score_pairs([row["query"]] * 3, [row["positive"], *row["negatives"]], logits=True)
    np.testing.assert_allclose([row["positive_score"], *row["negative_scores"]], want, rtol=1e-4, atol=1e-5)
    distilled = json.loads((tmp_path / "run" / "experts" / "alpha" / "metrics.json").read_text())["loss"]
    from stm_ray.report import write_report

    assert "## Teacher scores" in write_report(tmp_path / "run").read_text()

    plain_cfg = load_config(None, [f"run_dir={tmp_path / 'plain'}", *base])
    run_pipeline(plain_cfg, stages=["train"], show_progress=False)
    plain = json.loads((tmp_path / "plain" / "experts" / "alpha" / "metrics.json").read_text())["loss"]
    assert len(plain) == len(distilled) == 4 and abs(distilled[0] - plain[0]) > 1e-3

    again = run_pipeline(cfg, stages=["teacher", "train"], show_progress=False)["stages"]
    assert again["teacher"]["action"] == "reused" and again["train"]["action"] == "reused"
    # another teacher: new scores, so the expert is trained again
    ce2 = CrossEncoderReranker.from_pretrained(tiny_bert_dir, max_length=32)
    ce2.save(tmp_path / "ce2")
    cfg2 = load_config(None, [f"run_dir={tmp_path / 'run'}", *base, "teacher.kind=reranker",
                              f"teacher.reranker={tmp_path / 'ce2'}", "train.distill.loss=kl",
                              "train.distill.weight=2.0"])
    redo = run_pipeline(cfg2, stages=["teacher"], show_progress=False)["stages"]["teacher"]
    assert redo["action"] == "redone" and redo["counts"]["rows_scored"] == n
    from stm_ray.train.batching import TrainRows
    from stm_ray.train.experts import decide_expert

    rows2 = TrainRows.from_table(read_shards(tmp_path / "run" / "teacher"), scores=True)
    assert decide_expert(cfg2, "alpha", rows2, [])[1].action == "redo"  # new scores: the expert trains again


@pytest.mark.slow  # a vLLM engine start on the CPU (~1-2 min)
def test_llm_feedback_through_vllm_equals_transformers(tmp_path, ray_local, tiny_beir, tiny_llama_dir, tiny_bert_dir):
    """The LLM-feedback reward read from vLLM's prompt log-probabilities (ray.data.llm) equals the mean token
    log-probability of the query that transformers computes for the same prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stm_ray.config import load_config
    from stm_ray.data.shards import read_shards
    from stm_ray.teacher.scores import feedback_prompts, teacher_scores

    shards = make_shards(tmp_path / "shards", f"beir:{tiny_beir}", experts=("alpha",), copies=1)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"train.shards={shards}", "teacher.kind=llm",
                             f"teacher.generator={tiny_llama_dir}", "synth.max_model_len=256", "synth.max_num_seqs=8",
                             "synth.batch_size=16"])
    counts = teacher_scores(cfg, show_progress=False)
    assert counts["rows_scored"] == counts["rows"] == read_shards(shards).num_rows and counts["pairs_failed"] == 0
    row = read_shards(tmp_path / "run" / "teacher").slice(0, 1).to_pylist()[0]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    items = [{"query": row["query"], "document": d[:cfg.teacher.max_document_chars]}
             for d in [row["positive"], *row["negatives"]]]
    feedback_prompts(items, tok, cfg.teacher.template, 255)
    want = []
    for it in items:
        ids = torch.tensor([it["ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(lm(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        want.append(float(lp[it["prefix"] - 1:].mean()))
    np.testing.assert_allclose([row["positive_score"], *row["negative_scores"]], want, atol=2e-3)
    assert Path(tmp_path / "run" / "teacher" / "manifest.json").is_file()


@pytest.mark.slow  # ~1.5 min: two DeepSpeed workers
def test_distillation_on_two_deepspeed_workers_equals_one_worker(ray_local, tiny_bert_nodrop_dir, beir_train_dev,
                                                                 tmp_path):
    """Stabilized distillation with the cross-worker gather: 2 DeepSpeed ZeRO-2 workers (GradCache) give the loss
    curve of one plain worker."""
    from stm_ray.config import load_config
    from stm_ray.data.shards import read_shards, write_shard
    from stm_ray.train import train_experts

    src = read_shards(make_shards(tmp_path / "shards", f"beir:{beir_train_dev}", experts=("solo",), copies=5))
    rng = np.random.default_rng(0)
    t = src.drop_columns(["positive_score", "negative_scores"])
    t = t.append_column("positive_score", pa.array(rng.normal(2, 1, t.num_rows)))
    t = t.append_column("negative_scores", pa.array([list(rng.normal(0, 1, 2)) for _ in range(t.num_rows)]))
    write_shard(t, tmp_path / "scored" / "part-00000.parquet")

    def curve(workers: int, *extra: str) -> list[float]:
        cfg = load_config(None, [f"run_dir={tmp_path / f'w{workers}{len(extra)}'}", f"model.name_or_path={tiny_bert_nodrop_dir}",
                                 f"train.shards={tmp_path / 'scored'}", "train.batch_size=8", "data.dev_split=dev",
                                 f"train.num_workers={workers}", "train.max_steps=4", "train.lora.dropout=0.0",
                                 "train.evaluate_dev=false", "train.learning_rate=1e-3", "train.negatives_per_query=2",
                                 "train.checkpoint_every=100", "train.distill.loss=stabilized",
                                 "train.distill.weight=0.5", *extra])
        [res] = train_experts(cfg, show_progress=False)
        return json.loads((Path(res.path) / "metrics.json").read_text())["loss"]

    one = curve(1)
    two = curve(2, "train.strategy=deepspeed", "train.zero_stage=2", "train.grad_cache=2")
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
