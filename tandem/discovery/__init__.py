"""Service discovery backends shared by the services (the embedded registry lives in the router)."""
