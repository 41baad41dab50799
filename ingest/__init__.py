"""Interaction ingest service: validation, storage, analysis and live feed."""
