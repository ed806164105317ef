"""Kiln's internal certificate authority and certificates."""
