"""Item images for Prompt1: a local folder, or the ``imUrl`` column of the metadata downloaded
once into ``<cache_dir>/<dataset>/images/``.

Folder: files named by itemID or by asin, any common image extension (``12.jpg``,
``B0001.png``). Downloads run in a small thread pool with a timeout, retries with exponential
backoff (not for 4xx answers other than 408/429), and are written atomically; a URL that keeps
failing leaves a ``<itemID>.failed`` marker (skipped on later runs unless
``describe.download.retry_failed=true``).
"""

from __future__ import annotations

import base64
import io
import logging
import mimetypes
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from mllmrec.errors import ConfigError
from mllmrec.files import atomic_file

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
        ".gif": "image/gif", ".bmp": "image/bmp"}
USER_AGENT = "mllmrec/0.1 (+image download for item descriptions)"
_EMPTY = {"", "nan", "none", "null"}


@dataclass
class ImageSet:
    paths: list  # per item: Path or None
    source: str  # "image_dir", "url", or "none"
    counts: dict = field(default_factory=dict)


def data_url(path: str | Path) -> str:
    """``data:<mime>;base64,...`` for an image file (what vLLM and OpenAI-style servers accept)."""
    path = Path(path)
    mime = MIME.get(path.suffix.lower(), "image/jpeg")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _is_image(blob: bytes) -> bool:
    if not blob:
        return False
    try:
        from PIL import Image
    except ImportError:  # no Pillow: accept any non-empty payload
        return True
    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means "not an image"
        return False


def resolve(data, dcfg, images_root: Path) -> ImageSet:
    """One image path (or None) per item, from ``describe.image_dir`` or the metadata's URL column."""
    if dcfg.get("image_dir"):
        return from_folder(data, Path(str(dcfg.image_dir)).expanduser())
    column = dcfg.get("image_url_column") or "imUrl"
    urls = data.item_field(column)
    if data.meta is not None and column in data.meta.columns:
        dl = dcfg.get("download") or {}
        return download_all(
            urls,
            images_root,
            timeout=float(dl.get("timeout", 30)),
            retries=int(dl.get("retries", 3)),
            workers=int(dl.get("workers", 8)),
            backoff=float(dl.get("backoff", 1.0)),
            retry_failed=bool(dl.get("retry_failed", False)),
        )
    log.warning(
        "describe: no images for %s (set describe.image_dir, or give meta-%s.csv an %s column); "
        "every item gets an empty image description", data.name, data.name, column,
    )
    return ImageSet([None] * data.n_items, "none", {"images": 0, "no_image": data.n_items})


def from_folder(data, folder: Path) -> ImageSet:
    if not folder.is_dir():
        raise ConfigError("describe.image_dir", f"{folder} is not a folder")
    index: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            index.setdefault(p.stem, p)
    asins = data.item_field("asin")
    paths = [index.get(str(i)) or (index.get(asins[i]) if asins[i] else None) for i in range(data.n_items)]
    found = sum(p is not None for p in paths)
    if found < data.n_items:
        log.warning("describe: %d of %d items have no image in %s (empty image description)",
                    data.n_items - found, data.n_items, folder)
    return ImageSet(paths, "image_dir", {"images": found, "no_image": data.n_items - found})


def _extension(url: str, content_type: str | None) -> str:
    ext = Path(urllib.parse.urlparse(url).path).suffix.lower()
    if ext in IMAGE_EXTS:
        return ext
    if content_type:
        guessed = mimetypes.guess_extension(content_type.split(";")[0].strip()) or ""
        if guessed in IMAGE_EXTS:
            return guessed
    return ".jpg"


def download(url: str, dest_stem: Path, timeout: float = 30, retries: int = 3, backoff: float = 1.0) -> Path:
    """Fetch ``url`` to ``<dest_stem><ext>`` atomically; raises OSError with the last reason on failure."""
    last = "unknown error"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
        try:
            req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                blob = resp.read()
                ctype = resp.headers.get("Content-Type")
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                break  # permanent
            continue
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if isinstance(exc, ValueError):  # malformed URL
                break
            continue
        if not _is_image(blob):
            last = "the answer is not an image"
            break
        dest = dest_stem.with_suffix(_extension(url, ctype))
        with atomic_file(dest) as tmp:
            tmp.write_bytes(blob)
        return dest
    raise OSError(last)


def download_all(urls, root: Path, *, timeout=30.0, retries=3, workers=8, backoff=1.0, retry_failed=False) -> ImageSet:
    from tqdm.auto import tqdm

    root.mkdir(parents=True, exist_ok=True)
    have: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            have.setdefault(p.stem, p)
    paths: list = [None] * len(urls)
    todo = []
    no_url = skipped_failed = 0
    for i, url in enumerate(urls):
        url = (url or "").strip()
        if str(i) in have:
            paths[i] = have[str(i)]
        elif url.lower() in _EMPTY:
            no_url += 1
        elif not retry_failed and (root / f"{i}.failed").exists():
            skipped_failed += 1
        else:
            todo.append((i, url))
    failed = 0
    if todo:
        log.info("describe: downloading %d images into %s", len(todo), root)
        with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=len(todo), unit="img", desc="images") as bar:
            futures = {pool.submit(download, url, root / str(i), timeout, retries, backoff): i for i, url in todo}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    paths[i] = fut.result()
                    (root / f"{i}.failed").unlink(missing_ok=True)
                except OSError as exc:
                    failed += 1
                    (root / f"{i}.failed").write_text(f"{urls[i]}\t{exc}\n")
                bar.update(1)
    found = sum(p is not None for p in paths)
    counts = {
        "images": found,
        "no_image": len(urls) - found,
        "no_url": no_url,
        "download_failed": failed + skipped_failed,
        "downloaded_now": len(todo) - failed,
    }
    if found < len(urls):
        log.warning("describe: %d of %d items have no usable image (%d without URL, %d downloads failed); "
                    "they get an empty image description", len(urls) - found, len(urls), no_url, failed + skipped_failed)
    return ImageSet(paths, "url", counts)
