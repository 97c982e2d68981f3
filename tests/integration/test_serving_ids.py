"""/recommend speaks the dataset's own ids where the lake keeps id maps (common/idmap.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pyarrow as pa

from common import idmap
from serving.snapshots import read_current
from tests.integration.test_serving_app import HISTORIES, expected_top, root, running_server
from tests.integration.test_snapshots import N_ITEMS

__all__ = ["root"]  # the fixture


def test_string_ids_in_and_out_and_maps_reloaded_without_restart(root: Path) -> None:
    maps = root / "idmaps"
    idmap.extend(maps, "user", pa.array([f"user-{i}" for i in range(1, 4)]), "string")
    idmap.extend(maps, "item", pa.array([f"sku-{i}" for i in range(1, N_ITEMS + 1)]), "string")
    version = read_current(root / "snapshots")
    assert version is not None
    with running_server(root, idmaps_dir=maps) as url:
        body = httpx.post(f"{url}/recommend", json={"user_id": "user-1", "k": 5}).json()
        assert body["user_id"] == "user-1" and body["fallback"] is False
        dense = expected_top(root, version, user=1, k=5)
        assert [i["item_id"] for i in body["items"]] == [f"sku-{i}" for i in dense]

        unknown = httpx.post(f"{url}/recommend", json={"user_id": "nobody", "k": 3}).json()
        assert unknown["fallback"] is True
        assert [i["item_id"] for i in unknown["items"]] == [
            f"sku-{i}" for i in (N_ITEMS, N_ITEMS - 1, N_ITEMS - 2)
        ]
        wrong = httpx.post(f"{url}/recommend", json={"user_id": 1, "k": 3})
        assert wrong.status_code == 422 and "string" in wrong.json()["detail"]

        # a user appended to the map later is known at once (users 10.. have histories)
        assert 10 in HISTORIES
        idmap.extend(maps, "user", pa.array([f"user-{i}" for i in range(4, 11)]), "string")
        late = httpx.post(f"{url}/recommend", json={"user_id": "user-10", "k": 3}).json()
        assert late["fallback"] is False
