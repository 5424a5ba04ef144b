"""Train building blocks without Ray: the loss on a hand-computed example, batching, shards, mining."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from stm_ray.data.shards import SHARD_COLUMNS, read_shards, write_shard
from stm_ray.data.task import DataError, DataReport
from stm_ray.train.batching import TrainRows, build_batch, plan_batches, text_key, worker_slice
from stm_ray.train.loss import contrastive_step_loss, info_nce

# Two queries, docs [p1, p2, n1, n2]; cosine similarities are the dot products below (all unit vectors).
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
D = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
# q1 logits / 0.5: [2, 0, 1.2, 1.6], target 0; q2: [0, 2, 1.6, 1.2], target 1 -> both log(e^2+1+e^1.2+e^1.6) - 2
HAND = math.log(math.e**2 + 1 + math.e**1.2 + math.e**1.6) - 2  # 0.813143...


def test_info_nce_matches_hand_computation():
    assert HAND == pytest.approx(0.813143, abs=1e-6)
    loss = info_nce(Q, D, torch.tensor([0, 1]), temperature=0.5)
    assert loss.item() == pytest.approx(HAND, abs=1e-6)
    # scaling an embedding changes nothing: cosine similarity
    assert info_nce(3 * Q, 2 * D, torch.tensor([0, 1]), temperature=0.5).item() == pytest.approx(HAND, abs=1e-6)


def test_info_nce_masks_padding_and_false_negatives():
    valid = torch.tensor([True, True, False, True])  # n1 is a padding slot
    q1_no_n1 = math.log(math.e**2 + 1 + math.e**1.6) - 2  # n1 was q1's 1.2 logit
    q2_no_n1 = math.log(1 + math.e**2 + math.e**1.2) - 2  # and q2's 1.6 logit
    loss = info_nce(Q, D, torch.tensor([0, 1]), temperature=0.5, doc_valid=valid)
    assert loss.item() == pytest.approx((q1_no_n1 + q2_no_n1) / 2, abs=1e-6)
    # n2 is the text of q1's positive: not a negative for q1 (it still is for q2)
    keys = torch.tensor([11, 22, 33, 11])
    q1 = math.log(math.e**2 + 1 + math.e**1.2) - 2
    loss = info_nce(Q, D, torch.tensor([0, 1]), temperature=0.5, doc_keys=keys, positive_keys=keys[:2])
    assert loss.item() == pytest.approx((q1 + HAND) / 2, abs=1e-6)


def test_info_nce_gradient_pushes_positive_up():
    q = torch.tensor([[0.6, 0.8], [0.0, 1.0]], requires_grad=True)
    loss = info_nce(q, D, torch.tensor([0, 1]), temperature=0.5)
    loss.backward()
    # turning q1 toward its positive [1, 0] (tangent direction [0.8, -0.6]) lowers the loss
    assert float(q.grad[0] @ torch.tensor([0.8, -0.6])) < 0


def test_step_loss_layout_single_worker():
    # B=2 queries, 1 negative slot each: docs = [p1, p2, n(q1), n(q2)]
    loss = contrastive_step_loss(Q, D, n_neg=1, doc_valid=torch.ones(4, dtype=torch.bool),
                                 doc_keys=torch.arange(4), temperature=0.5, gather=True)
    assert loss.item() == pytest.approx(HAND, abs=1e-6)


def test_plan_batches_same_task_complete_and_worker_independent():
    tasks = ["a"] * 10 + ["b"] * 7 + ["c"] * 3
    plan = plan_batches(tasks, 4, 2, seed=1, epoch=0)
    assert all(len({tasks[i] for i in b}) == 1 for b in plan)  # homogeneous
    assert all(len(set(b.tolist())) == len(b) for b in plan)  # no row twice in a batch
    used = set(np.concatenate(plan).tolist())
    assert set(range(17)) <= used and len(used - set(range(17))) == 2  # a, b complete; c (3 < 4 rows) rounded to 2
    assert [len(b) for b in plan].count(4) == 5 and sorted(len(b) for b in plan)[0] == 2
    tasks = tasks[:17]
    plan = plan_batches(tasks, 4, 2, seed=1, epoch=0)
    again = plan_batches(tasks, 4, 1, seed=1, epoch=0)
    assert [b.tolist() for b in again] == [b.tolist() for b in plan]  # the plan does not depend on workers
    assert [b.tolist() for b in plan_batches(tasks, 4, 2, seed=1, epoch=1)] != [b.tolist() for b in plan]
    assert worker_slice(np.arange(8), 1, 2).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="multiple of train.num_workers"):
        plan_batches(tasks, 5, 2, seed=1, epoch=0)


def _rows() -> TrainRows:
    return TrainRows(queries=["qa", "qb"], positives=["pa", "pb"], negatives=[["n1", "n2", "n3"], []],
                     instructions=["Row A: ", "Row B: "], tasks=["t", "t"])


def test_build_batch_negatives_and_instruction_modes():
    rows = _rows()
    b = build_batch(rows, np.array([0, 1]), n_neg=2, instruction_mode="fixed", fixed_instruction="Q: ", pool=[],
                    seed=0, step=0)
    assert b.queries == ["Q: qa", "Q: qb"]
    assert b.docs[:2] == ["pa", "pb"] and len(b.docs) == 4  # 2 positives + 2 negatives of qa; qb has none
    assert b.doc_valid.tolist() == [True, True, True, True, False, False]
    assert set(b.docs[2:]) <= {"n1", "n2", "n3"} and len(set(b.docs[2:])) == 2
    assert b.doc_keys[0].item() == text_key("pa")
    b = build_batch(rows, np.array([0, 1]), n_neg=1, instruction_mode="row", fixed_instruction="", pool=[], seed=0, step=0)
    assert b.queries == ["Row A: qa", "Row B: qb"]
    pool = ["I1: ", "I2: ", "I3: "]
    seen = set()
    for step in range(20):
        b = build_batch(rows, np.array([0]), n_neg=1, instruction_mode="pool", fixed_instruction="", pool=pool,
                        seed=0, step=step)
        seen.add(b.queries[0].split(" ")[0])
    assert seen == {"I1:", "I2:", "I3:"}  # sampled per query and step
    # sentences (the instruction pools Synthesize writes) become "Instruct: ...\nQuery: " prefixes
    sentence = TrainRows(queries=["qa"], positives=["pa"], negatives=[[]], instructions=["Find the code"], tasks=["t"])
    for mode, pool in (("row", []), ("pool", ["Find the code"])):
        b = build_batch(sentence, np.array([0]), n_neg=0, instruction_mode=mode, fixed_instruction="", pool=pool,
                        seed=0, step=0)
        assert b.queries == ["Instruct: Find the code\nQuery: qa"]


def _shard_rows(n=3):
    return [{"query_id": f"q{i}", "query": f"query {i}", "positive_id": f"d{i}", "positive": f"doc {i}",
             "negatives": ["neg"], "negative_sources": ["synthetic"], "instruction": "", "task": "t", "expert": "e"}
            for i in range(n)]


def test_shards_roundtrip_and_validation(tmp_path):
    rows = _shard_rows()
    rows[1]["positive"] = " "
    rows[2]["negative_sources"] = ["typo"]
    write_shard(pa.Table.from_pylist(rows), tmp_path / "s" / "part-00000.parquet")
    (tmp_path / "s" / ".part-00001.parquet.tmp").write_bytes(b"half")  # an in-flight temp file is ignored
    report = DataReport()
    t = read_shards(tmp_path / "s", report=report)
    assert t.num_rows == 1 and t.column_names == list(SHARD_COLUMNS)
    assert report.counts() == {"positive: empty": 1, "negative_sources: unknown source": 1}
    assert "part-00000.parquet:1: field 'positive': empty" in str(report.problems[0])
    with pytest.raises(DataError, match=r"part-00000.parquet:1: field 'positive': empty \(strict mode\)"):
        read_shards(tmp_path / "s", strict=True)
    pa_t = pa.Table.from_pylist(_shard_rows()).drop_columns(["expert"])
    import pyarrow.parquet as pq

    pq.write_table(pa_t, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: missing column\(s\) expert"):
        read_shards(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="no such shard folder"):
        read_shards(tmp_path / "nowhere")


def test_select_negatives_positive_aware_filter():
    from stm_ray.synth.mine import mine_bm25, mine_dense, select_negatives

    idx = np.array([[0, 1, 2, 3]])
    scores = np.array([[0.99, 0.97, 0.90, 0.5]])
    out = select_negatives(idx, scores, np.array([1.0]), [{0}], count=2, margin=0.95)
    assert out.indices == [[2, 3]] and out.dropped_as_false_negative == 1  # 0 judged, 1 above 0.95 x positive

    corpus = ["cholera water bacteria", "cholera outbreak water", "asthma airways", "diabetes glucose"]
    emb = np.eye(4, dtype=np.float32) + 0.1
    dense = mine_dense(emb[:1], emb, [[0]], [{0}], depth=3, count=1, margin=0.95)
    assert dense.indices[0] and 0 not in dense.indices[0]
    bm = mine_bm25(["cholera water"], corpus, [[0]], [{0}], depth=3, count=1, margin=1.0)
    assert bm.indices == [[1]]  # the other cholera document, the positive excluded


def test_stale_extension_lock_is_removed(tmp_path, monkeypatch):
    import os
    import time

    from stm_ray.train.worker import clear_stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other_op" / "lock"
    for p in (old, fresh):
        p.parent.mkdir(parents=True)
        p.touch()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert clear_stale_extension_locks(600) == [old]
    assert not old.exists() and fresh.exists()  # a build in progress keeps its lock
