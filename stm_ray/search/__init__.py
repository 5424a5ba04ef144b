"""Ray Tune searches: query instructions (``search_instructions``, ``search_pool_size``) and mergekit merges
(``search_merge``), both scored by mean dev NDCG@10 over the configured tasks."""

from stm_ray.search.instructions import (
    InstructionSearchResult,
    candidate_instructions,
    instruction_table,
    search_instructions,
    search_pool_size,
)
from stm_ray.search.merge_search import MergeSearchResult, merge_table, search_merge

__all__ = ["InstructionSearchResult", "MergeSearchResult", "candidate_instructions", "instruction_table",
           "merge_table", "search_instructions", "search_merge", "search_pool_size"]
