"""The feature-table writer: one pyarrow file per day, the bytes Spark's files had, atomic swap."""

from __future__ import annotations

from datetime import date

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features import feature_tables as ft
from features.jobs import USER_STATE_DDL

D1, D2, D3 = date(2024, 1, 1), date(2024, 1, 2), date(2024, 1, 3)
SCHEMA = pa.schema([("key", pa.int64()), ("seq", pa.list_(pa.int64())), ("dt", pa.date32())])


def batch(keys: list[int], days: list[date]) -> pa.RecordBatch:
    return pa.record_batch({"key": keys, "seq": [[k] * k for k in keys], "dt": days}, schema=SCHEMA)


def written_files(folder) -> dict[date, bytes]:
    return {
        day: (ft.partition_path(folder, day) / ft.PART_FILE).read_bytes()
        for day in ft.partition_days(folder)
    }


def test_day_writer_gives_one_file_per_day_whatever_the_batches(tmp_path):
    metadata = {b"org.apache.spark.version": b"x"}
    # sorted by dt, a day spread over batches, an empty batch in between
    batches = [
        batch([1, 2, 3], [D1, D1, D2]),
        batch([], []),
        batch([4], [D2]),
        batch([5, 6], [D2, D3]),
    ]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    days = ft._write_sorted_days(str(tmp_path / "a"), metadata, iter(batches))
    assert [row.column("dt").to_pylist() for row in days] == [[D1], [D2], [D3]]
    part = pq.read_table(ft.partition_path(tmp_path / "a", D2) / ft.PART_FILE)
    assert part.column_names == ["key", "seq"]
    assert part.column("key").to_pylist() == [3, 4, 5]
    assert part.schema.metadata == metadata

    # the same rows in one batch: the same bytes (a re-run's batch sizes may differ)
    whole = pa.Table.from_batches(batches).combine_chunks().to_batches()
    list(ft._write_sorted_days(str(tmp_path / "b"), metadata, iter(whole)))
    assert written_files(tmp_path / "a") == written_files(tmp_path / "b")


def test_day_writer_holds_one_row_group_and_its_bytes_depend_on_the_rows_only(
    tmp_path, monkeypatch
):
    """A day longer than a row group is written group by group; however Spark batches the
    rows, the bytes are the same, and a day within one group is what write_table gives."""
    monkeypatch.setattr(ft, "ROW_GROUP_ROWS", 4)
    keys = list(range(1, 11))
    rows = pa.Table.from_batches([batch(keys, [D1] * 10)])
    for name, sizes in (("a", [10]), ("b", [1, 2, 3, 4]), ("c", [5, 5])):
        (tmp_path / name).mkdir()
        parts, offset = [], 0
        for size in sizes:
            parts += rows.slice(offset, size).to_batches()
            offset += size
        list(ft._write_sorted_days(str(tmp_path / name), {}, iter(parts)))
    files = [written_files(tmp_path / name) for name in ("a", "b", "c")]
    assert files[0] == files[1] == files[2]
    written = pq.ParquetFile(ft.partition_path(tmp_path / "a", D1) / ft.PART_FILE)
    assert written.metadata.num_row_groups == 3
    assert written.read().column("key").to_pylist() == keys
    # within one group: the bytes of the whole-table writer
    (tmp_path / "d").mkdir()
    metadata = {b"org.apache.spark.version": b"x"}
    list(ft._write_sorted_days(str(tmp_path / "d"), metadata, iter(rows.slice(0, 4).to_batches())))
    whole = rows.slice(0, 4).drop_columns(["dt"]).replace_schema_metadata(metadata)
    pq.write_table(whole, tmp_path / "whole.parquet", **ft.PARQUET_OPTIONS)
    assert written_files(tmp_path / "d")[D1] == (tmp_path / "whole.parquet").read_bytes()


def test_day_writer_refuses_a_day_split_across_tasks(tmp_path):
    list(ft._write_sorted_days(str(tmp_path), {}, iter([batch([1], [D1])])))
    with pytest.raises(FileExistsError):
        list(ft._write_sorted_days(str(tmp_path), {}, iter([batch([2], [D1])])))


@pytest.mark.spark
def test_files_carry_the_metadata_sparks_own_writer_puts(spark, tmp_path):
    from pyspark.sql import functions as F

    frame = spark.createDataFrame(
        [(1, [(5, 6, 7, "rating", 4.0)], 1, 4.0, 1, None)], USER_STATE_DDL
    ).withColumn("created", F.timestamp_micros(F.lit(1)))
    assert not frame.schema["created"].nullable  # required columns keep their flag too
    # microsecond timestamps, as the tables were written by Spark before (INT96 otherwise)
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    try:
        frame.coalesce(1).write.parquet(str(tmp_path / "spark"))
    finally:
        spark.conf.unset("spark.sql.parquet.outputTimestampType")
    (spark_file,) = (tmp_path / "spark").glob("part-*.parquet")
    assert pq.read_schema(spark_file).metadata == ft.spark_metadata(frame)

    ft.write_partitions(frame.withColumn("dt", F.lit(D1)), tmp_path / "ours", ["user_id"])
    ours = pq.read_table(ft.partition_path(tmp_path / "ours", D1) / ft.PART_FILE)
    assert ours.schema == pq.read_table(spark_file).schema
    assert ours.to_pylist() == pq.read_table(spark_file).to_pylist()
