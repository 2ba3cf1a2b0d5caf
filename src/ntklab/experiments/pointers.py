"""``run.json``: where a Hydra job's run folder is, written into the job's own folder.

Hydra's job folders (``artifacts/logs/...``, ``artifacts/sweeps/<...>/<job>``) hold its config and
log, never a run; each gets a pointer to the run folder its job claimed, so a sweep's report can
find its runs wherever they live.

    point_to_run("artifacts/train_ntk/digits/lenet/label_0-network-seed_0-1a2b3c4d", "train_ntk")
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from ntklab import artifacts
from ntklab.artifacts import POINTER_FILE

__all__ = ["POINTER_FILE", "point_to_run"]


def point_to_run(run_dir: str | Path, script: str) -> None:
    """Writes ``run.json`` (this run's folder) into Hydra's job folder, when Hydra runs the job.

    A run started without Hydra (a notebook, a test calling ``run(cfg)``) writes nothing.
    """
    if not HydraConfig.initialized():
        return
    output_dir = HydraConfig.get().runtime.output_dir
    if not output_dir:
        return
    pointer = Path(output_dir) / POINTER_FILE
    content = {"run_dir": str(Path(run_dir).resolve()), "script": script}
    if pointer.is_file():
        try:
            if json.loads(pointer.read_text()) == content:
                return
        except ValueError:
            pass
    artifacts.save_json(pointer, content)
