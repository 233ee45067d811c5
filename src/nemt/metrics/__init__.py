"""Metrics over batched maps (B, T, *spatial); one value per map. See each function's docstring."""
from nemt.metrics.localisation import relevance_mass, relevance_rank

__all__ = ["relevance_mass", "relevance_rank"]
