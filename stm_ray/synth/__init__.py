"""Synthesize: hard negatives mined (BM25, dense) and written by an LLM (ray.data.llm), as parquet shards."""

from stm_ray.synth.negatives import SynthResult, synthesize
from stm_ray.synth.queries import synthesize_queries

__all__ = ["SynthResult", "synthesize", "synthesize_queries"]
