"""Leaf helpers with no dependency on the rest of the package (any layer may import them)."""
