"""The Ray Serve application: an OpenAI-compatible embeddings API and a search endpoint over an indexed corpus.

Endpoints (FastAPI ingress, one deployment ``Retriever``):

- ``POST /v1/embeddings``  ``{"input": str | [str], "model": ..., "encoding_format": "float"|"base64",
  "input_type": "query"|"document"}`` -> OpenAI's reply (``data``, ``model``, ``usage``). ``input_type`` (default
  query) decides whether the model's saved query instruction is prepended.
- ``POST /search``  ``{"query": str, "top_k": 10, "return_text": false}`` -> ids, scores (and texts).
- ``GET /health`` (no token needed), ``GET /v1/models``.

Request path, tuned for many small requests: the body is parsed and validated by pydantic-core in one pass,
each text is tokenised in the request's own coroutine (not inside the batch), ``@serve.batch`` groups up to
``max_batch_size`` texts from concurrent requests, and the forward pass runs in a worker thread so the event loop
keeps accepting and tokenising the next batch meanwhile. Replies are serialised with orjson.

Errors never become a 5xx: invalid JSON -> 400, empty input -> 400, wrong types or missing fields -> 422 naming
the field, too many or too long inputs -> 413 (or truncation), a missing or wrong bearer token -> 401. Bodies
follow OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

log = logging.getLogger("stm_ray.serve")

from stm_ray.serve import loopback as _loopback  # noqa: E402  (replicas import this module: patch before they start)

_loopback.install()

# ---------------------------------------------------------------------------------------------- request schemas


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request, plus ``input_type``. Unknown fields (``user``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    # token-id arrays (list[int], list[list[int]]) are accepted by the schema only to be refused with a clear 400
    input: str | list[str] | list[int] | list[list[int]] = Field(..., description="A text or a list of texts.")
    model: str | None = Field(None, description="Accepted and echoed; the server serves one model.")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes.")
    input_type: Literal["query", "document"] = Field(
        "query", description="query: the saved query instruction is prepended; document: the document prefix.")
    dimensions: int | None = Field(
        None, ge=1, description="Cut embeddings to this many coordinates (renormalised): for a model trained with "
                                "Matryoshka (train.matryoshka_dims); any other model answers its own dimension only.")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    query: str = Field(..., description="The query text (the query instruction is prepended).")
    top_k: int | None = Field(None, ge=1, description="How many documents (default 10; at most serve.max_top_k).")
    return_text: bool = Field(False, description="Include each document's text.")
    rerank: bool = Field(False, description="Retrieve rerank_k documents, re-score them with the served reranker and "
                                            "return the top_k best (needs serve.reranker).")
    rerank_k: int | None = Field(None, ge=1, description="Candidates reranked (default serve.rerank_k; at most "
                                                         "serve.max_inputs).")


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str


class RerankRequest(BaseModel):
    """The rerank request Cohere (v1 and v2), Jina and TEI-style clients send: a query and its documents (strings,
    or objects with a ``text`` field)."""

    model_config = ConfigDict(extra="ignore")
    query: str = Field(..., description="The query.")
    documents: list[str | RerankDocument] = Field(..., description="Texts to score against the query.")
    top_n: int | None = Field(None, ge=1, description="Return only the best top_n (default: all).")
    return_documents: bool = Field(False, description="Include each document ({'text': ...}) in the results.")
    model: str | None = Field(None, description="Accepted and echoed; the server serves one reranker.")


# ---------------------------------------------------------------------------------------------- helpers


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    import orjson

    return Response(content=orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> Response:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return _json({"error": {"message": message, "type": kind, "param": param, "code": code or str(status)}},
                 status, headers)


def _validation_response(e: ValidationError) -> Response:
    """invalid JSON -> 400; otherwise 422 naming the first offending field (and listing all)."""
    errors = e.errors(include_url=False, include_input=False)
    if any(err["type"] in ("json_invalid", "json_type") for err in errors):
        msg = errors[0].get("msg", "invalid JSON")
        return _error(400, f"request body is not valid JSON: {msg}", code="invalid_json")
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if not str(x).startswith(("function-", "str", "list[")))
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    first = errors[0].get("loc", ("body",))
    return _error(422, "; ".join(parts), param=str(first[0]) if first else None, code="invalid_field")


class _Forward(torch.nn.Module):
    """(input_ids, attention_mask) -> embeddings: the Embedder's forward with a traceable signature."""

    def __init__(self, emb) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, input_ids, attention_mask):
        return self.emb.forward({"input_ids": input_ids, "attention_mask": attention_mask})


def traced_forward(emb, pad_id: int, atol: float = 1e-4):
    """The Embedder's forward traced with TorchScript, or None when tracing fails or changes the vectors.

    A traced forward runs the whole graph in C++ with the GIL released: the eager Hugging Face forward spends most
    of a small model's time in Python (module dispatch), holding the GIL that the replica's event loops need.
    Checked against the eager forward on a batch of another shape before use."""
    dev = emb.device

    def batch(n: int, width: int) -> tuple:
        g = torch.Generator().manual_seed(n * 131 + width)
        ids = torch.randint(1000, 2000, (n, width), generator=g)
        mask = torch.ones(n, width, dtype=torch.long)
        mask[0, width // 2:] = 0  # ragged rows: padding must not change the result
        ids[0, width // 2:] = pad_id
        return ids.to(dev), mask.to(dev)

    try:
        import warnings

        wrapper = _Forward(emb).eval()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(wrapper, batch(2, 8), check_trace=False)
            for n, w in ((3, 13), (1, 5), (5, 31)):
                x = batch(n, w)
                diff = (traced(*x) - wrapper(*x)).abs().max().item()
                if not diff <= atol:
                    log.warning("traced forward differs from eager by %.2e on shape (%d, %d): using eager", diff, n, w)
                    return None
        return traced
    except Exception as e:  # noqa: BLE001 - any tracing failure falls back to the eager forward
        log.warning("TorchScript tracing failed (%s: %s): using the eager forward", type(e).__name__, e)
        return None


def _normal_priority() -> None:
    """Ray starts workers at nice 15; a serving replica should not lose the CPU to Ray's own processes. Lowering
    the niceness needs privileges; without them the replica keeps Ray's (start Ray with RAY_worker_niceness=0)."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError):
        log.info("replica runs at nice %s (start Ray with RAY_worker_niceness=0 for normal priority)",
                 os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else "?")


def resolve_args(args: dict[str, Any]) -> dict[str, Any]:
    """The app's arguments with every missing value filled from the defaults (ServeConfig's for ``serve.*``), so
    a hand-edited Serve config may leave fields out."""
    from stm_ray.config import ServeConfig

    defaults = {**ServeConfig().model_dump(), "dtype": "float32", "device": "auto", "max_length": None,
                "index_dir": None, "model_name": None, "log_level": "INFO", "token_sha256": None, "replica_env": {}}
    return {**defaults, **args}


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def resolve_token_hash(token_env: str | None) -> str | None:
    """The sha256 of the token in ``$token_env`` (what a replica needs to check requests; never the token)."""
    if not token_env:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise ValueError(f"serve.token_env={token_env!r} but the environment variable {token_env} is empty or unset")
    return token_hash(token)


# ---------------------------------------------------------------------------------------------- the deployment

api = FastAPI(
    title="stm-ray retriever",
    description="OpenAI-compatible embeddings and corpus search for a Synthesize-Train-Merge retriever.",
    version="1",
)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@serve.deployment(name="Retriever", max_ongoing_requests=256, health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(api)
class Retriever:
    """One replica: the model, its tokenizer, optionally a corpus index, and the HTTP routes."""

    def __init__(self, args: dict[str, Any]) -> None:
        from stm_ray.modeling import Embedder
        from stm_ray.utils import setup_logging

        args = resolve_args(args)
        setup_logging(args["log_level"])
        _normal_priority()
        if not args["num_gpus"]:
            torch.set_num_threads(int(args["torch_threads"] or os.cpu_count() or 1))
        t0 = time.perf_counter()
        self.emb = Embedder.from_pretrained(args["model"], dtype=args["dtype"], device=args["device"],
                                            max_length=args["max_length"])
        self.emb.eval()
        self.pad_id = int(self.emb.tokenizer.pad_token_id or 0)
        self.model_id = args["model_name"] or os.path.basename(str(args["model"]).rstrip("/")) or "model"
        self.prompts = {"query": self.emb.query_instruction, "document": self.emb.document_instruction}
        self.max_inputs = int(args["max_inputs"])
        self.max_chars = int(args["max_chars"])
        self.truncate = args["on_too_long"] == "truncate"
        self.max_top_k = int(args["max_top_k"])
        # a body can't be larger than this and still be valid (JSON escapes at most ~6 bytes per char)
        self.max_body = self.max_inputs * self.max_chars * 6 + 65536
        self.token_sha = args["token_sha256"]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._idle = asyncio.Event()
        self._idle.set()
        self._batched.set_max_batch_size(int(args["max_batch_size"]))
        self._batched.set_batch_wait_timeout_s(float(args["batch_wait_timeout_s"]))
        self.stats = {"batches": 0, "texts": 0, "forward_s": 0.0}
        self.index = None
        if args["index_dir"]:
            from stm_ray.serve.index import CorpusIndex

            self.index = CorpusIndex.load(args["index_dir"], backend=args["search_backend"],
                                          faiss_factory=args["faiss_factory"], dimension=args["index_dimension"])
            if args["index_dimension"] and not self.emb.matryoshka_dims:
                log.warning("serve.index_dimension=%d on a model not trained for truncation (no matryoshka_dims in "
                            "its stm_ray.json): expect lower search quality", args["index_dimension"])
        self.reranker = None
        self.reranker_id = None
        self.rerank_k = int(args["rerank_k"])
        if args["reranker"]:
            from stm_ray.rerank.model import load_reranker

            self.reranker = load_reranker(args["reranker"], device=args["device"])
            self.reranker_id = os.path.basename(str(args["reranker"]).rstrip("/")) or "reranker"
            self.reranker.score("warm up", ["warm up"])
        self.traced = traced_forward(self.emb, self.pad_id)
        self._forward_ids(self.emb.token_ids(["warm up"])["input_ids"])
        log.info("replica ready in %.1f s: model %s (dim %d, %s forward, %d torch threads), index %s, reranker %s",
                 time.perf_counter() - t0, self.model_id, self.emb.dim,
                 "traced" if self.traced is not None else "eager", torch.get_num_threads(),
                 f"{len(self.index)} documents ({self.index.backend})" if self.index is not None else "none",
                 f"{self.reranker_id} ({self.reranker.kind})" if self.reranker is not None else "none")

    # ------------------------------------------------------------------ model path
    def _forward_ids(self, items: list[list[int]]) -> np.ndarray:
        n, width = len(items), max(len(x) for x in items)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, x in enumerate(items):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        dev = self.emb.device
        with torch.inference_mode():
            x, m = torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev)
            out = self.traced(x, m) if self.traced is not None else self.emb.forward({"input_ids": x, "attention_mask": m})
        return out.float().cpu().numpy()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[list[int]]) -> list[np.ndarray]:
        # one item = one text's token ids; sorting by length keeps padding small within the batch
        self._idle.clear()
        try:
            order = sorted(range(len(items)), key=lambda i: len(items[i]))
            t0 = time.perf_counter()
            vecs = await asyncio.get_running_loop().run_in_executor(self.pool, self._forward_ids,
                                                                    [items[i] for i in order])
            self.stats["batches"] += 1
            self.stats["texts"] += len(items)
            self.stats["forward_s"] += time.perf_counter() - t0
        finally:
            self._idle.set()
        out: list[np.ndarray] = [None] * len(items)  # type: ignore[list-item]
        for j, i in enumerate(order):
            out[i] = vecs[j]
        return out

    async def embed(self, texts: list[str], input_type: str) -> tuple[np.ndarray, int]:
        """Vectors [n, dim] and the number of tokens, through the dynamic batcher."""
        enc = self.emb.token_ids(texts, self.prompts[input_type], return_attention_mask=False,
                                 return_token_type_ids=False)["input_ids"]
        # Tokenised while the model is busy; submitted when it is free, so @serve.batch forms one batch of
        # everything that queued up meanwhile instead of many small ones that wait their turn.
        while not self._idle.is_set():
            await self._idle.wait()
        vecs = await asyncio.gather(*(self._batched(x) for x in enc))
        return np.stack(vecs), sum(len(x) for x in enc)

    # ------------------------------------------------------------------ request checks
    def _unauthorized(self, request: Request) -> Response | None:
        if not self.token_sha:
            return None
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_hash(token.strip()), self.token_sha):
            return _error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _read(self, request: Request, schema: type[BaseModel]) -> BaseModel | Response:
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            return _error(413, f"request body of {length} bytes exceeds {self.max_body}", code="body_too_large")
        body = await request.body()
        if len(body) > self.max_body:
            return _error(413, f"request body of {len(body)} bytes exceeds {self.max_body}", code="body_too_large")
        if not body.strip():
            return _error(400, "request body is empty; send JSON", code="empty_body")
        try:
            return schema.model_validate_json(body)
        except ValidationError as e:
            return _validation_response(e)

    def _check_texts(self, texts: list[str], param: str, single: bool) -> list[str] | Response:
        if not texts:
            return _error(400, f"'{param}' is empty: send at least one text", param=param, code="empty_input")
        if len(texts) > self.max_inputs:
            return _error(413, f"'{param}' has {len(texts)} texts; at most {self.max_inputs} per request",
                          param=param, code="too_many_inputs")
        out = texts
        for i, t in enumerate(texts):
            where = param if single else f"{param}[{i}]"
            if not t or not t.strip():
                return _error(400, f"'{where}' is empty", param=param, code="empty_input")
            if len(t) > self.max_chars:
                if not self.truncate:
                    return _error(413, f"'{where}' has {len(t)} characters; at most {self.max_chars}", param=param,
                                  code="input_too_long")
                if out is texts:
                    out = list(texts)
                out[i] = t[: self.max_chars]
        return out

    def _dimensions(self, dimensions: int | None) -> int | None | Response:
        """None (the full embedding) or the cut to apply; a 400 that says why when the model can't give it."""
        if dimensions is None or dimensions == self.emb.dim:
            return None
        if dimensions > self.emb.dim:
            return _error(400, f"dimensions={dimensions} is above the model's {self.emb.dim}", param="dimensions",
                          code="invalid_dimensions")
        if not self.emb.matryoshka_dims:
            return _error(400, f"dimensions={dimensions}: this model gives {self.emb.dim} dimensions and was not "
                               "trained to be cut (train it with train.matryoshka_dims, e.g. [384, 256, 128, 64])",
                          param="dimensions", code="invalid_dimensions")
        return dimensions

    # ------------------------------------------------------------------ routes
    @api.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingsRequest),
              summary="OpenAI-compatible embeddings")
    async def embeddings(self, request: Request) -> Response:
        req = await self._read(request, EmbeddingsRequest)
        if isinstance(req, Response):
            return req
        single = isinstance(req.input, str)
        if not single and req.input and not isinstance(req.input[0], str):
            return _error(400, "'input' holds token ids; this server takes text: send a string or a list of strings "
                               "(OpenAI-style clients that tokenize first have an option to send text, e.g. "
                               "LangChain's OpenAIEmbeddings(check_embedding_ctx_length=False))",
                          param="input", code="token_ids_not_supported")
        texts = self._check_texts([req.input] if single else req.input, "input", single)
        if isinstance(texts, Response):
            return texts
        dim = self._dimensions(req.dimensions)
        if isinstance(dim, Response):
            return dim
        vecs, n_tokens = await self.embed(texts, req.input_type)
        if dim is not None:
            from stm_ray.modeling.embedder import truncate

            vecs = truncate(vecs, dim, self.emb.normalize)
        if req.encoding_format == "base64":
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()} for i, v in enumerate(vecs)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
        return _json({"object": "list", "data": data, "model": self.model_id,
                      "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    def _no_reranker(self) -> Response:
        return _error(400, "no reranker is served here (start it with --reranker FOLDER or serve.reranker=FOLDER)",
                      param="rerank", code="no_reranker")

    async def _score(self, query: str, docs: list[str]) -> np.ndarray:
        """Reranker scores, computed in the forward thread (one model at a time on the replica's cores)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.reranker.score, query, docs)

    @api.post("/search", openapi_extra=_body_schema(SearchRequest), summary="Top-k documents of the indexed corpus")
    async def search(self, request: Request) -> Response:
        req = await self._read(request, SearchRequest)
        if isinstance(req, Response):
            return req
        if self.index is None:
            return _error(404, "no corpus is indexed on this server (start it with --corpus TASK)", code="no_index")
        texts = self._check_texts([req.query], "query", True)
        if isinstance(texts, Response):
            return texts
        top_k = min(10, self.max_top_k) if req.top_k is None else req.top_k
        if top_k > self.max_top_k:
            return _error(413, f"top_k={top_k} exceeds serve.max_top_k={self.max_top_k}", param="top_k",
                          code="top_k_too_large")
        k = top_k
        if req.rerank:
            if self.reranker is None:
                return self._no_reranker()
            k = max(top_k, req.rerank_k or self.rerank_k)
            if k > self.max_inputs:
                return _error(413, f"rerank_k={k} exceeds serve.max_inputs={self.max_inputs}", param="rerank_k",
                              code="rerank_k_too_large")
        vecs, _ = await self.embed(texts, "query")
        if self.index.dim < vecs.shape[1]:  # serve.index_dimension: the query is cut like the documents
            from stm_ray.modeling.embedder import truncate

            vecs = truncate(vecs, self.index.dim)
        loop = asyncio.get_running_loop()
        scores, idx = await loop.run_in_executor(None, self.index.search, vecs, k)
        hits = [(s, i) for s, i in zip(scores[0].tolist(), idx[0].tolist()) if i >= 0]
        results = []
        if req.rerank and hits:
            rr = await self._score(texts[0], [self.index.texts[i][: self.max_chars] for _, i in hits])
            order = sorted(range(len(hits)), key=lambda j: -rr[j])[:top_k]
            for j in order:
                r = {"id": self.index.ids[hits[j][1]], "score": float(rr[j]), "retrieval_score": hits[j][0]}
                if req.return_text:
                    r["text"] = self.index.texts[hits[j][1]]
                results.append(r)
        else:
            for s, i in hits:
                r = {"id": self.index.ids[i], "score": s}
                if req.return_text:
                    r["text"] = self.index.texts[i]
                results.append(r)
        out = {"query": req.query, "model": self.model_id, "results": results}
        if req.rerank:
            out["reranker"] = self.reranker_id
        return _json(out)

    @api.post("/v1/rerank", openapi_extra=_body_schema(RerankRequest),
              summary="Rerank documents for a query (Cohere / Jina / TEI shape)")
    async def rerank(self, request: Request) -> Response:
        req = await self._read(request, RerankRequest)
        if isinstance(req, Response):
            return req
        if self.reranker is None:
            return self._no_reranker()
        query = self._check_texts([req.query], "query", True)
        if isinstance(query, Response):
            return query
        docs = self._check_texts([d if isinstance(d, str) else d.text for d in req.documents], "documents", False)
        if isinstance(docs, Response):
            return docs
        scores = await self._score(query[0], docs)
        order = sorted(range(len(docs)), key=lambda j: -scores[j])[: req.top_n or len(docs)]
        results = []
        for j in order:
            r: dict[str, Any] = {"index": j, "relevance_score": float(scores[j])}
            if req.return_documents:
                r["document"] = {"text": docs[j]}
            results.append(r)
        n_tokens = sum(len(t) for t in docs) // 4  # an estimate, as "search_units" are for Cohere
        return _json({"id": f"rerank-{time.time_ns():x}", "model": self.reranker_id, "results": results,
                      "meta": {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}},
                      "usage": {"total_tokens": n_tokens}})

    # Cohere's v2 client posts the same body to /v2/rerank
    api.post("/v2/rerank", include_in_schema=False)(rerank)

    @api.get("/health", summary="Liveness: 200 when the model answers")
    async def health(self) -> Response:
        return _json({"status": "ok", "model": self.model_id, "dim": self.emb.dim, "pid": os.getpid(),
                      "index_dim": self.index.dim if self.index is not None else None,
                      "documents": len(self.index) if self.index is not None else 0, "stats": self.stats})

    @api.get("/v1/models", summary="The served model (OpenAI format)")
    async def models(self, request: Request) -> Response:
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        return _json({"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                                  "owned_by": "stm-ray", "dimension": self.emb.dim,
                                                  "matryoshka_dims": self.emb.matryoshka_dims,
                                                  "query_instruction": self.prompts["query"]}]
                      + ([{"id": self.reranker_id, "object": "model", "created": 0, "owned_by": "stm-ray",
                           "type": "reranker", "kind": self.reranker.kind}] if self.reranker is not None else [])})


# ---------------------------------------------------------------------------------------------- building


def deployment_options(args: dict[str, Any]) -> dict[str, Any]:
    """Replicas (fixed or autoscaling), in-flight limit and resources, from the app args."""
    args = resolve_args(args)
    opts: dict[str, Any] = {
        "max_ongoing_requests": int(args["max_ongoing_requests"]),
        "ray_actor_options": {"num_cpus": float(args["num_cpus"]), "num_gpus": float(args["num_gpus"]),
                              # direct ingress: the replica reads Serve's flags from its own environment
                              **({"runtime_env": {"env_vars": dict(args["replica_env"])}} if args["replica_env"] else {})},
        "logging_config": {"enable_access_log": bool(args["access_log"]), "log_level": args["log_level"]},
    }
    lo, hi = int(args["min_replicas"]), int(args["max_replicas"])
    if lo == hi:
        opts["num_replicas"] = lo
    else:
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                      "target_ongoing_requests": float(args["target_ongoing_requests"])}
    return opts


def build_app(args: dict[str, Any]):
    """Application builder: the ``import_path`` of the Serve config (``stm_ray.serve.app:build_app``).

    ``args`` are plain values (see :func:`stm_ray.serve.deploy.app_args`). A ``token_env`` is resolved here, on
    the cluster, into its sha256: the token never travels in a config."""
    args = resolve_args(args)
    if args["token_env"] and not args["token_sha256"]:
        args["token_sha256"] = resolve_token_hash(args["token_env"])
    return Retriever.options(**deployment_options(args)).bind(args)
