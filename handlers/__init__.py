"""Stateless JetStream consumers: ingest, inference dispatch, retries and dead letters."""
