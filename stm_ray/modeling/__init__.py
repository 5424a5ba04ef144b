"""Embedding models: one Embedder over HF encoders and decoder-only LLMs, plus offline aliases."""

from stm_ray.modeling.aliases import ALIASES, model_fingerprint, resolve_model
from stm_ray.modeling.embedder import Embedder, instruction_prefix, is_decoder_config

__all__ = ["ALIASES", "Embedder", "instruction_prefix", "is_decoder_config", "model_fingerprint",
           "resolve_model"]
