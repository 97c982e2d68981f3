"""Index-free serving: embedding refresh, verified snapshots, exact MIPS and the HTTP API.

A snapshot (item matrix + item ids + the model weights that produced them) is the unit
that moves from the daily batch to serving; nothing here builds an index, so a new
snapshot serves as soon as its bytes are on disk and verified.
"""
