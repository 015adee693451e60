"""Tandem: a disaggregated LLM serving mesh of gRPC microservices."""

__version__ = "0.1.0"
