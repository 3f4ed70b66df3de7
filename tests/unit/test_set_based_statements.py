"""Many argument rows of one statement as one set-based UPDATE, and when that is refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from projections.writer import ReadModelWriter, set_based

WRITER = ReadModelWriter("public")
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
IDS = [uuid.UUID(int=1), uuid.UUID(int=2)]


def test_an_update_reads_its_parameters_from_an_unnest_of_one_array_each() -> None:
    sql = "UPDATE t SET a = $2, b = $3 WHERE id = $1 AND position < $2"
    many = set_based(sql, [(IDS[0], 5, "x"), (IDS[1], 7, "y")], WRITER.counts)
    assert many is not None
    statement, arrays = many
    assert statement == (
        "UPDATE t SET a = v.p2, b = v.p3"
        " FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS v(p1, p2, p3)"
        " WHERE id = v.p1 AND position < v.p2"
    )
    assert arrays == [IDS, [5, 7], ["x", "y"]]


def test_an_update_with_a_from_list_gets_the_rows_added_to_it() -> None:
    sql = "UPDATE t AS x SET a = (SELECT 1 FROM s WHERE s.k = $2) FROM u WHERE x.id = $1"
    many = set_based(sql, [(IDS[0], AT), (IDS[1], AT)], WRITER.counts)
    assert many is not None
    assert many[0] == (
        "UPDATE t AS x SET a = (SELECT 1 FROM s WHERE s.k = v.p2) FROM u,"
        " unnest($1::uuid[], $2::timestamptz[]) AS v(p1, p2) WHERE x.id = v.p1"
    )


def test_a_parameter_that_is_none_in_every_row_becomes_an_untyped_null() -> None:
    sql = "UPDATE t SET a = $2::jsonb, b = $3 WHERE id = $1"
    many = set_based(sql, [(IDS[0], None, 1.5), (IDS[1], None, 2)], WRITER.counts)
    assert many is not None
    statement, arrays = many
    assert "a = NULL::jsonb, b = v.p2" in statement
    assert "unnest($1::uuid[], $2::double precision[])" in statement
    assert arrays == [IDS, [1.5, 2]]


def test_booleans_are_not_taken_for_integers() -> None:
    many = set_based("UPDATE t SET a = $2 WHERE id = $1", [(IDS[0], True)], WRITER.counts)
    assert many is not None
    assert "$2::boolean[]" in many[0]


def test_the_shared_counts_table_is_updated_row_by_row() -> None:
    # An UPDATE … FROM changes each target row once, however many source rows match it.
    sql = f"UPDATE {WRITER.counts} AS c SET tickets = c.tickets + 1 WHERE c.tenant = $1"
    assert set_based(sql, [("acme",), ("acme",)], WRITER.counts) is None


def test_an_insert_of_values_selects_them_from_the_rows() -> None:
    sql = "INSERT INTO t (id, n) VALUES ($1, $2::bigint) ON CONFLICT (id) DO NOTHING"
    many = set_based(sql, [(IDS[0], 1), (IDS[1], 2)], WRITER.counts)
    assert many is not None
    assert many[0] == (
        "INSERT INTO t (id, n) SELECT v.p1, v.p2::bigint"
        " FROM unnest($1::uuid[], $2::bigint[]) AS v(p1, p2) ON CONFLICT (id) DO NOTHING"
    )


def test_an_insert_from_a_select_puts_the_rows_first_so_later_items_may_use_them() -> None:
    sql = "INSERT INTO t (id, k) SELECT $1, s.k FROM jsonb_to_recordset($2::jsonb) AS s(k text)"
    many = set_based(sql, [(IDS[0], "[]"), (IDS[1], "[]")], WRITER.counts)
    assert many is not None
    assert many[0] == (
        "INSERT INTO t (id, k) SELECT v.p1, s.k FROM unnest($1::uuid[], $2::text[]) AS v(p1, p2),"
        " jsonb_to_recordset(v.p2::jsonb) AS s(k text)"
    )


def test_statements_with_ctes_array_parameters_or_mixed_types_run_row_by_row() -> None:
    cte = "WITH x AS (INSERT INTO t (id) VALUES ($1) RETURNING id) SELECT 1"
    assert set_based(cte, [(IDS[0],), (IDS[1],)], WRITER.counts) is None
    arrays = "UPDATE t SET a = 1 WHERE id = $1 AND status = ANY($2::text[])"
    assert set_based(arrays, [(IDS[0], ["a"]), (IDS[1], ["b"])], WRITER.counts) is None
    mixed = "UPDATE t SET a = $2 WHERE id = $1"
    assert set_based(mixed, [(IDS[0], "x"), (IDS[1], 3)], WRITER.counts) is None
