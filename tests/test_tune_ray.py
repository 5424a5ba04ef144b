"""Ray Tune searches on a local Ray: merge search (mergekit) and instruction search, on tiny experts made in code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from stm_ray.config import load_config
from stm_ray.modeling import Embedder


def _make_experts(base: str, run: Path, names=("alpha", "beta"), scale: float = 0.05) -> None:
    for i, name in enumerate(names, 1):
        emb = Embedder.from_pretrained(base, device="cpu")
        torch.manual_seed(i)
        with torch.no_grad():
            for p in emb.model.parameters():
                p.add_(scale * torch.randn_like(p))
        out = emb.save(run / "experts" / name)
        (out / "metrics.json").write_text(json.dumps({"fingerprint": f"test-{name}"}))


@pytest.fixture()
def merge_run(tmp_path, tiny_bert_dir, beir_train_dev):
    run = tmp_path / "run"
    _make_experts(tiny_bert_dir, run)
    return run, [f"run_dir={run}", f"data.tasks=[beir:{beir_train_dev}]", f"model.name_or_path={tiny_bert_dir}",
                 "merge.weight_grid=[0.0,0.5,1.0]", "merge.density_grid=[0.5]", "search.dev_corpus_size=6",
                 "search.dev_pool_depth=2"]


def test_grid_merge_search_writes_the_winner(ray_local, merge_run):
    from sentence_transformers import SentenceTransformer

    from stm_ray.merge import merge_table, search_merge

    run, over = merge_run
    cfg = load_config(None, [*over, "merge.searcher=grid", "merge.methods=[linear,ties]"])
    res = search_merge(cfg, show_progress=False)
    # 3x3 weights for linear (0,0 = the base) and for ties at one density
    assert len(res.trials) == 18 and all("error" not in r for r in res.trials)
    # the single-expert points of a linear merge are the experts themselves: same dev score as scored directly
    for name, other in (("alpha", "beta"), ("beta", "alpha")):
        row = next(r for r in res.trials if r["method"] == "linear" and r[f"w_{name}"] == 1.0 and r[f"w_{other}"] == 0.0)
        assert row["ndcg_at_10"] == pytest.approx(res.experts_dev[name]["ndcg_at_10"], abs=1e-9)
    base_row = next(r for r in res.trials if r["method"] == "linear" and r["w_alpha"] == 0 and r["w_beta"] == 0)
    assert base_row["ndcg_at_10"] == pytest.approx(res.base_dev["ndcg_at_10"], abs=1e-9)
    assert res.dev["ndcg_at_10"] == max(r["ndcg_at_10"] for r in res.trials)
    assert res.dev["ndcg_at_10"] >= max(d["ndcg_at_10"] for d in res.experts_dev.values())

    merged = run / "merged"
    meta = json.loads((merged / "merge.json").read_text())
    assert meta["result"]["method"] == res.method and meta["result"]["weights"] == res.weights
    assert len(meta["trials"]) == 18 and meta["result"]["base_dev"] and meta["result"]["experts_dev"]
    assert (run / "search" / "merge_trials.png").stat().st_size > 1000
    assert not (run / "search" / "scratch").exists()
    st = SentenceTransformer(str(merged), device="cpu")
    assert st.encode(["salmonella illness"]).shape == (1, 32)
    assert "merged (" in merge_table(res)
    # the merged model scores what the search said
    from stm_ray.tune.dev import dev_sets, score_embedder

    again = score_embedder(Embedder.from_pretrained(str(merged), device="cpu"), dev_sets(cfg))
    assert again.ndcg_at_10 == pytest.approx(res.dev["ndcg_at_10"], abs=1e-6)
    # a rerun with the same config does nothing
    before = (merged / "merge.json").stat().st_mtime_ns
    assert search_merge(cfg, show_progress=False).skipped
    assert (merged / "merge.json").stat().st_mtime_ns == before


def test_optuna_merge_search_samples_the_space(ray_local, merge_run):
    from stm_ray.merge import search_merge

    run, over = merge_run
    cfg = load_config(None, [*over, "merge.searcher=optuna", "merge.num_samples=5",
                             "merge.methods=[linear,dare_ties,task_arithmetic]"])
    res = search_merge(cfg, show_progress=False)
    assert len(res.trials) == 5
    assert res.trials[0]["method"] == "linear" and res.trials[0]["w_alpha"] == 0.5  # the equal-weight start point
    assert all(0.0 <= r[f"w_{n}"] <= 1.0 for r in res.trials for n in ("alpha", "beta"))
    assert {r["method"] for r in res.trials} <= {"linear", "dare_ties", "task_arithmetic"}
    assert (run / "merged" / "model.safetensors").is_file()


def test_unknown_expert_is_a_clear_error(merge_run):
    from stm_ray.data import DataError
    from stm_ray.merge import search_merge

    run, over = merge_run
    with pytest.raises(DataError, match=r"merge.experts: \['gamma'\] not found.*finished experts: \['alpha', 'beta'\]"):
        search_merge(load_config(None, [*over, "merge.experts=[alpha,gamma]"]))
    shutil.rmtree(run / "experts")
    with pytest.raises(DataError, match="no finished expert"):
        search_merge(load_config(None, over))


def test_instruction_search_scores_every_candidate_and_saves_the_winner(ray_local, tmp_path, tiny_bert_dir,
                                                                        beir_train_dev):
    from sentence_transformers import SentenceTransformer

    from stm_ray.tune import instruction_table, search_instructions
    from stm_ray.tune.dev import dev_sets, score_embedder

    run = tmp_path / "run"
    _make_experts(tiny_bert_dir, run, names=("alpha",))
    (run / "synth" / "instructions").mkdir(parents=True)
    (run / "synth" / "instructions" / "tiny.json").write_text(json.dumps(
        {"instructions": ["Given a symptom, retrieve the disease", "Find the illness described"]}))
    model = str(run / "experts" / "alpha")
    cfg = load_config(None, [f"run_dir={run}", f"data.tasks=[beir:{beir_train_dev}]", "search.instructions=[Match the query]"])
    res = search_instructions(cfg, model=model, show_progress=False)
    instructions = [r["instruction"] for r in res.trials]
    assert "" in instructions and "Match the query" in instructions and "Find the illness described" in instructions
    assert len(instructions) == len(set(instructions))
    best = max(res.trials, key=lambda r: r["ndcg_at_10"])
    assert res.dev["ndcg_at_10"] == best["ndcg_at_10"]
    # each trial's score is the model's dev score with that instruction, computed without Tune
    emb = Embedder.from_pretrained(model, device="cpu")
    for row in res.trials[:3]:
        emb.query_instruction = Embedder.from_pretrained(model, device="cpu", query_instruction=row["instruction"]).query_instruction
        assert score_embedder(emb, dev_sets(cfg)).ndcg_at_10 == pytest.approx(row["ndcg_at_10"], abs=1e-6)
    # the winner is the saved query prompt of the model folder
    assert res.saved_to == str(Path(model).resolve())
    assert SentenceTransformer(model, device="cpu").prompts["query"] == res.prefix
    assert Embedder.from_pretrained(model).query_instruction == res.prefix
    saved = json.loads((run / "search" / "instructions.json").read_text())
    assert saved["best"]["instruction"] == res.instruction and len(saved["trials"]) == len(res.trials)
    assert "(none)" in instruction_table(res, top=50)


@pytest.mark.slow  # ~1 min (a Ray Train run per pool size inside Tune); slow tier keeps the fast one under 25 min
def test_pool_size_search_trains_one_expert_per_size(ray_local, tmp_path, tiny_bert_dir, beir_train_dev):
    from stm_ray.tune import search_pool_size
    from tests.conftest import make_shards

    run = tmp_path / "run"
    shards = make_shards(tmp_path / "shards", f"beir:{beir_train_dev}", experts=("all",))
    cfg = load_config(None, [f"run_dir={run}", f"data.tasks=[beir:{beir_train_dev}]", f"model.name_or_path={tiny_bert_dir}",
                             "search.pool_sizes=[1,3]", "search.instructions=[Find the disease,Match the query]",
                             "search.use_synth_pool=false", "train.batch_size=8", "train.max_steps=2", "train.lora.r=4"])
    out = search_pool_size(cfg, shards=str(shards), show_progress=False)
    assert sorted(r["pool_size"] for r in out["trials"]) == [1, 3]
    for r in out["trials"]:
        expert = Path(r["expert"])
        assert (expert / "metrics.json").is_file()
        m = json.loads((expert / "metrics.json").read_text())
        assert m["config"]["train"]["instruction_mode"] == "pool"
        assert len(m["config"]["train"]["instruction_pool"]) == r["pool_size"]
    assert out["best"]["pool_size"] in (1, 3)
    assert json.loads((run / "search" / "instruction_pools.json").read_text())["best"] == out["best"]
    again = search_pool_size(cfg, shards=str(shards), show_progress=False)  # same fingerprint: reused
    assert again["fingerprint"] == out["fingerprint"] and again["trials"] == out["trials"]


@pytest.mark.slow  # ~2 min, and timing-sensitive on a loaded 2-core machine; the slow tier runs it
def test_killed_merge_search_resumes_its_tune_experiment(tmp_path, tiny_bert_dir, beir_train_dev):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    _make_experts(tiny_bert_dir, run)
    grid = [round(0.1 * i, 1) for i in range(11)]
    args = [sys.executable, "-m", "stm_ray.cli", "merge", "--no-progress", f"run_dir={run}",
            f"data.tasks=[beir:{beir_train_dev}]", f"model.name_or_path={tiny_bert_dir}", "merge.searcher=grid",
            "merge.methods=[linear]", f"merge.weight_grid=[{','.join(map(str, grid))}]"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)

    def terminated() -> int:
        """Trials the saved experiment state records as done (what a restore keeps)."""
        states = list((run / "search" / "tune").glob("merge-*/experiment_state-*.json"))
        return max((p.read_text().count("TERMINATED") for p in states), default=0) if states else 0

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and terminated() < 3:
            time.sleep(0.1)
        assert proc.poll() is None, "the search ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = time.time()
    assert not (run / "merged" / "merge.json").exists()
    with open(tmp_path / "second.log", "w") as log:
        again = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=400)
    text = (tmp_path / "second.log").read_text()
    assert again.returncode == 0, text[-3000:]
    assert "resuming the Tune experiment" in text
    meta = json.loads((run / "merged" / "merge.json").read_text())
    assert len(meta["trials"]) == 121 and not any("error" in r for r in meta["trials"])
    points = {(r["w_alpha"], r["w_beta"]) for r in meta["trials"]}
    assert len(points) == 121  # every grid point exactly once
    kept = [r for r in meta["trials"] if r["started"] < killed_at]
    assert 3 <= len(kept) < 121, f"{len(kept)} trials kept from the killed run"
