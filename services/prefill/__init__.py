"""The prefill worker: filled by the disaggregation issue (#3)."""
