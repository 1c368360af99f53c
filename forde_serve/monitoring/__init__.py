"""Serving under shift: the label-free shift test, adaptive prediction sets, and the monitor that
keeps both in the state every worker shares."""
