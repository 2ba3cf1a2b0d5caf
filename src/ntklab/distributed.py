"""Several JAX processes for one run: starting the runtime, process 0 as the writer, one outcome.

    initialize(cfg.distributed)        # before any JAX computation; nothing to do for one process
    with together() as run:            # every process ends the block with the same outcome
        if is_writer():                # process 0 claims, writes and finishes the run folder
            ...; run.step("claim")
        else:
            run.step("claim")          # raises PeerFailed if process 0 could not claim the folder
        ...                            # the kernel's collectives, in every process

The runtime starts from ``distributed.coordinator_address`` / ``num_processes`` / ``process_id``
(all three, the same address in every process), or, with all three null, from SLURM's variables
inside an ``srun`` step of several tasks (``jax.distributed.initialize()`` without arguments), or
not at all (one process). CPU processes exchange data with the gloo collectives. A process that
dies is noticed by the others within ``distributed.timeout_s`` (JAX's heartbeat), which then stop;
a process that fails with an error publishes it in the runtime's key-value store, and the others
raise :class:`PeerFailed` with its message at their next :meth:`Together.step` or at the end of
the block, so no process waits for a peer that gave up.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax

from ntklab.errors import ConfigError, DistributedError, PeerFailed

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedError",
    "PeerFailed",
    "Together",
    "check_settings",
    "initialize",
    "is_writer",
    "requested",
    "together",
]

_POLL_S = 0.2
_RUN_IDS = itertools.count()


def _slurm_tasks() -> int:
    """Tasks of the current ``srun`` step (0 outside one)."""
    if "SLURM_STEP_NODELIST" not in os.environ:
        return 0
    count = os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))
    try:
        return int(count)
    except ValueError:
        return 0


def requested(settings: Mapping[str, Any] | None) -> bool:
    """Whether ``settings`` (or SLURM, or a runtime the caller started) mean several processes;
    starts nothing."""
    settings = dict(settings or {})
    if settings.get("coordinator_address") is not None or _slurm_tasks() > 1:
        return True
    return jax.distributed.is_initialized() and jax.process_count() > 1


_KEYS = ("coordinator_address", "num_processes", "process_id")


def check_settings(settings: Mapping[str, Any] | None) -> list[str]:
    """Checks the ``distributed.*`` keys together (all three or none); starts nothing.

    Returns:
      The keys given.

    Raises:
      ConfigError: only some of the three keys are set, or ``process_id >= num_processes``.
    """
    settings = dict(settings or {})
    given = [key for key in _KEYS if settings.get(key) is not None]
    if given and len(given) < len(_KEYS):
        missing = [f"distributed.{key}" for key in _KEYS if key not in given]
        raise ConfigError(
            f"distributed.{given[0]} needs {' and '.join(missing)} too: set all of "
            "distributed.coordinator_address, num_processes and process_id (or none: one "
            "process, or SLURM's srun)"
        )
    if given and settings["process_id"] >= settings["num_processes"]:
        raise ConfigError(
            f"distributed.process_id={settings['process_id']} is invalid: must be between 0 and "
            f"distributed.num_processes - 1 = {settings['num_processes'] - 1}"
        )
    return given


def initialize(settings: Mapping[str, Any] | None) -> bool:
    """Starts JAX's distributed runtime if ``settings`` (or SLURM) describe several processes.

    Args:
      settings: ``coordinator_address`` ("host:port" of process 0), ``num_processes``,
        ``process_id`` (all three or none) and ``timeout_s`` (connecting, noticing a dead peer,
        shutting down). None: one process.

    Returns:
      Whether this run has several processes.

    Raises:
      ConfigError: only some of the three keys are set, or ``process_id >= num_processes``.
      DistributedError: the runtime could not start (the coordinator unreachable within
        ``timeout_s``, JAX computations already ran, or another runtime is already started).
    """
    settings = dict(settings or {})
    given = check_settings(settings)
    address, num_processes, process_id = (settings.get(key) for key in _KEYS)
    timeout_s = int(settings.get("timeout_s") or 300)
    slurm = not given and _slurm_tasks() > 1
    if not slurm and (not given or num_processes == 1):
        return jax.distributed.is_initialized() and jax.process_count() > 1
    if jax.distributed.is_initialized():  # started by the caller (a notebook, a test)
        if given and (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise DistributedError(
                f"JAX's distributed runtime already runs as process {jax.process_index()} of "
                f"{jax.process_count()}, not distributed.process_id={process_id} of "
                f"num_processes={num_processes}"
            )
        return True
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU: gloo over TCP
    where = "from SLURM's environment" if slurm else f"at {address}"
    what = "" if slurm else f" as process {process_id} of {num_processes}"
    logger.info("starting JAX's distributed runtime %s%s", where, what)
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=timeout_s,
            shutdown_timeout_seconds=timeout_s,
        )
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistributedError(
            f"could not start JAX's distributed runtime {where}{what} within "
            f"distributed.timeout_s={timeout_s} ({first}); start every process with the same "
            "distributed.coordinator_address and num_processes, process 0 first or within the "
            "timeout, before any JAX computation"
        ) from error
    logger.info(
        "JAX process %d of %d; %d local, %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0; the only one of a 1-process run)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


class Together:
    """The outcome of one run shared by its processes (see :func:`together`)."""

    def __init__(self) -> None:
        # The runtime's key-value store, through orbax's public accessor (JAX keeps it private).
        from orbax.checkpoint import multihost

        self._client = multihost.get_jax_distributed_client()
        self.num_processes = jax.process_count()
        self.process_id = jax.process_index()
        self._prefix = f"ntklab/run{next(_RUN_IDS)}/"

    def step(self, name: str) -> None:
        """Says this process finished ``name`` and waits until every process has.

        Raises:
          PeerFailed: another process failed first (its message is in the error).
        """
        self._client.key_value_set(f"{self._prefix}{name}/{self.process_id}", "ok")
        waiting = {f"{self._prefix}{name}/{p}" for p in range(self.num_processes)}
        while True:
            entries = dict(self._client.key_value_dir_get(self._prefix))
            failures = sorted(
                (int(key.rpartition("/")[2]), value)
                for key, value in entries.items()
                if key.startswith(f"{self._prefix}failed/")
            )
            for process, message in failures:
                if process != self.process_id:
                    raise PeerFailed(f"process {process} of {self.num_processes} failed: {message}")
            if waiting <= entries.keys():
                return
            time.sleep(_POLL_S)

    def fail(self, error: BaseException) -> None:
        """Publishes this process's error, so that the others stop waiting for it."""
        message = str(error).strip() or type(error).__name__
        if isinstance(error, KeyboardInterrupt):
            message = f"interrupted ({message})"
        with contextlib.suppress(Exception):  # the runtime may be going down already
            self._client.key_value_set(
                f"{self._prefix}failed/{self.process_id}", message, allow_overwrite=True
            )


class _Alone:
    def step(self, name: str) -> None:
        pass


@contextlib.contextmanager
def together() -> Iterator[Together | _Alone]:
    """A block that every process of the run leaves with the same outcome.

    On success every process waits at the end for the others (``"done"``); on an error the
    process publishes it and re-raises, and the others raise :class:`PeerFailed` at their next
    :meth:`Together.step`. With one process this does nothing.
    """
    if not (jax.distributed.is_initialized() and jax.process_count() > 1):
        yield _Alone()
        return
    run = Together()
    try:
        yield run
    except BaseException as error:
        run.fail(error)
        raise
    try:
        run.step("done")
    except BaseException as error:
        run.fail(error)
        raise
