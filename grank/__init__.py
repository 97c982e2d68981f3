"""The edge of the project: typed configuration and the ``grank`` command line.

Nothing in ``features``, ``training`` or ``serving`` imports this package; the CLI
reads :class:`grank.config.Settings` and passes plain values down (docs/architecture.md).
"""
