"""A network run's kernel alignment: when and where the eNTK rotates, one kernel pass per look.

Dimensions: N examples (N_train first), k kept eigenvectors of K_0, k' aligned ones, L layers,
T measurements.

    tracker = AlignmentTracker(cfg, ntk_run)                 # K_0's side: read, not recomputed
    result = fit(..., measures={"alignment": tracker.measure_fn(model)},
                 measure_every=cfg.alignment.every)           # K_t along training
    metrics = tracker.save(run_dir, result.measurements)     # alignment*.npz, figures

K_0's side comes from the compute_ntk run: ``init_quotients.npz`` (the quotients φᵀK_0φ/‖φ‖² of
every kept eigenvector, ‖K_0‖_F², and each layer's quotients) and, when the run saved it,
``kernel.npy`` (then the kernel distance is exact; otherwise it uses K_0's top eigenpairs, with
its error bound recorded). A run folder without ``init_quotients.npz`` (made before it existed)
still works: K_0 is formed once more, with a log line saying so.

Each measurement is one streamed pass over K_t's blocks (:func:`ntklab.alignment.measure_kernel`)
at the state's parameters (BatchNorm statistics as ``bn_statistics`` says), split by layer at the
last epoch. The measurements travel with the trainer's checkpoints, so a resumed run writes the
same history as an uninterrupted one.

Files: ``alignment.npz`` (``indices`` [k'], ``init_eigvals``, ``init_{train,test,all}``,
``final_{train,test,all}`` [k']), ``alignment_history.npz`` (``epochs`` [T] from 0,
``indices`` [k'], ``train``/``test``/``all`` [T, k'], ``kernel_distance`` [T],
``distance_method``, ``distance_error_bound``), ``alignment_layers.npz`` (``layers`` [L],
``indices`` [k'], ``init_all``, ``final_all`` [L, k']) and figures in ``alignment_plots/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig

from ntklab import artifacts
from ntklab.alignment import Measurement, Reference, aligned_indices, measure_kernel
from ntklab.artifacts import NTKRun
from ntklab.experiments.eigenfunctions import select_batch_stats
from ntklab.experiments.kernel_readouts import INIT_QUOTIENTS_FILE
from ntklab.models import inference_apply_fn
from ntklab.plots import alignment_figure, alignment_history_figure, alignment_layers_figure
from ntklab.train import Measure, TrainState

logger = logging.getLogger(__name__)

__all__ = ["AlignmentTracker"]

SPLITS = ("train", "test", "all")


class AlignmentTracker:
    """The alignment of one network run: K_0's side, the measure, and the files.

    Args:
      cfg: the train_ntk config (``label_idx``, ``alignment``, ``bn_statistics``, ``progress``).
      ntk_run: the compute_ntk run (its eigenvectors and files).
    """

    def __init__(self, cfg: DictConfig, ntk_run: NTKRun) -> None:
        self.cfg, self.run = cfg, ntk_run
        count = len(ntk_run.eigvecs)
        self.indices = aligned_indices(
            cfg.alignment.num_eigvecs, num_available=count, label_idx=int(cfg.label_idx)
        )
        self.vectors = np.asarray(ntk_run.eigvecs, np.float64)  # all k: the distance uses them
        self.init = self._initial()
        self.reference = self._reference()
        self.total_steps: int | None = None

    def _initial(self) -> dict[str, Any]:
        """K_0's quotients [k] (and layers [L, k]): from compute_ntk's file, or measured."""
        path = self.run.path / INIT_QUOTIENTS_FILE
        if INIT_QUOTIENTS_FILE in self.run.meta.get("artifacts", {}):
            artifacts.verify_file(path, self.run.meta["artifacts"][INIT_QUOTIENTS_FILE])
            stored = artifacts.load_arrays(path)
            init = {split: stored[split] for split in SPLITS}
            init["frobenius_sq"] = float(stored["frobenius_sq"])
            if "layer_all" in stored:
                init["layers"] = [str(name) for name in stored["layers"]]
                init["layer_all"] = stored["layer_all"]
                return init
            logger.info("%s has no layer quotients: measuring K_0 by layer (one kernel)", path)
            return {**init, **self._measure_layers_at_init()}
        logger.info(
            "%s has no %s (a run made before it existed): forming K_0 once more for the "
            "alignment's start (one kernel)", self.run.path, INIT_QUOTIENTS_FILE,
        )  # fmt: skip
        return self._measure_layers_at_init(whole=True)

    def _measure_layers_at_init(self, *, whole: bool = False) -> dict[str, Any]:
        measured = self._measure(self.run.params, self.run.variables, by_layer=True)
        found = {"layers": measured.layers, "layer_all": measured.layer_quotients}
        if whole:
            found.update(measured.quotients, frobenius_sq=measured.frobenius_sq)
        return found

    def _reference(self) -> Reference:
        """K_0 for the distance: its saved kernel when there is one, else its eigenpairs."""
        listed = self.run.meta.get("artifacts", {})
        if "kernel.npy" in listed:
            kernel = self.run.kernel()  # verified against meta.json
            logger.info("kernel distance to K_0 from the saved %s (exact)", self.run.path)
            return Reference(self.init["frobenius_sq"], kernel=kernel)
        reference = Reference(
            self.init["frobenius_sq"],
            eigvals=np.asarray(self.run.eigvals, np.float64),
            positions=np.arange(len(self.run.eigvals)),
        )
        logger.info(
            "kernel distance to K_0 from its top %d eigenpairs (no kernel.npy; "
            "ntk.save_kernel=true makes it exact): error at most %.3g",
            len(self.run.eigvals), reference.error_bound,
        )  # fmt: skip
        return reference

    def _measure(self, params, variables, *, by_layer: bool, reference=None) -> Measurement:
        return measure_kernel(
            self._apply_fn(variables), params, self.run.x, self.vectors,
            num_train=self.run.num_train, by_layer=by_layer, reference=reference,
            batch_size=self.cfg.alignment.batch_size, progress=bool(self.cfg.progress),
        )  # fmt: skip

    def _apply_fn(self, variables):
        """The inference-mode network with the statistics ``bn_statistics`` names; without
        BatchNorm one function for every measurement, so the engine compiles it once."""
        stats = variables.get("batch_stats") or {}
        if not jax.tree.leaves(stats):
            if not hasattr(self, "_plain_apply"):
                self._plain_apply = inference_apply_fn(self.run.model, {})
            return self._plain_apply
        return inference_apply_fn(self.run.model, {"batch_stats": stats})

    def measure_fn(self, total_steps: int) -> Measure:
        """``measure(state)`` for :func:`ntklab.train.fit` (by layer at the last step)."""
        initial_stats = self.run.variables.get("batch_stats", {})

        def measure(state: TrainState) -> dict[str, Any]:
            stats = select_batch_stats(self.cfg.bn_statistics, initial_stats, state.batch_stats)
            last = int(state.step) == total_steps
            measured = self._measure(
                state.params, {"batch_stats": stats}, by_layer=last, reference=self.reference
            )
            logger.info(
                "alignment: kernel distance to K_0 %.4g (%s), trained index %d: %.4g -> %.4g "
                "in %.1f s", measured.kernel_distance, measured.distance_method,
                self.cfg.label_idx, self.init["all"][self.cfg.label_idx],
                measured.quotients["all"][self.cfg.label_idx], measured.seconds,
            )  # fmt: skip
            taken = {split: measured.quotients[split] for split in SPLITS}
            taken["kernel_distance"] = measured.kernel_distance
            taken["frobenius_sq"] = measured.frobenius_sq
            taken["seconds"] = measured.seconds
            if measured.layer_quotients is not None:
                taken["layer_all"] = measured.layer_quotients
            return taken

        return measure

    def save(self, run_dir: Path, measurements: list[dict]) -> dict[str, float]:
        """Writes the three files and the figures; returns the metrics of the trained index."""
        rows = [(0, self.init, 0.0)] + [
            (int(m["epoch"]), m["alignment"], float(m["alignment"]["kernel_distance"]))
            for m in measurements
        ]
        keep, label = self.indices, int(self.cfg.label_idx)
        final = rows[-1][1]
        artifacts.save_arrays(
            run_dir / "alignment.npz",
            indices=keep,
            init_eigvals=self.run.eigvals[keep],
            **{f"init_{s}": np.asarray(self.init[s])[keep] for s in SPLITS},
            **{f"final_{s}": np.asarray(final[s])[keep] for s in SPLITS},
        )
        history = {s: np.array([np.asarray(row[s])[keep] for _, row, _ in rows]) for s in SPLITS}
        distances = np.array([distance for _, _, distance in rows])
        artifacts.save_arrays(
            run_dir / "alignment_history.npz",
            epochs=np.array([epoch for epoch, _, _ in rows]),
            indices=keep,
            kernel_distance=distances,
            distance_method=np.array(self.reference.method),
            distance_error_bound=np.float64(self.reference.error_bound),
            **history,
        )
        layers = self.init.get("layers")
        if layers is not None and "layer_all" in final:
            artifacts.save_arrays(
                run_dir / "alignment_layers.npz",
                layers=np.array(layers, dtype=str),
                indices=keep,
                init_all=np.asarray(self.init["layer_all"])[:, keep],
                final_all=np.asarray(final["layer_all"])[:, keep],
            )
        self._figures(run_dir, history, distances, [epoch for epoch, _, _ in rows], final)
        position = int(np.searchsorted(keep, label))
        metrics = {f"{s}/alignment_trained": float(history[s][-1][position]) for s in SPLITS}
        metrics |= {f"{s}/alignment_trained_init": float(history[s][0][position]) for s in SPLITS}
        metrics["kernel_distance"] = float(distances[-1])
        return metrics

    def _figures(self, run_dir: Path, history, distances, epochs, final) -> None:
        cfg, keep, label = self.cfg, self.indices, int(self.cfg.label_idx)
        title = f"{cfg.model.name} on {cfg.data.dataset}, trained on v_{label}"
        plots = run_dir / "alignment_plots"
        for split in SPLITS:
            figure = alignment_figure(
                keep, self.run.eigvals[keep], history[split][-1],
                init_quotients=history[split][0], trained_idx=label, title=f"{title} ({split})",
            )  # fmt: skip
            for suffix in ("png", "pdf"):
                artifacts.save_figure(figure, plots / f"eig_{label}_{split}.{suffix}")
        figure = alignment_history_figure(
            np.asarray(epochs), keep, history["all"], distances, trained_idx=label, title=title
        )
        artifacts.save_figure(figure, plots / f"history_{label}.png")
        layers = self.init.get("layers")
        if layers is not None and "layer_all" in final:
            figure = alignment_layers_figure(
                layers, keep, np.asarray(self.init["layer_all"])[:, keep],
                np.asarray(final["layer_all"])[:, keep], trained_idx=label, title=title,
            )  # fmt: skip
            artifacts.save_figure(figure, plots / f"layers_{label}.png")
