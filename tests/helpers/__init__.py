"""Builders of tiny test data shared by several test modules (no test module imports another).

Session-wide fixtures built from them live in ``tests/conftest.py``.
"""
