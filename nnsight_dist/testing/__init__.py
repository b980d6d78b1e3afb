"""Test helpers for nnsight_dist (tiny offline models, ...)."""

from nnsight_dist.testing.tiny import make_tiny_model

__all__ = ["make_tiny_model"]
