"""Inference: backends, embeddings, retrieval, prompt building and the pipeline definitions."""
