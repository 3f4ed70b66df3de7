"""The read-path benchmark's verdict on the command-to-visible lag."""

from __future__ import annotations

from benchmarks.read_path import Sample, lag_verdict


def test_the_read_path_benchmark_says_whether_the_lag_met_its_aim() -> None:
    def samples(lags: list[float]) -> list[Sample]:
        # The polling reads are slow here: they are not what the aim judges.
        polled = [Sample("poll", 5.0, 500.0, 9, None) for _ in lags]
        return [Sample("wait", 5.0, lag, 1, 2.0) for lag in lags] + polled

    assert lag_verdict(samples([8.0] * 97 + [40.0] * 3)) == (
        "met: p50 8.00 ms (aim 15), p99 40.00 ms (aim 60)"
    )
    assert lag_verdict(samples([8.0] * 97 + [90.0] * 3)).startswith("missed: p50 8.00 ms")
    assert lag_verdict(samples([16.0] * 100)).startswith("missed: p50 16.00 ms")
