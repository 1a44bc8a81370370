"""Integrate."""
