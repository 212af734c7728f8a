"""FFCV pieces that take every random parameter from the loader instead of numpy's global generator.

FFCV's ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from ``np.random`` inside numba's
worker threads: the draws depend on thread scheduling, so two runs with one seed see different crops. Here:

* :class:`SeededRRCDecoder` decodes, crops the window ``(top, left, height, width)`` given for the sample, resizes to
  the output size with FFCV's own ``resize_crop`` and flips when asked. The parameters arrive in its last memory
  buffer, ``int64 [B, 5]`` = (top, left, height, width, flip).
* :class:`PlanLoader` is FFCV's ``Loader`` whose epoch iterator, right before it runs the pipeline on batch ``b``,
  copies rows ``b*B .. b*B+n`` of the epoch's parameter table of every *seeded operation* (an operation with a
  ``PARAM_WIDTH`` attribute, whose last memory buffer receives them) into that buffer's slot. FFCV runs the batches of
  an epoch one after the other in one thread, and every operation of a batch runs before the next batch starts, so
  each batch sees exactly its own rows.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, List, Tuple

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler


ParamTables = Dict[object, np.ndarray]  # seeded operation -> int64 [len(epoch order), PARAM_WIDTH]
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


class SeededRRCDecoder(SimpleRGBImageDecoder):
    """Decode + crop the given window + resize to ``output_size`` (H, W) + optional horizontal flip, per sample."""

    PARAM_WIDTH = 5  # top, left, height, width, flip

    def __init__(self, output_size: Tuple[int, int]):
        super().__init__()
        self.output_size = tuple(output_size)

    def declare_state_and_memory(self, previous_state):
        widths, heights = self.metadata["width"], self.metadata["height"]
        max_pixels = np.uint64(widths.max()) * np.uint64(heights.max()) * np.uint64(3)
        shape = (self.output_size[0], self.output_size[1], 3)
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
                (AllocationQuery(shape, u8), AllocationQuery((max_pixels,), u8),
                 AllocationQuery((self.PARAM_WIDTH,), np.dtype("int64"))))

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, params = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                top, left, h, w, flip = params[dst_ix, 0], params[dst_ix, 1], params[dst_ix, 2], params[dst_ix, 3], params[dst_ix, 4]
                out = destination[dst_ix]
                resize_crop_c(temp_buffer, top, top + h, left, left + w, out)
                if flip:
                    last = out.shape[1] - 1
                    for x in range(out.shape[1] // 2):
                        for y in range(out.shape[0]):
                            for c in range(3):
                                v = out[y, x, c]
                                out[y, x, c] = out[y, last - x, c]
                                out[y, last - x, c] = v
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


def seeded_operations(loader: Loader):
    """(operation, graph node id) of every seeded operation in the loader's pipelines."""
    return [(op, nodes[0].id) for op, nodes in loader.graph.operation_to_node.items()
            if hasattr(op, "PARAM_WIDTH") and nodes]


class _PlanEpochIterator(EpochIterator):
    def __init__(self, loader: "PlanLoader", order, tables: ParamTables):
        self.tables = tables  # before EpochIterator.__init__, which starts the thread
        self.seeded = seeded_operations(loader)
        super().__init__(loader, order)

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        n, start = len(batch_indices), b_ix * self.loader.batch_size
        for op, node_id in self.seeded:
            buffer = self.memory_allocations["operation"][node_id][-1]
            buffer[batch_slot, :n] = self.tables[op][start:start + n]
        return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)

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
    """FFCV's Loader whose next pass reads ``tables`` (see the module docstring) set with :meth:`set_tables`."""

    _tables: ParamTables = {}
    _current = None

    def set_tables(self, tables: ParamTables) -> None:
        self._tables = tables

    def __iter__(self):
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()
        selected = order[: len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        for op, _ in seeded_operations(self):
            table = self._tables.get(op)
            if table is None or table.shape[0] < len(selected) or table.shape[1] != op.PARAM_WIDTH:
                raise RuntimeError(f"{type(op).__name__}: no parameter table of {len(selected)} x {op.PARAM_WIDTH} "
                                   f"for this pass")
        self.stop()
        self._current = _PlanEpochIterator(self, selected, self._tables)
        return self._current

    def stop(self) -> None:
        """Stop the running pass's thread, if any (a pass left midway keeps producing batches ahead)."""
        if self._current is not None:
            current, self._current = self._current, None
            current.join_thread()

    def close(self) -> None:
        """Stop the pass's thread."""
        self.stop()
