"""Batch-ETL half of GRank: datasets, the raw event lake, Spark feature jobs, quality gates, Feast.

Depends on nothing else of ours but ``common``. Heavy libraries (pyspark, feast,
great_expectations) are imported inside the modules that need them, never here.
"""
