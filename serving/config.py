"""The serving layer's knobs: one definition of each, and of its default.

``grank/config.py`` composes these into the settings a deployment overrides
(``GRANK_SERVE__<FIELD>``), taking each default from here. This module imports no torch,
so reading the settings stays cheap for commands that serve nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# item rows `grank embeddings refresh` copies per batch (memory-mapped, never all at once)
REFRESH_BATCH_ROWS = 65_536

Device = Literal["auto", "cpu", "cuda"]
ScreenMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class MipsConfig:
    """Where the scan runs, and whether the CPU scan screens in bf16 first (exact either way).

    ``auto`` screens where the CPU has bf16 dot-product instructions (AVX512-BF16, AMX);
    elsewhere bf16 products are emulated and would cost more than they save.
    """

    device: Device = "auto"
    bf16_screen: ScreenMode = "auto"


@dataclass(frozen=True)
class ServeConfig:
    """The serving app's knobs (docs/serving.md)."""

    snapshots_dir: Path
    device: Device = "auto"
    # exact either way; "auto" screens in bf16 where the CPU multiplies bf16 natively
    bf16_screen: ScreenMode = "auto"
    k1: int = 200  # MIPS candidates handed to the Ranker
    max_k: int = 100  # largest k a client may ask for
    filter_seen: bool = True
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 256
    poll_s: float = 0.1  # how often the watcher reads CURRENT (one small file read)
    retry_after_s: int = 1
    # the lake's id maps (common/idmap.py): clients use their own ids; None: ids are dense
    idmaps_dir: Path | None = None

    @property
    def mips(self) -> MipsConfig:
        return MipsConfig(self.device, self.bf16_screen)
