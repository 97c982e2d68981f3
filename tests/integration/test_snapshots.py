"""Snapshots on real files: refresh, publish, verify, tamper, kill mid-write, rollback, prune."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from common.errors import UserFacingError
from grank.cli import cli
from grank.config import REPO_ROOT
from serving.bundle import (
    EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    NETWORK_FILE,
    load_snapshot,
    refresh_embeddings,
)
from serving.manifest import SnapshotError, verify_snapshot
from serving.mips import MipsConfig
from serving.recommender import NO_MODEL, Recommender, RecRequest
from serving.sequences import StaticUserSource, UserHistory
from serving.snapshots import (
    CURRENT,
    list_snapshots,
    point_current,
    prune_snapshots,
    publish_snapshot,
    read_current,
    rollback_target,
    version_dir,
)
from tests.conftest import make_settings
from training.checkpoint import load_checkpoint, save_checkpoint
from training.model import ITEM_TABLE_KEY, GRank, GRankConfig

DAY = date(2000, 12, 31)
N_ITEMS = 300


def make_refresh(root: Path, seed: int, n_items: int = N_ITEMS) -> Path:
    """A tiny real checkpoint (seeded) refreshed into an embeddings folder; returns the folder."""
    torch.manual_seed(seed)
    config = GRankConfig(
        n_item_rows=n_items + 1, dim=16, n_layers=1, n_heads=2, short_seq_len=8, long_seq_len=16
    )
    checkpoint = root / "checkpoints" / f"ckpt-{seed}"
    save_checkpoint(GRank(config).eval(), checkpoint, {"metrics": {"recall@50": 0.1 * seed}})
    popular = list(range(n_items, 0, -1))  # item n_items is the most popular
    out = root / "embeddings" / f"seed={seed}"
    refresh_embeddings(checkpoint, out, list(range(1, n_items + 1)), popular, batch_size=64)
    return out


def rollback(snapshots: Path, to: str | None = None) -> str:
    """What `grank snapshot rollback` does to CURRENT."""
    return point_current(snapshots, rollback_target(snapshots, to))


def publish(root: Path, source: Path, keep: int = 5) -> str:
    return publish_snapshot(root / "snapshots", source, DAY, {"feature_services": []}, keep=keep)


def test_refresh_writes_the_item_table_once_and_the_rest_of_the_network(tmp_path: Path) -> None:
    out = make_refresh(tmp_path, seed=1)
    matrix = np.load(out / EMBEDDINGS_FILE)
    ids = np.load(out / ITEM_IDS_FILE)
    assert matrix.shape == (N_ITEMS + 1, 16) and matrix.dtype == np.float32
    assert ids.tolist() == list(range(1, N_ITEMS + 1))
    torch.manual_seed(1)
    model = GRank(GRankConfig(N_ITEMS + 1, 16, 1, 2, 8, 16))
    np.testing.assert_array_equal(matrix, model.item_vectors().detach().numpy())
    network = load_file(str(out / NETWORK_FILE))
    assert ITEM_TABLE_KEY not in network and network  # the table is stored only as the matrix
    for name, tensor in model.state_dict().items():
        if name != ITEM_TABLE_KEY:
            assert torch.equal(network[name], tensor), name


def test_refresh_refuses_items_the_model_has_no_row_for(tmp_path: Path) -> None:
    out = make_refresh(tmp_path, seed=1)
    with pytest.raises(UserFacingError, match="outside the model's table"):
        refresh_embeddings(
            tmp_path / "checkpoints" / "ckpt-1", out, [1, N_ITEMS + 5], [1], progress=False
        )


def test_publish_writes_a_verified_version_and_moves_current(tmp_path: Path) -> None:
    source = make_refresh(tmp_path, seed=1)
    first = publish(tmp_path, source)
    second = publish(tmp_path, source)
    assert (first, second) == ("000001-2000-12-31", "000002-2000-12-31")
    snapshots = tmp_path / "snapshots"
    assert read_current(snapshots) == second
    manifest = verify_snapshot(snapshots / second)
    assert manifest["item_count"] == N_ITEMS and manifest["dim"] == 16
    assert manifest["dtype"] == "float32" and manifest["checkpoint_id"] == "ckpt-1"
    assert manifest["logical_date"] == "2000-12-31" and manifest["metrics"] == {"recall@50": 0.1}
    assert set(manifest["files"]) >= {EMBEDDINGS_FILE, ITEM_IDS_FILE, NETWORK_FILE}
    assert [i.version for i in list_snapshots(snapshots) if i.is_current] == [second]


@pytest.mark.parametrize("damage", ["flip", "truncate", "extra", "missing"])
def test_a_damaged_snapshot_is_refused(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "snapshots" / publish(tmp_path, make_refresh(tmp_path, seed=1))
    target = folder / EMBEDDINGS_FILE
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-4])
    elif damage == "extra":
        (folder / "stray.bin").write_bytes(b"x")
    else:
        target.unlink()
    with pytest.raises(SnapshotError, match=folder.name):
        verify_snapshot(folder)


def test_rollback_goes_to_the_previous_version_and_refuses_a_broken_one(tmp_path: Path) -> None:
    snapshots = tmp_path / "snapshots"
    source = make_refresh(tmp_path, seed=1)
    v1, v2, v3 = (publish(tmp_path, source) for _ in range(3))
    assert rollback(snapshots) == v2
    assert read_current(snapshots) == v2
    assert rollback(snapshots, to=v3) == v3
    emb = snapshots / v1 / EMBEDDINGS_FILE
    emb.write_bytes(emb.read_bytes()[:-1] + b"\x00")
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        rollback(snapshots, to=v1)
    assert read_current(snapshots) == v3
    with pytest.raises(SnapshotError, match="no snapshot"):
        rollback(snapshots, to="000009-2000-12-31")


@pytest.mark.parametrize(
    "name", ["../snapshots", "..", "/etc/passwd", "000001-2000-12-31/../../x", "a b", ""]
)
def test_version_names_cannot_escape_the_snapshots_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(SnapshotError, match="invalid snapshot version"):
        version_dir(tmp_path, name)
    with pytest.raises(SnapshotError, match="invalid snapshot version"):
        rollback(tmp_path, to=name)


def test_a_tampered_current_pointer_is_refused(tmp_path: Path) -> None:
    (tmp_path / CURRENT).write_text("../../etc\n")
    with pytest.raises(SnapshotError, match="invalid snapshot version"):
        read_current(tmp_path)


def test_retention_keeps_the_newest_k_and_never_the_current_one(tmp_path: Path) -> None:
    snapshots = tmp_path / "snapshots"
    source = make_refresh(tmp_path, seed=1)
    versions = [publish(tmp_path, source, keep=2) for _ in range(4)]
    assert [i.version for i in list_snapshots(snapshots)] == versions[2:]
    rollback(snapshots)  # CURRENT -> versions[2]
    publish(tmp_path, source, keep=1)  # new one becomes current; the rest pruned
    assert [i.version for i in list_snapshots(snapshots)] == ["000005-2000-12-31"]
    (snapshots / CURRENT).write_text(versions[2] + "\n")  # pretend it is served again
    assert prune_snapshots(snapshots, keep=1) == []  # nothing else left to prune
    assert not [p for p in snapshots.iterdir() if p.name.startswith(".")]


# The child publishes, pausing forever at one step; the test kills it there with SIGKILL.
KILLED_PUBLISHER = """
import sys, time
from datetime import date
from pathlib import Path
from serving import snapshots

def pause(*args, **kwargs):
    print("paused", flush=True)
    time.sleep(600)

point = sys.argv[3]
if point == "copy":
    link = snapshots.link_or_copy
    def link_then_pause(src, dst):
        link(src, dst)
        pause()
    snapshots.link_or_copy = link_then_pause
elif point == "rename":
    snapshots.os.rename = pause
else:
    snapshots.atomic_write_text = pause
snapshots.publish_snapshot(Path(sys.argv[1]), Path(sys.argv[2]), date(2000, 12, 31), {}, 5)
"""


@pytest.mark.parametrize("point", ["copy", "rename", "current"])
def test_killing_the_publisher_mid_write_keeps_the_old_current(tmp_path: Path, point: str) -> None:
    snapshots = tmp_path / "snapshots"
    source = make_refresh(tmp_path, seed=1)
    old = publish(tmp_path, source)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUBLISHER, str(snapshots), str(source), point],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "paused"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    assert read_current(snapshots) == old
    verify_snapshot(snapshots / old)
    newer = publish(tmp_path, source)
    assert read_current(snapshots) == newer != old
    verify_snapshot(snapshots / newer)


def _catalogue_and_item_features(settings, day: date = DAY) -> None:
    """50 catalogue items; item_features of ``day`` for 60 (10 of them not servable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = settings.lake_dir / "raw" / "items"
    items.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"item_id": pa.array(range(1, 51), pa.int64())}), items / "items.parquet"
    )
    features = settings.features_dir / "item_features" / f"dt={day}"
    features.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(range(1, 61), pa.int64()),
                "pop_7d": pa.array([i % 7 for i in range(1, 61)], pa.int64()),
                "pop_total": pa.array(range(1, 61), pa.int64()),
            }
        ),
        features / "part-0.parquet",
    )


def _registered(settings, seed: int, day: date = DAY) -> str:
    """A tiny checkpoint of 51 rows committed to the settings' model registry."""
    from training.registry import ModelRegistry

    torch.manual_seed(seed)
    config = GRankConfig(
        n_item_rows=51, dim=16, n_layers=1, n_heads=2, short_seq_len=8, long_seq_len=16
    )
    return ModelRegistry(settings.models_dir).commit(
        GRank(config).eval(), {"test_day": day.isoformat()}, day
    )


def _cli(tmp_path: Path):
    env = {"GRANK_DATA_ROOT": str(tmp_path), "GRANK_DATASET": "ml-100k"}
    runner = CliRunner()

    def grank(*args: str) -> str:
        result = runner.invoke(cli, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    return grank, env


def test_cli_refresh_publish_list_verify_rollback(tmp_path: Path) -> None:
    from training.registry import ModelRegistry

    settings = make_settings(tmp_path)
    _catalogue_and_item_features(settings)
    registry = ModelRegistry(settings.models_dir)
    first = _registered(settings, seed=3)
    registry.promote(first, "promote", "test")
    grank, env = _cli(tmp_path)
    assert "refreshed 50 items x 16" in grank("embeddings", "refresh", "--date", str(DAY))
    popular = np.load(tmp_path / "embeddings" / f"dt={DAY}" / "popular_items.npy")
    assert popular[:3].tolist() == [48, 41, 34] and popular.max() <= 50  # pop_7d=6 first
    assert "000001-2000-12-31" in grank("snapshot", "publish", "--date", str(DAY))
    # the same model again changes nothing: not published (unless forced)
    assert "not published: CURRENT (000001-2000-12-31) already serves the model" in grank(
        "snapshot", "publish", "--date", str(DAY)
    )
    second = _registered(settings, seed=4)
    registry.promote(second, "promote", "test")
    grank("embeddings", "refresh", "--date", str(DAY))
    assert "000002-2000-12-31" in grank("snapshot", "publish", "--date", str(DAY))
    listing = grank("snapshot", "list")
    assert "* 000002-2000-12-31" in listing and f"checkpoint={second}" in listing
    assert "verified" in grank("snapshot", "verify")
    # a snapshot rollback moves the model pointer with it: tomorrow trains from that model
    rolled = grank("snapshot", "rollback", "--reason", "bad model")
    assert f"CURRENT -> 000001-2000-12-31; PUBLISHED: {second} -> {first}" in rolled
    assert registry.published() == first
    assert registry.history()[-1].action == "snapshot rollback"
    bad = subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "grank"), "snapshot", "rollback", "--to", "../x"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: invalid snapshot version")
    assert registry.published() == first  # a refused rollback moves nothing
    assert json.loads((tmp_path / "snapshots" / "000001-2000-12-31" / "manifest.json").read_text())


def test_publish_never_goes_back_in_time_and_popularity_serves_until_a_model_passes(
    tmp_path: Path,
) -> None:
    from training.registry import ModelRegistry

    settings = make_settings(tmp_path)
    _catalogue_and_item_features(settings)
    earlier = date(2000, 12, 30)
    _catalogue_and_item_features(settings, earlier)
    grank, _ = _cli(tmp_path)
    # no model has passed: the snapshot is popularity only, and serving says so
    assert "no model has passed the gate yet" in grank("embeddings", "refresh", "--date", str(DAY))
    assert "000001-2000-12-31" in grank("snapshot", "publish", "--date", str(DAY))
    snapshot = load_snapshot(tmp_path / "snapshots" / "000001-2000-12-31")
    assert snapshot.model is None
    source = StaticUserSource({7: UserHistory(short=(48,), long=(48,))})
    recommender = Recommender(lambda: snapshot, source, 40, True)
    known, unknown = recommender.recommend_batch([RecRequest(7, 3), RecRequest(8, 3)])
    assert known.items == [41, 34, 27] and unknown.items == [48, 41, 34]  # seen 48 filtered
    assert known.fallback == unknown.fallback == NO_MODEL
    # a model passes: it replaces popularity; popularity never replaces it again
    ModelRegistry(settings.models_dir).promote(_registered(settings, seed=3), "promote", "test")
    grank("embeddings", "refresh", "--date", str(DAY))
    assert "000002-2000-12-31" in grank("snapshot", "publish", "--date", str(DAY))
    # an older day re-run (a backfill) never moves CURRENT back
    grank("embeddings", "refresh", "--date", str(earlier))
    out = grank("snapshot", "publish", "--date", str(earlier))
    assert "not published: CURRENT serves 000002-2000-12-31, of a later day" in out
    assert read_current(tmp_path / "snapshots") == "000002-2000-12-31"


def test_publish_refuses_a_folder_without_embeddings(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnapshotError, match="no refreshed embeddings"):
        publish(tmp_path, tmp_path / "empty")
    assert read_current(tmp_path / "snapshots") is None


def test_items_outside_the_catalogue_are_never_recommended_but_still_embed_histories(
    tmp_path: Path,
) -> None:
    """Retired items keep their table row (histories name them) yet MIPS never returns them."""
    checkpoint = tmp_path / "checkpoints" / "ckpt-1"
    make_refresh(tmp_path, seed=1)
    retired = set(range(1, N_ITEMS + 1, 2))  # every odd item left the catalogue
    out = tmp_path / "embeddings" / "subset"
    catalogue = [i for i in range(1, N_ITEMS + 1) if i not in retired]
    refresh_embeddings(checkpoint, out, catalogue, catalogue[::-1], progress=False)
    snapshot = load_snapshot(tmp_path / "snapshots" / publish(tmp_path, out), MipsConfig("cpu"))
    assert snapshot.n_servable == len(catalogue)
    history = UserHistory(short=(1, 3, 5), long=(1, 3, 5, 7))  # retired items only
    recommender = Recommender(lambda: snapshot, StaticUserSource({9: history}), 40, True)
    (result,) = recommender.recommend_batch([RecRequest(user_id=9, k=40)])
    assert len(result.items) == 40 and not set(result.items) & retired
    model, _ = load_checkpoint(checkpoint)
    with torch.inference_mode():  # the history still reaches the Generator through its rows
        expected = model.user_vectors(torch.tensor([[1, 3, 5]]))
        served = snapshot.model.user_vectors(torch.tensor([[1, 3, 5]]))
    torch.testing.assert_close(served, expected)


def test_a_snapshot_of_another_format_is_refused_with_the_fix(tmp_path: Path) -> None:
    folder = tmp_path / "snapshots" / publish(tmp_path, make_refresh(tmp_path, seed=1))
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(SnapshotError, match=r"format 1.*refresh and publish it again"):
        verify_snapshot(folder)
