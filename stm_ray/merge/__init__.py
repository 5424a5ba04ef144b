"""Model merging: mergekit's Python API (with a shim for mergekit 0.1.5's BERT alias bug) and the Ray Tune search
over merge methods and coefficients that picks the merged model."""

from stm_ray.merge.mergekit_run import METHODS, merge_models, mergekit_config, prepare_base
from stm_ray.merge.search import MergeSearchResult, merge_table, search_merge

__all__ = ["METHODS", "MergeSearchResult", "merge_models", "merge_table", "mergekit_config", "prepare_base",
           "search_merge"]
