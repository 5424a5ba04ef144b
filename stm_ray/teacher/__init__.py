"""The teacher stage: a score for the positive and each hard negative of every synthesized row, from a reranker or
the generator LLM's own feedback, for distillation (``train.distill``)."""

from stm_ray.teacher.scores import teacher_scores

__all__ = ["teacher_scores"]
