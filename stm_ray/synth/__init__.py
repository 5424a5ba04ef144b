"""Synthesize: hard-negative mining (and, with the Synthesize issue, LLM-written negatives through ray.data.llm)."""
