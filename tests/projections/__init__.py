"""Tests of :mod:`projections`; helpers and fixtures live in ``conftest.py``."""
