"""Ray Tune searches over query instructions (``search_instructions``, ``search_pool_size``), the dev sets and
scores every search uses (also the merge search in :mod:`stm_ray.merge.search`), and the shared Tune plumbing."""

from stm_ray.tune.instructions import (
    InstructionSearchResult,
    candidate_instructions,
    instruction_table,
    search_instructions,
    search_pool_size,
)

__all__ = ["InstructionSearchResult", "candidate_instructions", "instruction_table", "search_instructions",
           "search_pool_size"]
