"""Dataset files on disk: find them, fetch missing ones (streamed, md5-checked, renamed into
place), and explain clearly what is missing.

Usage:
    resources = [Resource("train_32x32.mat", md5="e26dedcc...", urls=("http://.../train_32x32.mat",))]
    paths = ensure_files(Path("data/svhn"), resources, download=False, dataset="svhn")
    # -> [Path("data/svhn/train_32x32.mat")], or FileNotFoundError naming folder, files and URLs
"""

import dataclasses
import hashlib
import http.client
import logging
import os
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60.0


class DownloadError(OSError):
    """A file could not be fetched from any of its URLs, or its checksum did not match."""


@dataclasses.dataclass(frozen=True)
class Resource:
    """One published file of a dataset.

    Attributes:
        filename: the file's published name, used for the download, e.g. "train-images-idx3-ubyte.gz".
        md5: the official md5 hex digest of that file.
        urls: where to fetch it, tried in order (mirrors).
        alternatives: other local names accepted instead of `filename` (e.g. the decompressed
            file); they have no official checksum and are never downloaded.
    """

    filename: str
    md5: str
    urls: tuple[str, ...]
    alternatives: tuple[str, ...] = ()

    def describe(self) -> str:
        """Returns the accepted local names, e.g. "a.gz (or a)"."""
        if not self.alternatives:
            return self.filename
        return f"{self.filename} (or {' or '.join(self.alternatives)})"


def md5sum(path: str | os.PathLike) -> str:
    """Returns the md5 hex digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _open_url(url: str) -> BinaryIO:
    """Opens a URL for streaming (the single network access point; tests replace it)."""
    return urllib.request.urlopen(url, timeout=_TIMEOUT_S)


def fetch(url: str, path: Path, *, md5: str) -> None:
    """Downloads `url` to `path`: stream to `<path>.part`, check md5, then rename into place.

    On any failure (network error, interruption, checksum mismatch) the partial file is deleted,
    so neither `<path>.part` nor `path` is left behind.

    Raises:
        DownloadError: the payload's md5 differs from `md5`.
        OSError: the URL could not be read or the file could not be written.
    """
    part = path.with_name(path.name + ".part")
    logger.info("downloading %s -> %s", url, path)
    try:
        digest = hashlib.md5()
        with _open_url(url) as response, open(part, "wb") as f:
            while chunk := response.read(_CHUNK_BYTES):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != md5:
            raise DownloadError(
                f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}"
            )
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def fetch_first(urls: Sequence[str], path: Path, *, md5: str) -> None:
    """Downloads `path` from the first of `urls` (mirrors) that succeeds with the right md5.

    Raises:
        DownloadError: every URL failed; the message lists each URL with its error.
    """
    failures = []
    for url in urls:
        try:
            fetch(url, path, md5=md5)
            return
        except (OSError, ValueError, http.client.HTTPException) as err:
            logger.warning("download of %s failed: %s", url, err)
            failures.append(f"{url}: {err}")
    raise DownloadError(f"could not download {path.name}: " + "; ".join(failures))


def missing_files_error(
    dataset: str,
    folder: Path,
    expected: Sequence[str],
    urls: Sequence[str],
    *,
    download: bool,
    reason: str | None = None,
    note: str | None = None,
) -> FileNotFoundError:
    """Builds the FileNotFoundError for absent dataset files.

    Args:
        dataset: registered dataset name.
        folder: folder where the files were expected.
        expected: descriptions of every expected file.
        urls: official URLs of the missing files.
        download: whether downloading was enabled (if not, the message says how to enable it).
        reason: why the download failed, when it was attempted.
        note: an extra sentence, e.g. an accepted archive.

    Returns:
        the error, for the caller to raise.
    """
    parts = [
        f"{dataset} files not found in folder {folder.absolute()}: expected {', '.join(expected)}."
    ]
    if note:
        parts.append(note)
    if reason:
        parts.append(f"Download failed: {reason}.")
    parts.append(f"Official source: {', '.join(urls)}.")
    if not download:
        parts.append("Set data.download=true to fetch them, or place the files there yourself.")
    return FileNotFoundError(" ".join(parts))


def unofficial_files(checksums: Mapping[Path, str]) -> list[str]:
    """The names of the local files whose md5 differs from the official checksum.

    Each file is hashed once per process (and again only when its size or mtime changes).

    Args:
        checksums: local path -> official md5 hex digest.
    """
    return [path.name for path, md5 in checksums.items() if _cached_md5(path) != md5]


_MD5S: dict[tuple[str, int, int], str] = {}
_WARNED: set[tuple] = set()


def _cached_md5(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5S:
        _MD5S[key] = md5sum(path)
    return _MD5S[key]


def warn_if_unofficial(
    dataset: str, checksums: Mapping[Path, str], *, holds: str | None = None
) -> None:
    """Logs once per process, in one line, that local files are not the official ones.

    Args:
        dataset: registered dataset name, for the message.
        checksums: local path -> official md5 hex digest.
        holds: what the files hold instead (e.g. "5,085 train and 1,017 test images, not 50,000
            and 10,000"), when the caller knows.
    """
    differing = unofficial_files(checksums)
    if not differing:
        return
    folder = next(iter(checksums)).parent
    key = (dataset, str(folder.resolve()), tuple(differing), holds)
    if key in _WARNED:
        return
    _WARNED.add(key)
    logger.warning(
        "%s: the files in %s are not the official dataset (md5 of %s differs)%s; reading them "
        "anyway",
        dataset,
        folder,
        ", ".join(differing),
        f": they hold {holds}" if holds else " (e.g. a subset)",
    )


def ensure_files(
    folder: Path, resources: Sequence[Resource], *, download: bool, dataset: str
) -> list[Path]:
    """Finds each resource in `folder`, downloading the missing ones when `download` is set.

    Files found locally are read as they are; when their md5 differs from the official one a
    warning is logged (not an error). Downloaded files must match their checksum.

    Args:
        folder: the dataset's folder, e.g. `{root}/mnist`.
        resources: the files to find.
        download: fetch missing files from their URLs.
        dataset: registered dataset name, for messages.

    Returns:
        one local path per resource, in order (the published name or an accepted alternative).

    Raises:
        FileNotFoundError: files are missing and download is off, or the download failed; names
            the folder, every expected file and the official URLs.
    """
    found: dict[str, Path] = {}
    local: dict[Path, str] = {}  # files present under their published name -> official md5
    for resource in resources:
        for name in (resource.filename, *resource.alternatives):
            if (folder / name).is_file():
                found[resource.filename] = folder / name
                if name == resource.filename:
                    local[folder / name] = resource.md5
                break
    missing = [r for r in resources if r.filename not in found]
    if missing:
        expected = [r.describe() for r in resources]
        urls = [url for r in missing for url in r.urls]
        if not download:
            raise missing_files_error(dataset, folder, expected, urls, download=False)
        folder.mkdir(parents=True, exist_ok=True)
        for resource in missing:
            target = folder / resource.filename
            try:
                fetch_first(resource.urls, target, md5=resource.md5)
            except DownloadError as err:
                raise missing_files_error(
                    dataset, folder, expected, urls, download=True, reason=str(err)
                ) from err
            found[resource.filename] = target
    if local:
        warn_if_unofficial(dataset, local)
    return [found[r.filename] for r in resources]
