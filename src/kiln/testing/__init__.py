"""Helpers for Kiln's own tests (and for people testing against Kiln)."""
