"""FFCV pieces of the ffcv backend: the image field's host work reduced to reading bytes, and a plan-driven Loader.

* :class:`StoredBytes` replaces FFCV's image decoders: per batch it copies each sample's stored bytes (raw pixels or
  the JPEG) into one row of a uint8 buffer with a small header (layout in its docstring), in parallel over the batch.
  Decoding, cropping and everything else per pixel run on the loader's device afterwards
  (:mod:`fastlivt.data.ffcv_loader`), in the code every backend shares.
* :class:`PlanLoader` is FFCV's ``Loader`` whose epoch thread runs a ``finish`` step on each batch (the device work,
  when the device is the CPU), hands over a :class:`Failed` instead of dying when a batch raises, and reuses the rows
  of :class:`StoredBytes` from pass to pass. (The random parameters of the samples are applied on the device, so no
  host operation takes any.)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery, allocate_query
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader


# Every numba dispatcher FFCV's Compiler makes (each pipeline stage and the functions they call, per loader), kept
# until the process exits. numba 0.6x's dispatcher finalizer, run when a dispatcher dies while the process runs (the
# loader that compiled it dropped, e.g. MGP's before BFT's in `fastlivt demo`, or an evaluation loader), iterates
# the dispatcher's overload table; for FFCV's ``imdecode`` called from a parallel decode stage with literal arguments
# that table fails its own lookups (KeyError on the signature) and the finalizer prints "Exception ignored in:
# <finalize object ...>" with a traceback. numba skips its finalizers at interpreter exit, so a dispatcher that lives
# until then never runs that code. (Reusing one dispatcher in a second pipeline is no way out: compiling it for the
# new stage fails on the same table.) The cost: a few dispatchers, their machine code and what their functions
# close over (the decoders' per-sample metadata) per loader built in the process.
_KEEP_UNTIL_EXIT: List[Callable] = []
_FFCV_COMPILE = Compiler.compile.__func__


def _compile_and_keep(cls, code, signature=None):
    compiled = _FFCV_COMPILE(cls, code, signature)
    if compiled is not code:  # a numba dispatcher (Compiler disabled: the function itself)
        _KEEP_UNTIL_EXIT.append(compiled)
    return compiled


if getattr(Compiler.compile, "__func__", None) is _FFCV_COMPILE:
    Compiler.compile = classmethod(_compile_and_keep)


HEADER_BYTES = 32  # four little-endian int64 per row: height, width, mode, stored bytes
RAW, JPG = int(IMAGE_MODES["raw"]), int(IMAGE_MODES["jpg"])


def jpeg_max_bytes(reader: Reader, field: str) -> int:
    """The largest encoded JPEG of ``field`` (an RGBImageField) in the .beton ``reader`` reads, from its allocation
    table (0 when no sample is a JPEG)."""
    meta = reader.metadata[f"f{list(reader.handlers).index(field)}"]
    ptrs = meta["data_ptr"][meta["mode"] == JPG]
    if ptrs.size == 0:
        return 0
    table = reader.alloc_table
    order = np.argsort(table["ptr"])
    sorted_ptrs, sizes = table["ptr"][order], table["size"][order]
    at = np.minimum(np.searchsorted(sorted_ptrs, ptrs), sorted_ptrs.size - 1)
    if not np.array_equal(sorted_ptrs[at], ptrs):
        raise ValueError(f"{reader.file_name}: field {field!r}: a JPEG's data pointer is not in the allocation table")
    return int(sizes[at].max())


class StoredBytes(SimpleRGBImageDecoder):
    """Per batch, each sample's stored bytes as they are, one row per sample (no decoding, no crop):

    row = ``HEADER_BYTES`` of header, then the payload; the row length is ``HEADER_BYTES + payload_bytes`` rounded up
    to a multiple of 8.

    * header: four little-endian int64 — height, width, mode (FFCV's ``IMAGE_MODES``: :data:`JPG` 0, :data:`RAW` 1),
      number of stored bytes;
    * payload of a raw sample: its pixels in a ``[max_height, max_width, 3]`` layout (pixel (y, x, c) at
      ``HEADER_BYTES + (y * max_width + x) * 3 + c``), the maximum over the .beton's samples; the bytes beyond the
      sample's width and height are left as the buffer holds them (the shared crop gives them weight 0);
    * payload of a JPEG sample: its encoded bytes from ``HEADER_BYTES`` on.

    One row per sample with its own header because FFCV's pipeline yields one array per field and recycles its
    buffers per batch slot: each row describes itself, so nothing has to be matched to a slot on the side; a file of
    mixed modes (FFCV's 'proportion' or 'smart' writing) needs the larger of the two payloads, not their sum; and the
    batch is one pinned buffer, one copy to the device. ``payload_bytes`` = max(max_height * max_width * 3 if any
    sample is raw, :func:`jpeg_max_bytes`).
    """

    KEEP_BUFFERS = True  # its rows are allocated once per loader (PlanLoader), not per pass

    def __init__(self, jpeg_bytes: int, source: str = "RGBImageField"):
        super().__init__()
        self.jpeg_bytes, self.source = int(jpeg_bytes), source  # source: the .beton, for messages

    def layout(self) -> Tuple[int, int, int]:
        """(max_height, max_width, row bytes) of this .beton's rows (FFCV sets the metadata before the first call)."""
        heights, widths, modes = self.metadata["height"], self.metadata["width"], self.metadata["mode"]
        unknown = set(np.unique(modes).tolist()) - {RAW, JPG}
        if unknown:
            raise ValueError(f"{self.source}: unknown image mode(s) {sorted(unknown)} (FFCV writes 0 jpg, 1 raw)")
        max_h, max_w = int(heights.max()), int(widths.max())
        pixels = max_h * max_w * 3 if (modes == RAW).any() else 0
        payload = max(pixels, self.jpeg_bytes)
        return max_h, max_w, -(-(HEADER_BYTES + payload) // 8) * 8

    def declare_state_and_memory(self, previous_state):
        shape = (self.layout()[2],)
        u8 = np.dtype("<u1")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=u8), AllocationQuery(shape, u8)

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        raw, head = RAW, HEADER_BYTES
        row_stride = self.layout()[1] * 3  # bytes per padded pixel row

        def copy_stored(batch_indices, destination, metadata, storage_state):
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                out = destination[dst_ix]
                height, width = np.int64(field["height"]), np.int64(field["width"])
                mode, n = np.int64(field["mode"]), np.int64(data.size)
                for k in range(8):
                    out[k] = (height >> (8 * k)) & 255
                    out[8 + k] = (width >> (8 * k)) & 255
                    out[16 + k] = (mode >> (8 * k)) & 255
                    out[24 + k] = (n >> (8 * k)) & 255
                line = width * 3
                if mode != raw or line == row_stride:
                    out[head:head + n] = data
                else:  # narrower than the widest image: row by row, as one strided copy
                    rows = out[head:head + height * row_stride].reshape(height, row_stride)
                    rows[:, :line] = data.reshape(height, line)
            return destination[:len(batch_indices)]

        copy_stored.is_parallel = True
        return copy_stored


def row_header(rows) -> np.ndarray:
    """int64 ``[B, 4]`` (height, width, mode, stored bytes) of a batch of :class:`StoredBytes` rows (uint8 ``[B, R]``
    tensor or array on the CPU)."""
    head = np.ascontiguousarray(np.asarray(rows)[:, :HEADER_BYTES])
    return head.view("<i8").astype(np.int64)


class Failed:
    """What the epoch thread hands over instead of a batch whose pipeline or ``finish`` raised: the consumer raises
    ``error`` (an exception would otherwise end FFCV's thread and leave the consumer waiting for a batch)."""

    def __init__(self, error: BaseException):
        self.error = error


class _PlanEpochIterator(EpochIterator):
    def __init__(self, loader: "PlanLoader", order, finish):
        self.finish = finish  # before EpochIterator.__init__, which starts the thread
        super().__init__(loader, order)

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        try:
            result = super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
            return result if self.finish is None else self.finish(b_ix, result)
        except Exception as e:
            return Failed(e)

    def join_thread(self, timeout: float = 60.0) -> None:
        """Stop producing batches and wait for the thread (it may be blocked handing over a batch)."""
        self.terminate_event.set()
        waited = 0.0
        while self.is_alive():
            self.join(0.6)  # a full queue makes its ``put`` time out every 0.5 s and see the event
            waited += 0.6
            if self.is_alive():
                try:  # the end-of-epoch ``put(None)`` has no timeout: make room for it
                    self.output_queue.get_nowait()
                except Exception:
                    pass
            if waited > timeout:
                raise RuntimeError(f"the FFCV epoch thread did not stop within {timeout:.0f} s")
        self.close()


class PlanLoader(Loader):
    """FFCV's Loader whose passes run ``finish(batch number, pipeline outputs)`` (set with :meth:`set_finish`; None: nothing) on each batch in
    the epoch thread, yielding what it returns — or a :class:`Failed` when the pipeline or ``finish`` raised."""

    _finish: Optional[Callable] = None
    _current = None

    def set_finish(self, finish: Optional[Callable]) -> None:
        self._finish = finish

    def _allocate_memory(self, batch_size: int, batches_ahead: int):
        """FFCV's ``Graph.allocate_memory``, except that the buffers of operations with ``KEEP_BUFFERS`` are made
        once and reused by every later pass. FFCV makes every buffer anew per pass; for :class:`StoredBytes` that is
        B x row bytes per batch slot of fresh memory, whose first touch costs a short pass more host time than the
        copying itself. Reuse is safe once the previous pass has stopped and its readers of the rows are done (the
        ffcv backend waits for its last copy to the device before a pass ends)."""
        kept_ids = {node.id for op, nodes in self.graph.operation_to_node.items()
                    if getattr(op, "KEEP_BUFFERS", False) for node in nodes}
        buffers: Dict[str, Dict[int, object]] = defaultdict(dict)
        requirements, _ = self.graph.collect_requirements()
        for kind, per_node in requirements.items():
            for node_id, query in per_node.items():
                key = (kind, node_id, batch_size, batches_ahead, repr(query))
                if node_id in kept_ids and key in self._kept:
                    buffers[kind][node_id] = self._kept[key]
                    continue
                if isinstance(query, AllocationQuery):
                    buffer = allocate_query(query, batch_size, batches_ahead)
                elif isinstance(query, Sequence):
                    buffer = tuple(allocate_query(q, batch_size, batches_ahead) for q in query)
                else:
                    buffer = None
                if node_id in kept_ids:
                    self._kept[key] = buffer
                buffers[kind][node_id] = buffer
        return buffers

    def __iter__(self):
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()
        selected = order[: len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        self.stop()
        if self.graph.allocate_memory != self._allocate_memory:
            self._kept: Dict[tuple, object] = {}
            self.graph.allocate_memory = self._allocate_memory
        self._current = _PlanEpochIterator(self, selected, self._finish)
        return self._current

    def stop(self) -> None:
        """Stop the running pass's thread, if any (a pass left midway keeps producing batches ahead)."""
        if self._current is not None:
            current, self._current = self._current, None
            current.join_thread()

    def close(self) -> None:
        """Stop the pass's thread."""
        self.stop()
