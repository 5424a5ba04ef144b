"""Ray Train integration on a local Ray (127.0.0.1): experts in parallel, 2 workers = 1 worker, a killed worker
resumes from its checkpoint, DeepSpeed, a decoder expert. Real Ray Train, peft, DeepSpeed, sentence-transformers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_shards

RAY_ENV = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}


def _cfg(tmp_path: Path, model: str, shards: Path, *extra: str):
    from stm_ray.config import load_config

    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.name_or_path={model}", f"train.shards={shards}",
                              "train.batch_size=4", "train.checkpoint_every=3", "data.dev_split=dev", *extra])


def _st_matches_embedder(path: str, texts: list[str], prompt_name: str | None = None) -> None:
    from sentence_transformers import SentenceTransformer

    from stm_ray.modeling import Embedder

    st = SentenceTransformer(path, device="cpu")
    ours = Embedder.from_pretrained(path)
    a = st.encode(texts, prompt_name=prompt_name, normalize_embeddings=True)
    b = ours.encode_queries(texts) if prompt_name == "query" else ours.encode_corpus(texts)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_two_experts_train_in_parallel_and_load_in_sentence_transformers(ray_local, tiny_bert_dir, beir_train_dev,
                                                                          tmp_path):
    from stm_ray.train import summary_table, train_experts

    shards = make_shards(tmp_path / "shards", f"beir:{beir_train_dev}")
    cfg = _cfg(tmp_path, tiny_bert_dir, shards, "train.epochs=2", "train.matryoshka_dims=[16,32]")
    results = train_experts(cfg, show_progress=False)
    assert sorted(r.name for r in results) == ["alpha", "beta"]
    a, b = results
    assert a.started_at < b.finished_at and b.started_at < a.finished_at  # the two runs overlapped in time
    for r in results:
        assert r.steps == 8 and r.rows == 16 and not r.resumed_from  # 16 rows / batch 4 x 2 epochs
        metrics = json.loads((Path(r.path) / "metrics.json").read_text())
        assert len(metrics["loss"]) == 8 and all(np.isfinite(metrics["loss"]))
        assert 0.0 <= r.dev_ndcg_at_10[f"beir:{beir_train_dev}"] <= 1.0
        assert (Path(r.path) / "loss.png").stat().st_size > 1000
        _st_matches_embedder(r.path, ["broken thigh bone", "Asthma is a chronic disease"])
    # Matryoshka: the dimensions are recorded; sentence-transformers' truncate_dim gives our truncated embeddings
    from sentence_transformers import SentenceTransformer

    from stm_ray.modeling import Embedder

    assert json.loads((Path(a.path) / "stm_ray.json").read_text())["matryoshka_dims"] == [32, 16]
    assert json.loads((Path(a.path) / "config_sentence_transformers.json").read_text())["matryoshka_dims"] == [32, 16]
    ours = Embedder.from_pretrained(a.path)
    assert ours.matryoshka_dims == [32, 16]
    ours.truncate_dim = 16
    st16 = SentenceTransformer(a.path, device="cpu", truncate_dim=16).encode(["broken thigh bone"],
                                                                              normalize_embeddings=True)
    np.testing.assert_allclose(st16, ours.encode_corpus(["broken thigh bone"]), atol=1e-5)
    summary = json.loads((tmp_path / "run" / "experts" / "summary.json").read_text())
    assert summary["base"]["dev_ndcg_at_10"] and [e["name"] for e in summary["experts"]] == ["alpha", "beta"]
    assert "alpha" in summary_table(results, summary["base"]["dev_ndcg_at_10"])
    # the experts differ from the base and from each other (they trained on different rows)
    base = Embedder.from_pretrained(tiny_bert_dir).encode_corpus(["wheezing"])
    ea, eb = (Embedder.from_pretrained(r.path).encode_corpus(["wheezing"]) for r in results)
    assert not np.allclose(base, ea, atol=1e-4) and not np.allclose(ea, eb, atol=1e-4)
    # a rerun finds both experts done and skips them
    again = train_experts(cfg, show_progress=False)
    assert all(r.skipped for r in again) and [r.steps for r in again] == [8, 8]


def _loss_curve(tmp_path, model, shards, workers: int, *extra: str, gather: bool = True) -> tuple[list[float], str]:
    from stm_ray.train import train_experts

    cfg = _cfg(tmp_path / f"w{workers}-{gather}-{len(extra)}", model, shards, "train.batch_size=8",
               f"train.num_workers={workers}", "train.max_steps=5", "train.lora.dropout=0.0",
               "train.evaluate_dev=false", "train.learning_rate=1e-3",
               f"train.gather_across_workers={str(gather).lower()}", "train.checkpoint_every=100", *extra)
    [res] = train_experts(cfg, show_progress=False)
    return json.loads((Path(res.path) / "metrics.json").read_text())["loss"], res.path


def test_two_workers_equal_one_worker(ray_local, tiny_bert_nodrop_dir, beir_train_dev, tmp_path):
    """The same global batch gives the same loss curve on 1 and 2 workers, and with GradCache by a token budget under
    DeepSpeed ZeRO-2 (whose rank-1 shard is checkpointed)."""
    shards = make_shards(tmp_path / "shards", f"beir:{beir_train_dev}", experts=("solo",), copies=5)
    one, _ = _loss_curve(tmp_path, tiny_bert_nodrop_dir, shards, 1)
    two, _ = _loss_curve(tmp_path, tiny_bert_nodrop_dir, shards, 2)
    assert len(one) == len(two) == 5
    assert one[0] != one[-1]  # it trains
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
    ds, path = _loss_curve(tmp_path, tiny_bert_nodrop_dir, shards, 2, "train.grad_cache=48 tokens",
                           "train.strategy=deepspeed",
                           "train.zero_stage=2", "train.checkpoint_every=2")
    np.testing.assert_allclose(ds, one, rtol=1e-4, atol=1e-5)
    ckpts = sorted(p for p in Path(path).parent.parent.glob("train/*/checkpoint_2*") if p.is_dir())
    assert ckpts and any(p.name.startswith("zero_pp_rank_1") for p in ckpts[-1].rglob("*"))  # rank 1's ZeRO shard
    _st_matches_embedder(path, ["salmonella illness from food"])


@pytest.mark.slow  # ~1.5 min: two more 2-worker runs (the fast tier's test above has 1 vs 2 workers and DeepSpeed)
def test_grad_cache_and_gathered_negatives_on_two_workers(ray_local, tiny_bert_nodrop_dir, beir_train_dev, tmp_path):
    """GradCache with mini-batches of 2 queries gives the 1-worker curve on 2 workers; without gathering, each
    worker sees half the negatives: a different (lower) loss."""
    shards = make_shards(tmp_path / "shards", f"beir:{beir_train_dev}", experts=("solo",), copies=5)
    one, _ = _loss_curve(tmp_path, tiny_bert_nodrop_dir, shards, 1)
    cached, _ = _loss_curve(tmp_path, tiny_bert_nodrop_dir, shards, 2, "train.grad_cache=2")
    np.testing.assert_allclose(cached, one, rtol=1e-4, atol=1e-5)
    local, _ = _loss_curve(tmp_path, tiny_bert_nodrop_dir, shards, 2, gather=False)
    assert local[0] < one[0] - 1e-3


def _worker_pids() -> list[int]:
    # straight from the GCS: ray.util.state needs the dashboard, which is off here
    from ray._private.state import actors

    return [a["Pid"] for a in actors().values() if a.get("ActorClassName") == "RayTrainWorker" and a.get("State") == "ALIVE"]


@pytest.mark.slow  # ~1.5 min; the slow tier runs it (the fast tier stays under 25 min on 2 cores)
def test_killed_worker_resumes_from_checkpoint(ray_local, tiny_bert_dir, beir_train_dev, tmp_path):
    from stm_ray.train import train_experts

    shards = make_shards(tmp_path / "shards", f"beir:{beir_train_dev}", experts=("solo",), copies=16)
    cfg = _cfg(tmp_path, tiny_bert_dir, shards, "train.num_workers=2", "train.epochs=6", "train.checkpoint_every=8",
               "train.evaluate_dev=false", "train.max_failures=2")
    box: dict = {}

    def run():
        try:
            box["result"] = train_experts(cfg, show_progress=False)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    storage = tmp_path / "run" / "train"
    deadline = time.time() + 240
    killed = None
    while time.time() < deadline and t.is_alive() and killed is None:
        # Ray Train's controller collects reports by polling the workers and writes this snapshot once it has
        # registered a checkpoint; a checkpoint folder alone may belong to a report it has not collected yet
        if list(storage.glob("*/checkpoint_manager_snapshot.json")):
            pids = _worker_pids()
            if pids:
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    t.join(timeout=300)
    assert killed is not None, "no checkpoint appeared before the run ended: the test could not kill a worker"
    assert "error" not in box, box.get("error")
    [res] = box["result"]
    assert res.steps == 192  # 128 rows / 4 x 6 epochs: the planned number of steps
    assert res.resumed_from and res.resumed_from[0] % 8 == 0 and 8 <= res.resumed_from[0] < 192
    metrics = json.loads((Path(res.path) / "metrics.json").read_text())
    assert len(metrics["loss"]) == 192
    _st_matches_embedder(res.path, ["middle ear infection"])


def test_decoder_expert_eos_pooling_bidirectional(ray_local, tiny_llama_dir, beir_train_dev, tmp_path):
    from stm_ray.train import train_experts

    shards = make_shards(tmp_path / "shards", f"beir:{beir_train_dev}")
    cfg = _cfg(tmp_path, tiny_llama_dir, shards, "model.bidirectional=true", "model.query_instruction='Query: '",
               "train.experts={all: [alpha, beta]}", "train.max_steps=3", "train.evaluate_dev=false",
               "train.gradient_checkpointing=true")
    [res] = train_experts(cfg, show_progress=False)
    assert res.name == "all" and res.rows == 32 and res.steps == 3
    meta = json.loads((Path(res.path) / "stm_ray.json").read_text())
    assert meta["pooling"] == "eos" and meta["bidirectional"] is True and meta["expert"] == "all"
    assert json.loads((Path(res.path) / "config_sentence_transformers.json").read_text())["prompts"]["query"] == "Query: "
    _st_matches_embedder(res.path, ["raised blood pressure"], prompt_name="query")


def test_unknown_expert_tag_is_a_clear_error(tmp_path, beir_train_dev, tiny_bert_dir):
    from stm_ray.data.task import DataError
    from stm_ray.train import train_experts

    shards = make_shards(tmp_path / "shards", f"beir:{beir_train_dev}")
    cfg = _cfg(tmp_path, tiny_bert_dir, shards, "train.experts={x: [gamma]}")
    with pytest.raises(DataError, match=r"train.experts.x: tag\(s\) \['gamma'\] not in the shards; tags found: \['alpha', 'beta'\]"):
        train_experts(cfg, show_progress=False)


@pytest.mark.slow  # ~1 min; ZeRO-2 + GradCache runs in the fast tier (test_two_workers_equal_one_worker)
def test_deepspeed_zero3_grad_cache_equals_plain(ray_local, tiny_bert_nodrop_dir, beir_train_dev, tmp_path):
    shards = make_shards(tmp_path / "shards", f"beir:{beir_train_dev}", experts=("solo",), copies=5)
    one, _ = _loss_curve(tmp_path, tiny_bert_nodrop_dir, shards, 1)
    z3, path = _loss_curve(tmp_path, tiny_bert_nodrop_dir, shards, 2, "train.grad_cache=3", "train.strategy=deepspeed",
                           "train.zero_stage=3")
    np.testing.assert_allclose(z3, one, rtol=1e-4, atol=1e-5)
    _st_matches_embedder(path, ["salmonella illness from food"])
