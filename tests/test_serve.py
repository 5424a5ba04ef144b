"""Serve: the real Ray Serve application on a local Ray (127.0.0.1), a tiny BERT with a saved query instruction.

Covers the OpenAI embeddings API (and the official openai client), /v1/rerank (and Cohere's client), /search over
an indexed corpus (and reranked), bad input
(never a 5xx), the bearer token, a replica crash, a mixed good/bad load of 2,000 requests at 32 concurrent, the
Serve config file and the corpus index.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import DOCS, QUERIES, write_beir

pytestmark = pytest.mark.integration

TOKEN_ENV = "STM_RAY_TEST_TOKEN"
TOKEN = "s3cret-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, tiny_bert_dir) -> str:
    from stm_ray.modeling import Embedder

    out = tmp_path_factory.mktemp("serve") / "run" / "merged"
    emb = Embedder.from_pretrained(tiny_bert_dir, query_instruction="Find the disease the text describes")
    emb.matryoshka_dims = [32, 16]  # as train.matryoshka_dims records it: serving may cut embeddings
    emb.save(out)
    return str(out)


@pytest.fixture(scope="module")
def served_reranker(tmp_path_factory, tiny_bert_dir) -> str:
    """A tiny cross-encoder folder, as stm-ray train-reranker writes one."""
    import torch

    from stm_ray.rerank.model import CrossEncoderReranker

    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("serve-rr") / "ce"
    CrossEncoderReranker.from_pretrained(tiny_bert_dir, max_length=64).save(out)
    return str(out)


@pytest.fixture(scope="module")
def server(ray_local, served_model, served_reranker, tiny_beir, monkeypatch_module):
    """The app of a run directory (its merged/ model) with /search over the tiny BEIR corpus and a bearer token."""
    from ray import serve

    from stm_ray.config import load_config
    from stm_ray.serve import start

    monkeypatch_module.setenv(TOKEN_ENV, TOKEN)
    run_dir = Path(served_model).parent
    cfg = load_config(None, [f"serve.port={_free_port()}", f"serve.token_env={TOKEN_ENV}", "serve.max_inputs=8",
                             "serve.max_chars=300", "serve.on_too_long=error", "serve.max_top_k=5",
                             "serve.num_cpus=0.5", "serve.index_dimension=16", f"serve.reranker={served_reranker}",
                             "serve.rerank_k=6"])
    info = start(cfg, str(run_dir), corpus=f"beir:{tiny_beir}", show_progress=False)
    url = info["url"]
    _wait_ok(url)
    yield {"url": url, "info": info, "cfg": cfg}
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _wait_ok(url: str, timeout: float = 180.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            r = requests.post(f"{url}/v1/embeddings", json={"input": "ping"}, headers=AUTH, timeout=10)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def _post(url, path, body, headers=AUTH, raw=False):
    data = body if raw else json.dumps(body)
    return requests.post(f"{url}{path}", data=data, headers={"Content-Type": "application/json", **headers}, timeout=60)


# ------------------------------------------------------------------------------------------------ API


def test_embeddings_equal_the_embedder(server, served_model):
    from stm_ray.modeling import Embedder

    emb = Embedder.from_pretrained(served_model)
    texts = [QUERIES["q1"], QUERIES["q5"], "x"]
    r = _post(server["url"], "/v1/embeddings", {"input": texts, "model": "anything"})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])], dtype=np.float32)
    np.testing.assert_allclose(got, emb.encode_queries(texts), atol=1e-5)  # default input_type: query
    n_tokens = sum(len(emb.tokenizer(emb.query_instruction + t)["input_ids"]) for t in texts)
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    assert body["model"] == "run-merged" and body["object"] == "list"

    r = _post(server["url"], "/v1/embeddings", {"input": texts, "input_type": "document", "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    docs = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]])
    np.testing.assert_allclose(docs, emb.encode_corpus(texts), atol=1e-5)
    assert np.abs(docs - got).max() > 1e-3  # the query instruction made a difference

    single = _post(server["url"], "/v1/embeddings", {"input": texts[0]}).json()
    assert len(single["data"]) == 1
    np.testing.assert_allclose(single["data"][0]["embedding"], got[0], atol=1e-5)

    # Matryoshka: dimensions cuts and renormalises (the model records matryoshka_dims); its own size is the full one
    cut = _post(server["url"], "/v1/embeddings", {"input": texts, "dimensions": 16}).json()
    cut = np.array([d["embedding"] for d in cut["data"]], dtype=np.float32)
    expected = got[:, :16] / np.linalg.norm(got[:, :16], axis=1, keepdims=True)
    assert cut.shape == (3, 16)
    np.testing.assert_allclose(cut, expected, atol=1e-5)
    full = _post(server["url"], "/v1/embeddings", {"input": texts, "dimensions": 32}).json()
    np.testing.assert_allclose([d["embedding"] for d in full["data"]], got, atol=1e-5)


def test_dimensions_refused_for_a_model_not_trained_to_be_cut():
    from types import SimpleNamespace

    from stm_ray.serve.app import Retriever

    cls = Retriever.func_or_class
    plain = SimpleNamespace(emb=SimpleNamespace(dim=32, matryoshka_dims=None))
    r = cls._dimensions(plain, 16)
    assert r.status_code == 400 and b"not trained to be cut" in r.body and b"matryoshka_dims" in r.body
    assert cls._dimensions(plain, 32) is None and cls._dimensions(plain, None) is None


def test_openai_client(server, served_model):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server['url']}/v1", api_key=TOKEN)
    models = client.models.list()
    assert [m.id for m in models.data] == ["run-merged", "ce"]  # the retriever, then the served reranker
    res = client.embeddings.create(model="run-merged", input=[QUERIES["q2"], QUERIES["q3"]])  # client asks for base64
    res_float = client.embeddings.create(model="run-merged", input=[QUERIES["q2"], QUERIES["q3"]], encoding_format="float")
    assert len(res.data) == 2 and res.usage.prompt_tokens > 0
    np.testing.assert_allclose(np.array(res.data[0].embedding), np.array(res_float.data[0].embedding), atol=1e-6)
    bad = OpenAI(base_url=f"{server['url']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(Exception) as e:
        bad.embeddings.create(model="run-merged", input="x")
    assert getattr(e.value, "status_code", None) == 401


def test_search_matches_exact_search(server, served_model, tiny_beir):
    from stm_ray.data import load_task
    from stm_ray.modeling import Embedder

    emb = Embedder.from_pretrained(served_model)
    emb.truncate_dim = 16  # the server's index keeps 16 of 32 dimensions (serve.index_dimension)
    task = load_task(f"beir:{tiny_beir}")
    ids = task.corpus.column("_id").to_pylist()
    doc_vecs = emb.encode_corpus(task.doc_texts())
    assert requests.get(f"{server['url']}/health", timeout=10).json()["index_dim"] == 16
    for q in (QUERIES["q4"], QUERIES["q7"]):
        r = _post(server["url"], "/search", {"query": q, "top_k": 3, "return_text": True})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        scores = doc_vecs @ emb.encode_queries([q])[0]
        expected = [ids[i] for i in np.argsort(-scores)[:3]]
        assert [x["id"] for x in res] == expected
        np.testing.assert_allclose([x["score"] for x in res], np.sort(scores)[::-1][:3], atol=1e-5)
        assert res[0]["text"] == task.doc_texts()[ids.index(expected[0])]
    r = _post(server["url"], "/search", {"query": "fever"})
    assert len(r.json()["results"]) == min(5, 10, len(DOCS)) and "text" not in r.json()["results"][0]


def test_rerank_endpoint_and_clients(server, served_reranker):
    """/v1/rerank (and /v2/rerank) in Cohere's shape equals the reranker's own scores; Cohere's client (v1 and v2)
    reads it; /search with rerank=true reorders the retrieved candidates by the reranker."""
    import cohere

    from stm_ray.rerank.model import load_reranker

    url = server["url"]
    rr = load_reranker(served_reranker)
    q, docs = QUERIES["q3"], [f"{t} {x}" for t, x in DOCS.values()][:6]
    expect = rr.score(q, docs)
    r = _post(url, "/v1/rerank", {"query": q, "documents": docs, "top_n": 4, "return_documents": True})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["index"] for x in res] == list(np.argsort(-expect)[:4])
    np.testing.assert_allclose([x["relevance_score"] for x in res], np.sort(expect)[::-1][:4], rtol=1e-4)
    assert res[0]["document"] == {"text": docs[res[0]["index"]]} and r.json()["model"] == "ce"
    objs = _post(url, "/v2/rerank", {"query": q, "documents": [{"text": d} for d in docs]}).json()["results"]
    assert len(objs) == 6 and "document" not in objs[0] and objs[0]["index"] == res[0]["index"]

    v2 = cohere.ClientV2(base_url=url, api_key=TOKEN).rerank(model="ce", query=q, documents=docs, top_n=2)
    assert [x.index for x in v2.results] == [x["index"] for x in res[:2]]
    v1 = cohere.Client(base_url=url, api_key=TOKEN).rerank(query=q, documents=docs, top_n=2, return_documents=True)
    assert v1.results[0].document.text == docs[res[0]["index"]]
    with pytest.raises(Exception) as e:
        cohere.ClientV2(base_url=url, api_key="wrong").rerank(model="ce", query=q, documents=docs)
    assert getattr(e.value, "status_code", None) == 401

    plain = _post(url, "/search", {"query": q, "top_k": 3, "return_text": True}).json()["results"]
    reranked = _post(url, "/search", {"query": q, "top_k": 3, "rerank": True, "return_text": True}).json()
    assert reranked["reranker"] == "ce" and len(reranked["results"]) == 3
    cands = _post(url, "/search", {"query": q, "top_k": 5, "return_text": True}).json()["results"]  # rerank_k=6 > 5 docs
    scores = rr.score(q, [c["text"] for c in cands])
    assert [x["id"] for x in reranked["results"]] == [cands[j]["id"] for j in np.argsort(-scores)[:3]]
    assert all("retrieval_score" in x for x in reranked["results"]) and "retrieval_score" not in plain[0]


BAD = [
    # (path, raw body, status, words the message must contain)
    ("/v1/embeddings", "{not json", 400, ["not valid JSON"]),
    ("/v1/embeddings", "", 400, ["empty"]),
    ("/v1/embeddings", '{"input": 3}', 422, ["input"]),
    ("/v1/embeddings", '{"input": ["ok", 5]}', 422, ["input"]),
    ("/v1/embeddings", '{"model": "m"}', 422, ["input", "required"]),
    ("/v1/embeddings", '{"input": "x", "encoding_format": "hex"}', 422, ["encoding_format"]),
    ("/v1/embeddings", '{"input": "x", "input_type": "passage"}', 422, ["input_type"]),
    ("/v1/embeddings", '{"input": "x", "dimensions": 64}', 400, ["dimensions", "above"]),
    ("/v1/embeddings", '{"input": [101, 2023, 102]}', 400, ["token ids", "send a string"]),
    ("/v1/embeddings", '{"input": [[101, 2023], [102]]}', 400, ["token ids", "send a string"]),
    ("/v1/embeddings", '{"input": []}', 400, ["empty"]),
    ("/v1/embeddings", '{"input": ["a", "  "]}', 400, ["input[1]", "empty"]),
    ("/v1/embeddings", '{"input": ""}', 400, ["empty"]),
    ("/v1/embeddings", json.dumps({"input": ["a"] * 9}), 413, ["9 texts", "at most 8"]),
    ("/v1/embeddings", json.dumps({"input": ["a", "b" * 301]}), 413, ["input[1]", "301"]),
    ("/v1/embeddings", "[1, 2]", 422, []),
    ("/search", '{"top_k": 3}', 422, ["query"]),
    ("/search", '{"query": "x", "top_k": 0}', 422, ["top_k"]),
    ("/search", '{"query": "x", "top_k": "many"}', 422, ["top_k"]),
    ("/search", '{"query": "x", "top_k": 6}', 413, ["top_k"]),
    ("/search", '{"query": ""}', 400, ["empty"]),
    ("/search", '{"query": "x", "rerank": true, "rerank_k": 9}', 413, ["rerank_k"]),
    ("/v1/rerank", '{"query": "x"}', 422, ["documents"]),
    ("/v1/rerank", '{"documents": ["a"]}', 422, ["query"]),
    ("/v1/rerank", '{"query": "x", "documents": []}', 400, ["documents", "empty"]),
    ("/v1/rerank", '{"query": "x", "documents": ["a", ""]}', 400, ["documents[1]", "empty"]),
    ("/v1/rerank", '{"query": "x", "documents": [{"txt": "a"}]}', 422, ["documents"]),
    ("/v1/rerank", '{"query": "x", "documents": ["a"], "top_n": 0}', 422, ["top_n"]),
    ("/v1/rerank", json.dumps({"query": "x", "documents": ["a"] * 9}), 413, ["9 texts", "at most 8"]),
    ("/v1/rerank", json.dumps({"query": "x", "documents": ["a", "b" * 301]}), 413, ["documents[1]", "301"]),
    ("/v1/rerank", "{oops", 400, ["not valid JSON"]),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{p}:{b[:24]}" for p, b, _, _ in BAD])
def test_bad_input_is_a_clear_4xx(server, path, body, status, words):
    r = _post(server["url"], path, body, raw=True)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    for w in words:
        assert w in err["message"], err


def test_bearer_token(server):
    url = server["url"]
    assert _post(url, "/v1/embeddings", {"input": "x"}, headers={}).status_code == 401
    r = _post(url, "/v1/embeddings", {"input": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
    assert _post(url, "/v1/rerank", {"query": "x", "documents": ["a"]}, headers={}).status_code == 401
    assert requests.get(f"{url}/health", timeout=10).status_code == 200  # liveness needs no token
    # the token is never in the app's arguments, only its hash is computed on the replica side
    assert TOKEN not in json.dumps(server["info"]["args"])


def test_binds_loopback_only(server):
    host = server["url"].split("//")[1].split(":")[0]
    assert host == "127.0.0.1"
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:  # the address of the default route; sends nothing
        try:
            u.connect(("10.255.255.255", 1))
            other = u.getsockname()[0]
        except OSError:
            other = "127.0.0.1"
    if other.startswith("127.") or other == "0.0.0.0":
        pytest.skip("this machine has no non-loopback address to check")
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((other, port)) != 0, f"port {port} answers on {other}"


def test_direct_ingress_is_the_replica_answering(server):
    """serve.ingress=auto on a local Ray with one replica: the replica's own HTTP server answers on serve.port (no
    proxy hop); Serve's proxy, which Ray keeps as a fallback, listens on another loopback port and reaches the same
    replica. A second deployment can't take over the running Serve's options: auto falls back to the proxy and an
    explicit direct says why it can't."""
    import psutil

    from stm_ray.config import load_config
    from stm_ray.serve.deploy import use_direct_ingress

    url, ingress = server["url"], server["info"]["ingress"]
    port = int(url.rsplit(":", 1)[1])
    assert ingress["mode"] == "direct" and ingress["port"] == port and ingress["proxy_port"] != port
    pid = requests.get(f"{url}/health", timeout=10).json()["pid"]
    owner = [c.pid for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert owner == [pid], (owner, pid)  # the replica process itself holds the port
    via_proxy = f"http://127.0.0.1:{ingress['proxy_port']}"
    assert requests.get(f"{via_proxy}/health", timeout=10).json()["pid"] == pid
    a = _post(url, "/v1/embeddings", {"input": "chest pain"}).json()["data"][0]["embedding"]
    b = requests.post(f"{via_proxy}/v1/embeddings", json={"input": "chest pain"}, headers=AUTH, timeout=60).json()
    np.testing.assert_allclose(a, b["data"][0]["embedding"], atol=1e-6)
    cfg = server["cfg"]
    assert use_direct_ingress(cfg, None) is False  # Serve already runs: its options are fixed
    with pytest.raises(RuntimeError, match="Serve already runs"):
        use_direct_ingress(load_config(None, ["serve.ingress=direct"]), None)


# ------------------------------------------------------------------------------------------------ load and faults


def test_load_2000_mixed_requests_at_32_concurrent(server):
    """2,000 requests, a third of them bad in various ways: every one answered, none with a 5xx, each as expected."""
    from stm_ray.serve.loadgen import run_load

    url = server["url"]
    reqs, expected = [], {}
    for i in range(2000):
        kind = i % 6
        if kind in (0, 1, 2):
            body = json.dumps({"input": [f"{QUERIES['q1']} {i}"] * (1 + i % 3)}).encode()
            path, want = "/v1/embeddings", 200
        elif kind == 3 and i % 4 == 1:
            body, path, want = json.dumps({"query": f"{QUERIES['q6']} {i}", "top_k": 2}).encode(), "/search", 200
        elif kind == 3:  # the reranker under the same load
            body, path, want = json.dumps({"query": f"{QUERIES['q2']} {i}", "documents": ["a b", "fever c"],
                                           "top_n": 1}).encode(), "/v1/rerank", 200
        elif kind == 4:
            body, path, want = [b"{broken", b'{"input": 12}', b'{"input": []}'][i % 3], "/v1/embeddings", None
            want = [400, 422, 400][i % 3]
        else:
            body, path, want = json.dumps({"input": ["a"] * 50}).encode(), "/v1/embeddings", 413
        reqs.append(("POST", url + path, body))
        expected[want] = expected.get(want, 0) + 1
    res = run_load(reqs, 32, headers=AUTH, timeout_s=120)
    print(res.summary())
    assert res.lost == 0, res.errors
    assert res.server_errors == 0, res.statuses
    assert res.statuses == expected


@pytest.mark.slow  # ~70 s: a replica killed and restarted
def test_replica_crash_is_restarted(server):
    """Kill the replica's process (SIGKILL, as an OOM kill would); Serve starts a new one and requests succeed."""
    import os
    import signal

    import ray

    url = server["url"]
    before = requests.get(f"{url}/health", timeout=10).json()
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]
              and "Retriever" in a["name"]]
    assert len(actors) == 1, actors
    pid = ray.get(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]).__ray_call__.remote(
        lambda self: os.getpid()))
    assert pid == before["pid"]
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    ok = None
    while time.time() - t0 < 180:
        try:
            r = _post(url, "/v1/embeddings", {"input": "after the crash"})
            if r.status_code == 200:
                ok = r
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    assert ok is not None, "no successful request within 180 s of the crash"
    after = requests.get(f"{url}/health", timeout=10).json()
    assert after["pid"] != pid and after["documents"] == len(DOCS)
    for _ in range(5):
        assert _post(url, "/search", {"query": QUERIES["q8"], "top_k": 1}).status_code == 200
        assert _post(url, "/v1/rerank", {"query": QUERIES["q8"], "documents": ["a", "b"]}).status_code == 200


# ------------------------------------------------------------------------------------------------ config and index


def test_serve_config_yaml_is_a_valid_serve_config(served_model, tiny_beir, tmp_path, monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from stm_ray.cli import main
    from stm_ray.config import load_config
    from stm_ray.serve.app import build_app

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    out = tmp_path / "serve.yaml"
    run_dir = str(Path(served_model).parent)
    assert main(["serve", run_dir, f"serve.token_env={TOKEN_ENV}", "serve.min_replicas=1", "serve.max_replicas=3",
                 "--corpus", f"beir:{tiny_beir}", "--write-config", str(out), "--port", "8123"]) == 0
    text = out.read_text()
    assert TOKEN not in text and text.startswith("#")
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8123
    app = schema.applications[0]
    assert app.import_path == "stm_ray.serve.app:build_app"
    dep = app.deployments[0]
    assert dep.name == "Retriever" and dep.autoscaling_config["max_replicas"] == 3
    assert dep.ray_actor_options.num_cpus == 1.0 and dep.max_ongoing_requests == 256
    built = build_app(app.args)  # what `serve run` calls: resolves the token into its hash
    assert type(built).__name__ == "Application"
    cfg = load_config(None, [])
    assert cfg.serve.host == "127.0.0.1"


def test_serve_cli_errors(tmp_path, capsys):
    from stm_ray.cli import main

    (tmp_path / "run" / "experts" / "alpha").mkdir(parents=True)
    (tmp_path / "run" / "experts" / "alpha" / "config.json").write_text("{}")
    assert main(["serve", str(tmp_path / "run"), "--write-config", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert "merged" in err and "alpha" in err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "/v1/embeddings" in capsys.readouterr().out


def test_corpus_index_reuse_and_faiss(tmp_path, tiny_bert_dir, served_model, tiny_beir):
    from stm_ray.serve.index import CorpusIndex, build_index

    folder = tmp_path / "index"
    meta = build_index(served_model, f"beir:{tiny_beir}", folder, show_progress=False)
    assert meta["reused"] is False and meta["num_documents"] == len(DOCS)
    assert build_index(served_model, f"beir:{tiny_beir}", folder, show_progress=False)["reused"] is True
    other = build_index(tiny_bert_dir, f"beir:{tiny_beir}", folder, show_progress=False)  # another model: rebuilt
    assert other["reused"] is False and other["model"] == tiny_bert_dir
    smaller = write_beir(tmp_path / "b" / tiny_beir.name, docs=dict(list(DOCS.items())[:3]))  # same slug, other corpus
    meta = build_index(tiny_bert_dir, f"beir:{smaller}", folder, show_progress=False)
    assert meta["reused"] is False and meta["num_documents"] == 3
    other = build_index(tiny_bert_dir, f"beir:{tiny_beir}", folder, show_progress=False)
    assert other["reused"] is False and other["num_documents"] == len(DOCS)
    exact = CorpusIndex.load(folder)
    fai = CorpusIndex.load(folder, backend="faiss", faiss_factory="Flat")
    q = np.random.default_rng(0).normal(size=(3, exact.dim)).astype(np.float32)
    s1, i1 = exact.search(q, 4)
    s2, i2 = fai.search(q, 4)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    assert (np.diff(s1, axis=1) <= 1e-7).all()
    s_all, i_all = exact.search(q[:1], 100)  # k above the corpus size: the whole corpus, sorted
    assert i_all.shape == (1, len(DOCS)) and sorted(i_all[0].tolist()) == list(range(len(DOCS)))


def test_deployment_options_and_config_bounds():
    from stm_ray.config import ConfigError, load_config
    from stm_ray.serve.app import deployment_options

    assert deployment_options({"min_replicas": 2, "max_replicas": 2})["num_replicas"] == 2
    auto = deployment_options({"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8, "num_gpus": 1})
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8.0}
    assert auto["ray_actor_options"]["num_gpus"] == 1.0
    with pytest.raises(ConfigError, match="max_replicas"):
        load_config(None, ["serve.min_replicas=3", "serve.max_replicas=2"])
    with pytest.raises(ConfigError, match="on_too_long"):
        load_config(None, ["serve.on_too_long=drop"])
    with pytest.raises(ConfigError, match="ingress=direct serves one replica"):
        load_config(None, ["serve.ingress=direct", "serve.max_replicas=2"])
    # direct ingress: the flags reach the replica through its runtime_env; Serve's port pool excludes its upper end
    from stm_ray.serve.deploy import direct_ingress_env

    env = direct_ingress_env(8123)
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8123", "8124")
    assert deployment_options({"replica_env": env})["ray_actor_options"]["runtime_env"] == {"env_vars": env}
    assert "runtime_env" not in deployment_options({})["ray_actor_options"]


def test_truncation_mode(served_model):
    """on_too_long=truncate cuts texts to max_chars instead of refusing (checked on the replica's own method)."""
    from stm_ray.serve.app import Retriever

    r = object.__new__(Retriever.func_or_class)
    r.max_inputs, r.max_chars, r.truncate = 4, 5, True
    assert r._check_texts(["abcdefgh", "xy"], "input", False) == ["abcde", "xy"]
    r.truncate = False
    assert r._check_texts(["abcdefgh"], "input", True).status_code == 413
