"""Reciprocal rank fusion: the order it produces, its tie-breaking and its scores."""

from __future__ import annotations

import pytest

from inference.retrieval import reciprocal_rank_fusion


def test_scores_are_sums_of_reciprocal_ranks() -> None:
    fused = dict(reciprocal_rank_fusion([["a", "b"], ["b", "c"]], k=60))
    assert fused == pytest.approx({"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 62})


def test_fusion_orders_by_combined_rank() -> None:
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]])
    # a: 1/61 + 1/62, c: 1/63 + 1/61, b: 1/62, d: 1/63
    assert [key for key, _ in fused] == ["a", "c", "b", "d"]
    scores = [score for _, score in fused]
    assert scores == sorted(scores, reverse=True)


def test_an_item_in_both_rankings_beats_the_top_of_one() -> None:
    vector = [f"v{i}" for i in range(9)] + ["both"]
    text = ["t0", *(f"t{i}" for i in range(1, 9)), "both"]
    fused = reciprocal_rank_fusion([vector, text])
    # Tenth in both (2/70) still beats first in only one (1/61).
    assert fused[0][0] == "both"


def test_equal_scores_are_ordered_by_key_whatever_the_input_order() -> None:
    first = reciprocal_rank_fusion([[("doc-b", 1), ("doc-a", 2)], [("doc-a", 2), ("doc-b", 1)]])
    second = reciprocal_rank_fusion([[("doc-a", 2), ("doc-b", 1)], [("doc-b", 1), ("doc-a", 2)]])
    assert [key for key, _ in first] == [("doc-a", 2), ("doc-b", 1)]
    assert first == second


def test_ties_between_single_list_items_follow_document_then_ordinal() -> None:
    fused = reciprocal_rank_fusion([[("b", 0)], [("a", 7)], [("a", 3)]])
    assert [key for key, _ in fused] == [("a", 3), ("a", 7), ("b", 0)]


def test_a_key_repeated_in_one_ranking_counts_once_at_its_best_rank() -> None:
    fused = dict(reciprocal_rank_fusion([["a", "b", "a"]], k=0))
    assert fused == {"a": 1.0, "b": 0.5}


def test_no_rankings_fuse_to_nothing() -> None:
    assert reciprocal_rank_fusion([]) == []
    assert reciprocal_rank_fusion([[], []]) == []


def test_a_negative_k_is_refused() -> None:
    with pytest.raises(ValueError, match="k must not be negative"):
        reciprocal_rank_fusion([["a"]], k=-1)
