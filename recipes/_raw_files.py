"""Raw files on disk: a readable-file check with the fix, downloads that never leave half a file in the data folder,
and archives whose damage is named."""

from __future__ import annotations

import gzip
import shutil
import socket
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

from pipeline import files
from pipeline.errors import DataError


def readable_file(path: Path, what: str) -> None:
    """A DataError unless `path` is a file this process can open (a folder or unreadable file is named)."""
    if path.is_dir():
        raise DataError(
            f"{path} is a folder, but {what} belongs there.\nFix: move that folder away and put the file there."
        )
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(
            f"cannot read {path} ({e.strerror}).\nFix: make it readable (chmod a+r) or replace it with a good copy."
        ) from None


def download(files: list[tuple[str, list[str], str | None]], folder: Path, what: str, timeout: float = 10) -> None:
    """Fetches each (name, urls, md5) into `folder` with torchvision's `download_url`, trying its URLs in order.

    Each file is downloaded into a temporary folder elsewhere, checked, then copied beside its target
    and renamed into place, so a failed or interrupted download leaves the data folder as it was. The
    first file that cannot be had from any URL stops with one message; `timeout` bounds each network
    wait, so without a network this fails in seconds.
    """
    from http.client import HTTPException
    from urllib.error import URLError

    from torchvision.datasets.utils import download_url

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torchvision's urlopen calls take no timeout of their own
    try:
        for name, urls, md5 in files:
            errors = []
            with tempfile.TemporaryDirectory(prefix="download-") as tmp:
                for url in urls:
                    try:
                        download_url(url, tmp, filename=name, md5=md5)
                    except (URLError, HTTPException, OSError, RuntimeError) as e:  # RuntimeError: md5 mismatch
                        errors.append(f"{url}: {getattr(e, 'reason', e)}")
                        continue
                    _place(Path(tmp) / name, folder / name)
                    break
            if len(errors) == len(urls):
                sources = sorted({u[0].rsplit("/", 1)[0] + "/" for _, u, _ in files if u})
                raise DataError(
                    f"data.download is on, but {what} could not be downloaded ({'; '.join(errors) or 'no URL known'})."
                    f"\nFix: put {', '.join(n for n, _, _ in files)} in {folder.resolve()} (from a machine with "
                    f"a network, e.g. from {', '.join(sources)}), or check the network and proxy; "
                    f"data.download=false stops trying."
                )
    finally:
        socket.setdefaulttimeout(previous)


def _place(src: Path, target: Path) -> None:
    """Copies a finished download into the data folder under a temporary name of its own, then renames it into
    place: two machines downloading into one shared folder never mix their bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as source, files.replacing(target, "wb") as out:
        shutil.copyfileobj(source, out)


@contextmanager
def unpacking(archive: Path, folder: str, source: str = ""):
    """A failure to unpack `archive` (.gz or .zip) into the temporary `folder` as a DataError with the fix;
    `source`: where a good copy comes from, if worth naming."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zipfile.BadZipFile, zlib.error) as e:  # before OSError: BadGzipFile is one
        raise DataError(
            f"{archive} is damaged ({e}): a truncated or interrupted download?\nFix: replace it with a "
            f"good copy{source}, or delete it and run again with data.download=true to fetch it anew. "
            f"The data folder was not changed."
        ) from None
    except OSError as e:
        raise DataError(
            f"cannot unpack {archive} into the temporary folder {folder} ({e}).\nFix: free space there "
            f"or point TMPDIR at a folder with room."
        ) from None
