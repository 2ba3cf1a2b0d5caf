"""Errors whose message is for the user, shared by every layer (a leaf module: imports nothing).

The entry scripts print these as one line without a traceback (``ntklab.experiments.cli``):
:class:`ConfigError` with exit status 2 (a usage error), the others with 1.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DamagedArtifactError",
    "DistributedError",
    "PeerFailed",
    "RunFolderInUse",
]


class ConfigError(ValueError):
    """A config value that is the wrong type, out of range, not a valid choice, or an unknown key."""


class DamagedArtifactError(ValueError):
    """A file of a finished run no longer has the size or sha256 recorded in ``meta.json``."""


class RunFolderInUse(RuntimeError):
    """Another process holds the run folder's lock."""


class DistributedError(RuntimeError):
    """The distributed runtime could not start (no coordinator, a busy port, JAX already running)."""


class PeerFailed(RuntimeError):
    """Another process of the run failed; the message names it and gives its error."""
