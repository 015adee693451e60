"""Tandem services: one package per role, each started with `python -m services.<role>`."""
