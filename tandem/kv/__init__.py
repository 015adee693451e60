"""KV-cache pieces shared by engines and the router: block hashing today, transfer later."""
