"""Fixtures that start a real Mosquitto (filled in with the broker configuration work)."""
