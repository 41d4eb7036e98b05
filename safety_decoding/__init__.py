"""Explicit safety signals in the decode loop (Li & Kim, ICML 2025): the pure library."""
