"""Serving under shift: the state every worker shares and the service's Prometheus metrics."""
