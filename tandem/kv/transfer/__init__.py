"""KV-cache transfer between prefill and decode workers: chunk plans, leases and transports."""
