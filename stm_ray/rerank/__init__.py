"""Rerankers: a cross-encoder and LimRank's pointwise LLM reranker, trained on Ray from the synthesized shards,
scored by the rerank stage and served at /v1/rerank."""

from stm_ray.rerank.model import CrossEncoderReranker, LLMReranker, Reranker, load_reranker

__all__ = ["CrossEncoderReranker", "LLMReranker", "Reranker", "load_reranker"]
