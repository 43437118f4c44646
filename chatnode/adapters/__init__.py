"""Backends behind the ports of :mod:`chatnode.core.ports`, one module per backend.

::

    sqlite          embedded default: Directory, Archive (FTS5) and Bus on one SQLite file
    memory          in-process Presence (an injectable clock makes expiry testable)

Nothing is imported here on purpose: importing ``chatnode.adapters`` must not pull in a client
library the deployment did not install. ``chatnode.app`` imports the module it picks.
"""
