"""Pytest root: puts the repository root on sys.path so tests can import examples.*."""
