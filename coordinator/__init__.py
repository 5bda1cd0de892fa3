"""Ingest, forecasting, market clearing, settlement and grid balancing."""
