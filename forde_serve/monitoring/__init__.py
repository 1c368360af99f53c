"""Serving under shift: the state every worker shares and the service's Prometheus metrics, the
label-free shift test, adaptive prediction sets, and the monitor that keeps them in that state."""
