"""Serve: a Ray Serve application for a retriever (OpenAI-compatible /v1/embeddings, /search, /health,
/v1/models), its corpus index, the Serve config file and a small load generator."""

from stm_ray.serve.deploy import app_args, resolve_target, serve_config, serve_config_yaml, start
from stm_ray.serve.index import CorpusIndex, build_index, index_fingerprint

__all__ = ["CorpusIndex", "app_args", "build_index", "index_fingerprint", "resolve_target", "serve_config",
           "serve_config_yaml", "start"]
