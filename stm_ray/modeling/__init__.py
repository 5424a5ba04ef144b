"""Embedding models: one Embedder over HF encoders and decoder-only LLMs, plus offline aliases."""

from stm_ray.modeling.aliases import ALIASES, resolve_model
from stm_ray.modeling.embedder import Embedder, instruction_prefix, is_decoder_config

__all__ = ["ALIASES", "Embedder", "instruction_prefix", "is_decoder_config", "resolve_model"]
