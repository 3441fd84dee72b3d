"""Ingest: MQTT consumer, payload models, codecs, batched storage, dead letters."""
