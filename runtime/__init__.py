"""Shared primitives every room uses; this package imports nothing of the project's own."""
