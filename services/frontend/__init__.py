"""The frontend service."""
