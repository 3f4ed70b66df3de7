"""Output quality of the shipped pipelines (hand-made data set):
`python -m benchmarks.quality`."""
