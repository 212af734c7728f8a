"""Validate, decode and convert every source image exactly once, in a pool of worker processes.

A worker turns the raw content of one sample into

* the RGB ``uint8`` pixels (H×W×3, longest side at most ``max_resolution``, resized with FFCV's own ``cv2.INTER_AREA``
  resizer), appended to that worker's staging file, from which the FFCV writer later reads them — so that FFCV's
  ``raw`` mode stores exactly the decoded source pixels; and
* the JPEG bytes for the DALI shards: the source file itself when it already is a valid baseline RGB JPEG that needs
  no resizing and no EXIF rotation (lossless and free), otherwise the pixels encoded with FFCV's ``encode_jpeg``.

Anything that cannot become an RGB image — zero-byte files, truncated or corrupt files, non-images with image names,
missing or unreadable files — comes back as a reason string instead, for the caller to skip or fail on.
Convertible images are converted: grayscale, palette, RGBA/LA (alpha dropped, as torchvision's loader does), CMYK,
and 16-bit images (the high byte of each value, as Pillow does for 16-bit RGB).
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from fastlivt.data_prep.sources import Source

EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """The content of a sample cannot be made into an RGB image; the message is the reason."""


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Pixels of a loaded Pillow image as H×W×3 uint8 RGB."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(img)
        if mode.startswith("I;16"):
            gray = (values.astype(np.uint16) >> 8).astype(np.uint8)
        elif mode == "I":  # 32-bit integer images hold 16-bit data (older Pillow's 16-bit PNG mode)
            gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        else:
            gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return cv2.cvtColor(np.ascontiguousarray(gray), cv2.COLOR_GRAY2RGB)
    with warnings.catch_warnings():  # e.g. "Palette images with Transparency expressed in bytes ..."
        warnings.simplefilter("ignore")
        return np.asarray(img.convert("RGB"))


def to_rgb(content: Union[bytes, np.ndarray]) -> Tuple[np.ndarray, bool]:
    """Decode ``content`` (file bytes or a uint8 array) to H×W×3 uint8 RGB pixels.

    Returns the pixels and whether ``content`` is a JPEG whose decoded pixels are those RGB pixels as they are
    (RGB mode, no EXIF rotation), i.e. whether its bytes may stand for the image. Raises :class:`BadImage`.
    """
    if isinstance(content, np.ndarray):
        if content.dtype != np.uint8 or content.ndim not in (2, 3) or (content.ndim == 3 and content.shape[2] != 3):
            raise BadImage(f"array of dtype {content.dtype} and shape {content.shape} is not a uint8 image")
        if content.ndim == 2:
            return cv2.cvtColor(np.ascontiguousarray(content), cv2.COLOR_GRAY2RGB), False
        return np.ascontiguousarray(content), False
    if len(content) == 0:
        raise BadImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(content))
            img.load()
    except UnidentifiedImageError:
        raise BadImage("not an image (no known image format)") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... on corrupt data
        raise BadImage(f"truncated or corrupt image ({type(e).__name__}: {e})") from None
    try:
        pixels = _pil_to_rgb(img)
    except Exception as e:
        raise BadImage(f"cannot convert image mode {img.mode!r} to RGB ({type(e).__name__}: {e})") from None
    if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise BadImage(f"empty image of shape {pixels.shape}")
    jpeg_as_is = img.format == "JPEG" and img.mode == "RGB" and img.getexif().get(EXIF_ORIENTATION, 1) == 1
    return np.ascontiguousarray(pixels), jpeg_as_is


# ------------------------------------------------------------------------------------------------ the pool
@dataclass
class DecodeJob:
    """What every worker needs: the listed source and what to produce."""

    source: Source
    max_resolution: Optional[int]
    jpeg_quality: int
    want_jpeg: bool  # DALI shards requested
    staging_dir: Optional[str]  # FFCV requested: pixels go to <staging_dir>/<pid>.u8


@dataclass
class _WorkerState:
    fd: int = -1
    file: str = ""
    offset: int = 0
    slot: int = -1  # this worker's entry in _BUSY


_JOB: Optional[DecodeJob] = None  # set in the parent before the pool forks; inherited by the workers
_STATE = _WorkerState()
_BUSY = None  # shared int64 array: the listed index each worker is decoding (-1: idle), to name a crashing file
_SLOTS = None  # shared counter handing out entries of _BUSY

# One result: (listed index, reason or None, jpeg bytes or None, (height, width), staging file name, byte offset)
Result = Tuple[int, Optional[str], Optional[bytes], Tuple[int, int], str, int]


def _stage(pixels: np.ndarray, staging_dir: str) -> Tuple[str, int]:
    """Append ``pixels`` to this process's staging file; return its name and the offset written at."""
    if _STATE.fd < 0 or _STATE.file != f"{os.getpid()}.u8":
        _STATE.file = f"{os.getpid()}.u8"
        _STATE.fd = os.open(os.path.join(staging_dir, _STATE.file), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _STATE.offset = os.fstat(_STATE.fd).st_size
    offset = _STATE.offset
    view = memoryview(pixels.reshape(-1))
    while view.nbytes:  # os.write may write less than asked
        n = os.write(_STATE.fd, view)
        view = view[n:]
    _STATE.offset += pixels.nbytes
    return _STATE.file, offset


def decode_one(i: int) -> Result:
    """Validate, decode, resize, encode and stage listed sample ``i`` of the job's source."""
    assert _JOB is not None, "decode_one called outside a conversion"
    if _STATE.slot < 0:
        return _decode(_JOB, i)
    _BUSY[_STATE.slot] = i
    result = _decode(_JOB, i)
    _BUSY[_STATE.slot] = -1
    return result


def _decode(job: DecodeJob, i: int) -> Result:
    from ffcv.fields.rgb_image import encode_jpeg, resizer  # FFCV's own resize rule and JPEG encoder

    try:
        content = job.source.read(i)
    except FileNotFoundError:
        return i, "missing file", None, (0, 0), "", 0
    except OSError as e:
        return i, f"unreadable file ({type(e).__name__}: {e.strerror or e})", None, (0, 0), "", 0
    try:
        pixels, jpeg_as_is = to_rgb(content)
    except BadImage as e:
        return i, str(e), None, (0, 0), "", 0
    if job.max_resolution is not None and max(pixels.shape[:2]) > job.max_resolution:
        pixels = np.ascontiguousarray(resizer(pixels, job.max_resolution))
        jpeg_as_is = False
    jpeg = None
    if job.want_jpeg:
        jpeg = bytes(content) if jpeg_as_is else encode_jpeg(pixels, job.jpeg_quality).tobytes()
    staged, offset = _stage(pixels, job.staging_dir) if job.staging_dir else ("", 0)
    return i, None, jpeg, (int(pixels.shape[0]), int(pixels.shape[1])), staged, offset


def _init_worker() -> None:
    cv2.setNumThreads(1)
    _STATE.fd, _STATE.slot = -1, -1
    if _SLOTS is not None:
        with _SLOTS.get_lock():
            _STATE.slot = _SLOTS.value
            _SLOTS.value += 1


class WorkerDied(RuntimeError):
    """A decode process ended abruptly (a decoder crash on a corrupt file, or the out-of-memory killer)."""


def decode_all(job: DecodeJob, order: Sequence[int], workers: int, chunksize: int = 16) -> Iterator[Result]:
    """Decode the listed samples ``order`` (in that order) with ``workers`` processes (0: in this process).

    Results come back in ``order``. The caller must exhaust or close the iterator; closing stops the workers.
    A worker that dies abruptly raises :class:`WorkerDied` naming the files it was decoding (a plain
    multiprocessing Pool would wait for it forever).
    """
    global _JOB, _BUSY, _SLOTS
    _JOB = job
    if workers <= 0:
        _STATE.fd, _STATE.slot = -1, -1
        try:
            for i in order:
                yield decode_one(int(i))
        finally:
            if _STATE.fd >= 0:
                os.close(_STATE.fd)
                _STATE.fd = -1
            _JOB = None
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("fork")
    _BUSY, _SLOTS = ctx.RawArray("q", [-1] * workers), ctx.Value("i", 0)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
    try:
        yield from pool.map(decode_one, [int(i) for i in order], chunksize=chunksize)
    except BrokenProcessPool:
        names = [job.source.names[i] for i in _BUSY if i >= 0]
        raise WorkerDied(f"a decode process died abruptly (a decoder crash or out of memory) while the workers "
                         f"were decoding {', '.join(names) or 'their first files'}") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # only the chunks already running are finished
        _JOB = _BUSY = _SLOTS = None
