"""Leaf utilities every layer may use: user-facing errors, atomic writes, checksums.

This package depends on the standard library only, so importing it never drags a
layer into another one (see docs/architecture.md, "Layering").
"""
