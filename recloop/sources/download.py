"""Download, verify and extract MovieLens archives from GroupLens into a local cache.

Follows the GroupLens layout: ``https://files.grouplens.org/datasets/movielens/<name>.zip`` with a
``<name>.zip.md5`` checksum beside it. An archive is verified (md5 when published, the zip's own
CRCs always, the expected files present), extracted into a temporary folder and renamed into
place, so a failed download never leaves a half-extracted dataset in the cache.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

GROUPLENS_BASE_URL = "https://files.grouplens.org/datasets/movielens"
# archive name -> (folder inside the zip, a file that must exist in it)
ARCHIVES: dict[str, tuple[str, str]] = {
    "ml-100k": ("ml-100k", "u.data"),
    "ml-1m": ("ml-1m", "ratings.dat"),
    "ml-10m": ("ml-10M100K", "ratings.dat"),
    "ml-latest-small": ("ml-latest-small", "ratings.csv"),
    "ml-latest": ("ml-latest", "ratings.csv"),
}
DOWNLOAD_TIMEOUT_S = 60.0


def default_cache_dir() -> Path:
    """``<settings.home>/cache/movielens`` (read at call time, never at import)."""
    from recloop.settings import get_settings

    return get_settings().home / "cache" / "movielens"


def ensure_movielens(
    name: str,
    *,
    cache_dir: Path | None = None,
    url: str | None = None,
    transport: httpx.BaseTransport | None = None,
) -> Path:
    """Return the extracted folder of MovieLens archive ``name``, downloading it once if needed.

    Args:
        name: one of ``ARCHIVES`` (e.g. ``ml-100k``).
        cache_dir: where archives and folders live (default ``settings.home/cache/movielens``).
        url: the archive URL (default GroupLens); a local path or ``file://`` URL is copied instead.
        transport: an httpx transport (tests pass ``httpx.MockTransport``).
    Returns:
        The folder holding the dataset files.
    Raises:
        ValueError: unknown ``name``, checksum mismatch, corrupt archive or missing files.
        httpx.HTTPError: the download failed.
    """
    if name not in ARCHIVES:
        raise ValueError(f"unknown MovieLens archive {name!r}; expected one of {sorted(ARCHIVES)}")
    folder, marker = ARCHIVES[name]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / folder
    if (target / marker).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    url = url or f"{GROUPLENS_BASE_URL}/{name}.zip"
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        expected_md5 = _fetch(url, archive, transport)
        verify_archive(archive, expected_md5=expected_md5, folder=folder, marker=marker)
        staging = Path(tmp) / "extract"
        _safe_extract(archive, staging)
        if target.exists():
            shutil.rmtree(target)
        (staging / folder).rename(target)
    logger.info("movielens ready name=%s path=%s", name, target)
    return target


def _fetch(url: str, dest: Path, transport: httpx.BaseTransport | None) -> str | None:
    """Copy or download ``url`` to ``dest``; return the published md5 (None if there is none)."""
    local = Path(url.removeprefix("file://")) if not url.startswith(("http://", "https://")) else None
    if local is not None:
        if not local.is_file():
            raise FileNotFoundError(f"MovieLens archive not found: {local}")
        shutil.copyfile(local, dest)
        md5_file = local.with_name(local.name + ".md5")
        return md5_file.read_text().split()[0] if md5_file.is_file() else None
    with httpx.Client(transport=transport, timeout=DOWNLOAD_TIMEOUT_S, follow_redirects=True) as client:
        logger.info("downloading url=%s", url)
        with client.stream("GET", url) as resp:
            resp.raise_for_status()
            with dest.open("wb") as fh:
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
        md5_resp = client.get(url + ".md5")
        if md5_resp.status_code == 200 and md5_resp.text.strip():
            return md5_resp.text.split()[0]
        logger.warning("no published md5 url=%s status=%d; relying on zip CRCs", url, md5_resp.status_code)
        return None


def verify_archive(archive: Path, *, expected_md5: str | None, folder: str, marker: str) -> None:
    """Check the archive's md5 (if given), every member's CRC and that ``folder/marker`` exists.

    Raises:
        ValueError: naming the archive and what failed.
    """
    if expected_md5 is not None:
        digest = hashlib.md5(archive.read_bytes(), usedforsecurity=False).hexdigest()
        if digest != expected_md5.lower():
            raise ValueError(f"{archive.name}: md5 {digest} does not match the published {expected_md5}")
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            names = set(zf.namelist())
    except zipfile.BadZipFile as err:
        raise ValueError(f"{archive.name}: not a valid zip archive ({err})") from err
    if bad is not None:
        raise ValueError(f"{archive.name}: member {bad!r} fails its CRC check")
    if f"{folder}/{marker}" not in names:
        raise ValueError(f"{archive.name}: expected member {folder}/{marker}; found {sorted(names)[:5]}...")


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract refusing absolute paths and ``..`` (zip-slip)."""
    dest.mkdir(parents=True)
    root = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            if not (root / member).resolve().is_relative_to(root):
                raise ValueError(f"{archive.name}: member {member!r} would extract outside {dest}")
        zf.extractall(dest)
