"""The indexing pipeline: decode in worker threads while the model embeds the previous batch.

Pillow and onnxruntime both release the GIL for their heavy work, so threads give real overlap. At
most `window` decoded images wait in memory at any time, so memory stays bounded on any folder size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from . import crop_codes
from .crops import embed as embed_crops
from . import images as imgs
from .errors import ImageError
from .models import Model, available_cpus
from .store import NewImage
from .sync import Candidate

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """Like `ThreadPoolExecutor.map`, in order, but with at most `window` results pending at once.
    If the caller stops early (a Ctrl-C, an error, a consumer that breaks off), the work still
    queued is cancelled and none of it is waited for: a Ctrl-C in a search over a folder of large
    pictures waited for every queued decode (up to `window` of them, seconds)."""
    pool = ThreadPoolExecutor(max_workers=workers)
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def embed_files(candidates: list[Candidate], model: Model, *, batch_size: int = 16,
                max_pixels: int = imgs.DEFAULT_MAX_PIXELS,
                workers: int | None = None) -> Iterator[tuple[list[NewImage], list[tuple[str, str]]]]:
    """Yield (embedded images, failures) per batch of `batch_size` files; a failure is (path, reason)."""
    prep = model.preprocess
    soft = model.input_side(imgs.soft_side(prep)) if any(imgs.is_soft(v) for v in prep.crop_views) else None

    def decode(candidate: Candidate):
        try:
            array, decoded = imgs.load_views(candidate.path, prep, max_pixels, soft)
            return candidate, array, (decoded.width, decoded.height, decoded.format, decoded.taken, decoded.camera)
        except ImageError as e:
            return candidate, None, str(e)

    workers = workers or available_cpus()
    arrays: list[imgs.Views] = []
    metas: list[tuple[Candidate, tuple]] = []  # the facts, without the pixels
    failures: list[tuple[str, str]] = []

    def flush() -> tuple[list[NewImage], list[tuple[str, str]]]:
        crops = len(prep.crop_views)
        vectors, crop_vectors = embed_crops(model, arrays) if arrays else \
            (np.empty((0, model.dim), np.float32), np.empty((0, crops, model.dim), np.float32))
        coded = crop_codes.encode(prep.crop_code, crop_vectors.reshape(-1, model.dim)) if crops else []
        batch = [NewImage(c.key, c.size, c.mtime_ns, c.sha256, w, h, fmt, v, taken, camera,
                          tuple(coded[n * crops:(n + 1) * crops]) if crops else None)
                 for n, ((c, (w, h, fmt, taken, camera)), v) in enumerate(zip(metas, vectors))]
        result = (batch, list(failures))
        arrays.clear()
        metas.clear()
        failures.clear()
        return result

    for candidate, array, decoded in bounded_map(decode, candidates, workers, window=2 * batch_size):
        if array is None:
            failures.append((str(candidate.path), decoded))
        else:
            arrays.append(array)
            metas.append((candidate, decoded))
        if len(arrays) + len(failures) >= batch_size:
            yield flush()
    if arrays or failures:
        yield flush()
