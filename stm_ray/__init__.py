"""stm-ray: Synthesize-Train-Merge domain retrievers on Ray."""

__version__ = "0.1.0"
