"""The query HTTP API over the read models."""
