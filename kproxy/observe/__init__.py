"""What operators see: Prometheus metrics, health checks, and the small HTTP servers that serve them."""
