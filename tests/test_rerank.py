"""Rerankers: the two kinds, their folders in sentence-transformers, training on Ray, the rerank stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

QS = ["what causes influenza", "knee joint pain in older adults", "a"]
DS = ["Influenza is caused by a virus that infects the airways. " * 3, "Osteoarthritis of the knee", "b " * 400]


@pytest.fixture(scope="module")
def tiny_llm_reranker(tiny_llama_dir):
    from stm_ray.rerank.model import LLMReranker

    return LLMReranker.from_pretrained(tiny_llama_dir, max_length=96)


def test_llm_reranker_score_is_p_yes_over_yes_plus_no(tiny_llm_reranker):
    r = tiny_llm_reranker
    prompts = r.prompts(QS, DS)
    assert QS[0] in prompts[0] and DS[1] in prompts[1] and "<|im_start|>assistant" in prompts[0]
    assert r.instruction in prompts[0]
    ids = [r.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert max(len(x) for x in ids) <= 96  # the long document was cut, the prompt's end kept
    assert prompts[2].endswith("<|im_start|>assistant\n")
    with torch.no_grad():  # one prompt at a time, no padding: softmax over the two answer tokens
        expect = []
        for x in ids:
            logits = r.model(torch.tensor([x])).logits[0, -1]
            p = torch.softmax(logits[[r.yes_id, r.no_id]], dim=0)[0]
            expect.append(float(p))
    np.testing.assert_allclose(r.score_pairs(QS, DS, batch_size=3), expect, rtol=1e-4, atol=1e-6)
    assert np.ptp(expect) > 1e-4  # the scores depend on the input: the test can fail


def test_llm_reranker_folder_reloads_and_loads_in_sentence_transformers(tmp_path, tiny_llm_reranker):
    from sentence_transformers import CrossEncoder

    from stm_ray.rerank.model import LLMReranker, load_reranker

    r = tiny_llm_reranker
    qs, ds = [QS[0], QS[1]], ["A virus infecting the airways.", DS[1]]  # within max_length: no cut on either side
    ours = r.score_pairs(qs, ds)
    r.save(tmp_path / "llm")
    meta = json.loads((tmp_path / "llm" / "stm_ray_reranker.json").read_text())
    assert meta["kind"] == "llm" and meta["answer_tokens"] == ["yes", "no"]
    again = load_reranker(str(tmp_path / "llm"))
    assert isinstance(again, LLMReranker)
    np.testing.assert_allclose(again.score_pairs(qs, ds), ours, rtol=1e-5)
    st = CrossEncoder(str(tmp_path / "llm"), device="cpu")  # a Transformer(text-generation) + LogitScore(yes, no)
    np.testing.assert_allclose(st.predict(list(zip(qs, ds))), ours, rtol=1e-4, atol=1e-6)


def test_cross_encoder_folder_loads_in_sentence_transformers(tmp_path, tiny_bert_dir):
    from sentence_transformers import CrossEncoder

    from stm_ray.rerank.model import CrossEncoderReranker, load_reranker

    torch.manual_seed(0)
    r = CrossEncoderReranker.from_pretrained(tiny_bert_dir, max_length=64)
    ours = r.score_pairs(QS, DS)
    assert np.ptp(ours) > 1e-5 and ((ours > 0) & (ours < 1)).all()
    r.save(tmp_path / "ce")
    again = load_reranker(str(tmp_path / "ce"))
    assert isinstance(again, CrossEncoderReranker) and again.max_length == 64
    np.testing.assert_allclose(again.score_pairs(QS, DS), ours, rtol=1e-5)
    st = CrossEncoder(str(tmp_path / "ce"), device="cpu")
    assert st.max_seq_length == 64
    np.testing.assert_allclose(st.predict(list(zip(QS, DS))), ours, rtol=1e-4, atol=1e-6)


def test_groups_and_losses():
    from stm_ray.rerank.train import RerankRows, build_groups, group_loss, plan

    rows = RerankRows(queries=["q0", "q1", "q2"], positives=["p0", "p1", "p2"], negatives=[["n0a", "n0b"], [], ["n2"]])
    batch = np.array([0, 1, 2])
    qs, ds = build_groups(rows, batch, batch, 2, 13, 0)
    assert qs == ["q0"] * 3 + ["q1"] * 3 + ["q2"] * 3
    assert ds[0] == "p0" and set(ds[1:3]) == {"n0a", "n0b"}
    assert ds[3] == "p1" and set(ds[4:6]) == {"p0", "p2"}  # no negatives of its own: other queries' positives
    assert ds[6] == "p2" and ds[7] == "n2" and ds[8] in {"p0", "p1"}
    assert [len(b) for b in plan(5, 2, 13, 0)] == [2, 2, 2] and sorted(np.concatenate(plan(5, 2, 13, 0))[:5]) == list(range(5))
    good = torch.tensor([3.0, -1.0, -2.0, 2.0, 0.0, -1.0])
    bad = torch.tensor([-2.0, -1.0, 3.0, -1.0, 0.0, 2.0])  # the positive ranked last
    for kind in ("softmax", "bce"):
        assert group_loss(good, 2, kind) + 1.0 < group_loss(bad, 2, kind)


def test_presets_and_config_errors():
    from stm_ray.config import ConfigError, load_config
    from stm_ray.rerank.train import total_steps

    capped = load_config(None, ['rerank.rerankers=[{"name": "ce", "kind": "cross-encoder", "model": "m", '
                                '"max_steps": 5}, llm]', "rerank.max_steps=3", "rerank.batch_size=4",
                                "rerank.epochs=2"])
    ce, llm = capped.rerank.rerankers
    assert (total_steps(20, capped.rerank, ce), total_steps(20, capped.rerank, llm), total_steps(6, capped.rerank, ce)) \
        == (5, 3, 4)  # its own cap, the shared cap, two epochs of two batches

    cfg = load_config(None, ["rerank.rerankers=[cross-encoder,llm]"])
    kinds = {r.name: (r.kind, r.model, r.lora is not None) for r in cfg.rerank.rerankers}
    assert kinds == {"cross-encoder": ("cross-encoder", "minilm", False), "llm": ("llm", "smollm2", True)}
    with pytest.raises(ConfigError, match="unknown reranker preset 'monot5'"):
        load_config(None, ["rerank.rerankers=[monot5]"])
    with pytest.raises(ConfigError, match="names must differ"):
        load_config(None, ["rerank.rerankers=[llm,llm]"])


@pytest.mark.slow  # ~75 s: two rerankers on Ray Train; the recipe is the experts' (test_train_ray.py) and the reranker models are unit-tested
def test_rerankers_train_on_ray_and_the_rerank_stage(tmp_path, ray_local, tiny_beir, tiny_bert_dir, tiny_llama_dir):
    """Both kinds trained side by side (Ray Train), folders that score the training pairs better than before;
    the pipeline's rerank stages write mteb files; a rerun reuses everything."""
    from stm_ray.config import load_config
    from stm_ray.data.shards import read_shards
    from stm_ray.pipeline import run_pipeline
    from stm_ray.rerank.model import load_reranker
    from stm_ray.rerank.train import RerankRows
    from tests.conftest import make_shards

    shards = make_shards(tmp_path / "shards", f"beir:{tiny_beir}", experts=("alpha",))
    specs = [{"name": "ce", "kind": "cross-encoder", "model": tiny_bert_dir, "learning_rate": 1e-2, "max_length": 64},
             {"name": "lm", "kind": "llm", "model": tiny_llama_dir, "learning_rate": 5e-3, "max_length": 96,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}]
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.tasks=[beir:{tiny_beir}]", f"train.shards={shards}",
                             f"model.name_or_path={tiny_bert_dir}", f"rerank.rerankers={json.dumps(specs)}",
                             "rerank.batch_size=8", "rerank.epochs=3", "rerank.negatives_per_query=2",
                             "rerank.retriever=base", "rerank.top_k=5", "rerank.checkpoint_every=4"])
    rows = RerankRows.from_table(read_shards(shards))
    before = {s["name"]: load_reranker(s["model"], kind=s["kind"], max_length=s["max_length"]) for s in specs}

    def margin(r) -> float:  # mean (positive - first negative) score over the training rows
        pos = r.score_pairs(rows.queries, rows.positives)
        neg = r.score_pairs(rows.queries, [n[0] for n in rows.negatives])
        return float(np.mean(pos - neg))

    m = run_pipeline(cfg, stages=["rerankers", "rerank"], show_progress=False)
    st = m["stages"]
    assert st["rerankers"]["status"] == "done" and st["rerank"]["status"] == "done"
    assert st["evaluate"]["status"] == "skipped"
    trained = st["rerankers"]["counts"]["rerankers"]
    assert set(trained) == {"ce", "lm"} and all(t["steps"] == 12 for t in trained.values())
    for s in specs:
        folder = tmp_path / "run" / "rerankers" / s["name"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert len(metrics["loss"]) == 12 and (folder / "loss.png").is_file()
        after = load_reranker(str(folder))
        old, new = margin(before[s["name"]]), margin(after)
        assert new > max(0.005, 10 * abs(old)), (s["name"], old, new)
    counts = st["rerank"]["counts"]
    table = counts["ndcg_at_10"]
    assert set(table) == {"retriever", "rerank-ce", "rerank-lm"} and counts["top_k"] == 5
    files = sorted((tmp_path / "run" / "eval").glob("rerank-*/*.json"))
    assert len(files) == 2
    doc = json.loads(files[0].read_text())
    assert doc["scores"]["test"][0]["main_score"] == doc["scores"]["test"][0]["ndcg_at_10"]
    assert doc["stm_ray"]["top_k"] == 5 and "ndcg_at_10" in doc["stm_ray"]["retriever_scores"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Reranking" in report and "+ ce" in report

    again = run_pipeline(cfg, stages=["rerankers", "rerank"], show_progress=False)
    assert again["stages"]["rerankers"]["action"] == "reused" and again["stages"]["rerank"]["action"] == "reused"

    # an unfinished reranker (its folder lost, its checkpoints kept) resumes from the last checkpoint
    import shutil

    shutil.rmtree(tmp_path / "run" / "rerankers" / "ce")
    resumed = run_pipeline(cfg, stages=["rerankers"], show_progress=False)["stages"]["rerankers"]
    assert {i["item"]: i["action"] for i in resumed["items"]} == {"ce": "resume", "lm": "reuse"}
    assert resumed["counts"]["rerankers"]["ce"]["resumed_from"] == [12]


def test_evaluate_command_reranks(tmp_path, tiny_beir, tiny_bert_dir, capsys):
    from stm_ray.cli import main
    from stm_ray.rerank.model import CrossEncoderReranker

    torch.manual_seed(0)
    CrossEncoderReranker.from_pretrained(tiny_bert_dir, max_length=64).save(tmp_path / "ce")
    rc = main(["evaluate", "--model", tiny_bert_dir, "--task", f"beir:{tiny_beir}", "--rerank", str(tmp_path / "ce"),
               "--output", str(tmp_path / "out"), "rerank.top_k=5"])
    out = capsys.readouterr().out
    assert rc == 0 and "top 5 reranked" in out and "+ ce" in out and "s/query ce" in out
    doc = json.loads(next((tmp_path / "out" / "rerank-ce").glob("*.json")).read_text())
    assert doc["stm_ray"]["reranker"].endswith("ce") and doc["stm_ray"]["top_k"] == 5


@pytest.mark.slow
def test_cross_encoder_on_two_deepspeed_workers(tmp_path, ray_local, tiny_beir, tiny_bert_nodrop_dir):
    """DeepSpeed ZeRO-2 on 2 workers, and micro-batches: the same loss curve as 1 plain worker (the global batch
    does not depend on the workers or the micro-batches), and folders that load."""
    from stm_ray.config import load_config
    from stm_ray.rerank.model import load_reranker
    from stm_ray.rerank.train import train_rerankers
    from tests.conftest import make_shards

    shards = make_shards(tmp_path / "shards", f"beir:{tiny_beir}", experts=("alpha",))
    spec = [{"name": "ce", "kind": "cross-encoder", "model": tiny_bert_nodrop_dir, "learning_rate": 1e-2,
             "max_length": 64}]
    curves = {}
    for label, extra in (("plain", []), ("ds", ["rerank.strategy=deepspeed", "rerank.num_workers=2"]),
                         ("micro", ["rerank.micro_batch=3"]),  # groups 3 + 3 + 2, gradients accumulated
                         ("ds-micro", ["rerank.strategy=deepspeed", "rerank.num_workers=2", "rerank.micro_batch=3"])):
        cfg = load_config(None, [f"run_dir={tmp_path / label}", f"train.shards={shards}", "rerank.batch_size=8",
                                 f"rerank.rerankers={json.dumps(spec)}", "rerank.max_steps=4", *extra])
        train_rerankers(cfg, show_progress=False)
        curves[label] = json.loads((tmp_path / label / "rerankers" / "ce" / "metrics.json").read_text())["loss"]
        load_reranker(str(tmp_path / label / "rerankers" / "ce"))
    for label in ("ds", "micro", "ds-micro"):
        np.testing.assert_allclose(curves[label], curves["plain"], rtol=1e-3, err_msg=label)


def test_rerank_stages_need_rerankers(tmp_path, tiny_beir):
    from stm_ray.config import ConfigError, load_config
    from stm_ray.pipeline import run_pipeline

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.tasks=[beir:{tiny_beir}]"])
    with pytest.raises(ConfigError, match="stage .rerank. needs rerank.rerankers"):
        run_pipeline(cfg, stages=["rerank"], show_progress=False)


@pytest.mark.slow
def test_llm_reranker_folder_in_vllm(tmp_path, tiny_llm_reranker):
    """vLLM's standard loader (pooling runner, classifier_from_token yes/no, from_2_way_softmax) gives our scores."""
    import subprocess
    import sys

    tiny_llm_reranker.save(tmp_path / "llm")
    qs, ds = QS[0], ["A virus infecting the airways.", DS[1], "fever and cough"]
    ours = tiny_llm_reranker.score(qs, ds)
    code = (
        "import json, sys\n"
        "from stm_ray.modeling.vllm_engine import cpu_engine_kwargs\n"
        "from stm_ray.rerank.model import vllm_reranker\n"
        "if __name__ == '__main__':\n"
        "    kw = cpu_engine_kwargs(sys.argv[1], max_model_len=512, max_num_seqs=4, kv_cache_gib=None, field='test')\n"
        "    llm, score = vllm_reranker(sys.argv[1], **kw)\n"
        "    print('SCORES', json.dumps(score.__call__(sys.argv[2], json.loads(sys.argv[3])).tolist()))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "llm"), qs, json.dumps(ds)],
                          capture_output=True, text=True, timeout=600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("SCORES ")]
    assert line, proc.stderr[-3000:]
    np.testing.assert_allclose(json.loads(line[0][7:]), ours, atol=1e-5)
