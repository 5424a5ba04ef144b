"""Model merging through mergekit's Python API, plus a shim for mergekit 0.1.5's BERT alias bug."""

from stm_ray.merge.mergekit_run import METHODS, merge_models, mergekit_config, prepare_base

__all__ = ["METHODS", "merge_models", "mergekit_config", "prepare_base"]
