"""Run folders: atomic writes of safe formats, checked artifacts, locked folders, reading runs back.

Dimensions: N examples (train first, then test), k eigenpairs.

    with open_run("artifacts/eigenfunctions/digits/lenet", identity) as run:
        save_array(run.path / "eigvals.npy", eigvals)     # [k]; its sha256 is recorded
        run.finish({"script": "compute_ntk", ...})          # meta.json last, listing every file
    run = load_run("artifacts/eigenfunctions/digits/lenet")  # verifies every file's sha256
    run.x                     # [N, H, W, C] inputs in kernel order
    run.eigvecs               # [k, N]
    run.apply_fn(run.params, run.x[:8])   # [8, 1], BatchNorm in inference mode

Every file is written to a temporary name unique to the process (``.<stem>.<pid>-<token><suffix>``,
mode 0666 less the umask) in its folder and renamed into place, so a crash never leaves a
half-written file; temporaries of killed processes are swept when the folder is next opened.
``meta.json`` is written last: a run folder is complete once it exists, and it lists the size and
sha256 of every file the run wrote (hashed when written), which readers verify. A run folder is
locked (``fcntl.flock`` on ``.lock``) while a run writes it; ``overwrite`` moves the old run aside
(``.replaced/``) and deletes it only once the new run is complete. Arrays are ``.npy``/``.npz``
(loaded with ``allow_pickle=False``), parameters flax msgpack, metadata JSON; nothing is pickled.
"""

from ntklab.artifacts._folders import (
    FOLDER_STATES,
    LOCK_FILE,
    REPLACED_DIR,
    RunFolder,
    differences_of,
    folder_state,
    open_run,
    restore_replaced,
)
from ntklab.artifacts._io import (
    CONFIG_FILE,
    LARGE_ARTIFACT_BYTES,
    META_FILE,
    POINTER_FILE,
    array_digest,
    atomic_path,
    check_free_space,
    config_identity,
    environment_info,
    file_digest,
    load_arrays,
    load_json,
    load_params,
    save_array,
    save_arrays,
    save_figure,
    save_json,
    save_params,
    to_container,
    verify_artifacts,
    verify_file,
)
from ntklab.artifacts._runs import NTKRun, load_run, read_finished_meta
from ntklab.errors import DamagedArtifactError, RunFolderInUse

__all__ = [
    "CONFIG_FILE",
    "FOLDER_STATES",
    "LARGE_ARTIFACT_BYTES",
    "LOCK_FILE",
    "META_FILE",
    "POINTER_FILE",
    "REPLACED_DIR",
    "DamagedArtifactError",
    "NTKRun",
    "RunFolder",
    "RunFolderInUse",
    "array_digest",
    "atomic_path",
    "check_free_space",
    "config_identity",
    "differences_of",
    "environment_info",
    "file_digest",
    "folder_state",
    "load_arrays",
    "load_json",
    "load_params",
    "load_run",
    "open_run",
    "read_finished_meta",
    "restore_replaced",
    "save_array",
    "save_arrays",
    "save_figure",
    "save_json",
    "save_params",
    "to_container",
    "verify_artifacts",
    "verify_file",
]
