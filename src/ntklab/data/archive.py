"""Safe extraction of a dataset's tar archive: every member must stay inside the target folder,
and the extracted folder appears only once complete (extract to a temp dir, then rename).

Usage:
    folder = extract_folder(Path("data/cifar-10-python.tar.gz"), Path("data"), "cifar-10-batches-py")
    # -> Path("data/cifar-10-batches-py")
"""

import gzip
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Rejects members that could write outside the extraction folder or are not plain data.

    Raises:
        ValueError: absolute path, a '..' component, or a link/device/fifo member.
    """
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith("\\"):
        raise ValueError(
            f"unsafe member {member.name!r} in archive {archive}: paths must stay inside the "
            "extraction folder"
        )
    if not (member.isfile() or member.isdir()):
        raise ValueError(
            f"unsafe member {member.name!r} in archive {archive}: only regular files and "
            "folders are allowed, not links or devices"
        )


def extract_folder(archive: Path, root: Path, folder_name: str) -> Path:
    """Extracts `folder_name/` from a tar archive into `root`, atomically.

    Args:
        archive: the .tar / .tar.gz file.
        root: folder receiving `folder_name`; it must not already contain `folder_name`.
        folder_name: top-level folder expected inside the archive.

    Returns:
        `root / folder_name`.

    Raises:
        ValueError: the archive is unreadable, has an unsafe member, or lacks `folder_name/`.
        FileExistsError: `root / folder_name` already exists.
    """
    target = root / folder_name
    if target.exists():
        raise FileExistsError(f"{target} already exists; not extracting {archive} over it")
    logger.info("extracting %s into %s", archive, root)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", suffix=".tmp", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, archive)
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: defence in depth
                    tar.extractall(temp, members=members, filter="data")
                else:
                    tar.extractall(temp, members=members)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise ValueError(f"cannot extract archive {archive}: {err}") from err
        extracted = temp / folder_name
        if not extracted.is_dir():
            raise ValueError(f"archive {archive} does not contain the folder {folder_name}/")
        os.replace(extracted, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target
