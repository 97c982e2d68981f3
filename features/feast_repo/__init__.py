"""The Feast feature repository: entities, sources, feature views and feature services.

Definitions are built by a function of the feature-table folder (not module globals
pointing at a fixed path), so one code path registers the ML-100K test root, the ML-1M
data root or a production bucket. ``features/feature_store.py`` applies them.
"""

from features.feast_repo.definitions import (
    FEATURE_SERVICES,
    ONLINE_VIEWS,
    build_definitions,
)

__all__ = ["FEATURE_SERVICES", "ONLINE_VIEWS", "build_definitions"]
