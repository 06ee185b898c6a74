"""Host-side helpers of the DALI loaders: the split as DALI input (byte views, image sizes,
corrupt-sample bookkeeping), pipeline construction and reuse across passes, output conversion, and
the decode probe that finds the samples DALI's decoder rejects."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, types
from nvidia.dali.backend import TensorGPU
from nvidia.dali.plugin.pytorch import feed_ndarray
from nvidia.dali.types import BatchInfo

from pipeline.dataset import ShardedSplit
from pipeline.device import upload
from pipeline.loaders.corrupt import stand_in
from pipeline.loaders.resident import stored_size


# --- host-side helpers ---------------------------------------------------------------------
class Samples:
    """The split as DALI input: zero-copy byte views, image sizes read once from the headers, and
    the corrupt samples found so far with the stand-ins that replace them in training."""

    def __init__(self, split: ShardedSplit, on_corrupt: Callable[[int], None]):
        self.split, self.labels, self._on_corrupt = split, split.labels, on_corrupt
        self._hw = np.zeros((len(split), 2), np.int64)  # (0, 0): header not read yet
        self.bad: set[int] = set()

    def arrays(self, idx) -> list[np.ndarray]:
        return [np.frombuffer(self.split.encoded(int(i)), np.uint8) for i in idx]

    def sizes(self, idx: np.ndarray) -> np.ndarray:
        """(N, 2) heights and widths; unreadable headers are retired (their rows stay 0)."""
        corrupt = []
        for i in map(int, idx[self._hw[idx, 0] == 0]):
            hw = stored_size(self.split, i)
            if hw is None:
                corrupt.append(i)
            else:
                self._hw[i] = hw
        self.retire(corrupt)
        return self._hw[idx]

    def retire(self, corrupt) -> None:
        new = {int(i) for i in corrupt} - self.bad
        if new:
            self.bad |= new
            self._on_corrupt(len(new))

    def _is_bad(self, idx: np.ndarray) -> np.ndarray:
        return np.isin(idx, np.fromiter(self.bad, np.int64)) if self.bad else np.zeros(len(idx), bool)

    def usable(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices with corrupt samples replaced, their sizes): the first candidate of
        `pipeline.loaders.corrupt.stand_in` not known to be corrupt. A stand-in that DALI then
        fails to decode is retired in turn and replaced by the next candidate, within the same
        limit (DataError when the candidates are exhausted)."""
        while True:
            hw = self.sizes(idx)
            hit = np.flatnonzero(self._is_bad(idx))
            if not len(hit):
                return idx, hw
            idx = idx.copy()
            for k in hit:
                idx[k] = self._stand_in(int(idx[k]))

    def readable(self, idx: np.ndarray) -> np.ndarray:
        """`idx` without the corrupt samples (evaluation drops them, never replaces them)."""
        self.sizes(idx)
        return idx[~self._is_bad(idx)]

    def _stand_in(self, i: int) -> int:
        return stand_in(self.split, i, lambda j: j not in self.bad)[0]


def dense(a: np.ndarray, dtype) -> np.ndarray:
    """C-contiguous `a` as `dtype`: external_source takes no strided arrays (and column picks
    such as a[:, [1, 0]] come out in Fortran order)."""
    return np.ascontiguousarray(a, dtype=dtype)


def placement(device: torch.device) -> tuple[str, Optional[int]]:
    """(decoder device, DALI device_id): nvJPEG on this process's GPU, else the CPU with no GPU
    at all (device_id=None lets DALI run where CUDA is absent)."""
    if device.type == "cuda":
        return "mixed", device.index if device.index is not None else torch.cuda.current_device()
    return "cpu", None


def decoder_args(decoder: str) -> dict:
    """The arguments of every DALI image decoder we use: RGB, EXIF orientation ignored (as by
    Pillow and simplejpeg in the other loaders), and libjpeg-turbo's "fancy" (smooth) chroma
    upsampling, which the CPU decoders of every loader use; DALI's GPU (`mixed`) decoder
    otherwise upsamples chroma differently by default, so GPU-decoded training pixels would not
    match CPU-decoded ones (DALI 2.4 `jpeg_fancy_upsampling`: "make the mixed backend use the same
    chroma upsampling approach as the cpu one")."""
    return dict(device=decoder, output_type=types.RGB, adjust_orientation=False,
                jpeg_fancy_upsampling=True)


def build_pipeline(graph: Callable[[], list], *, batch_size: int, workers: int, device_id, prefetch: int):
    """Build a pipeline from `graph()`; prefetch > 1 runs it asynchronously, ahead of the caller."""
    pipe = Pipeline(batch_size=batch_size, num_threads=workers, device_id=device_id,
                    prefetch_queue_depth=prefetch, exec_async=prefetch > 1,
                    exec_pipelined=prefetch > 1)
    with pipe:
        pipe.set_outputs(*graph())
    pipe.build()
    return pipe


class PassPipeline:
    """One DALI pipeline, built once and reused for every pass (epoch or evaluation) of a loader.

    A new executor, thread pool and decoders per pass would cost set-up time every epoch, and
    DALI's memory pools never shrink. The graph's `external_source` calls `_source`, which asks
    the current pass's `feed(k)` for its k-th batch (k counts from 0 in every pass: DALI restarts
    the count after StopIteration + `reset()`); `feed` raises StopIteration after the last one.

    begin(feed): start a pass (builds on first use; a pass left unfinished is drained first).
    run(): the pass's next outputs; a RuntimeError (DALI's decode failure) leaves the pipeline
    unusable, so it is dropped: `begin` then rebuilds it (`builds` counts the builds).
    end(): after the pass's last batch, read DALI's StopIteration and `reset()` for the next pass.
    """

    def __init__(self, graph: Callable[[Callable], list], **build_args):
        self._graph, self._args = graph, build_args
        self._pipe, self._feed, self._running = None, None, False
        self.builds = 0

    def _source(self, info: BatchInfo):
        if self._feed is None:  # draining an unfinished pass: no more batches
            raise StopIteration
        return self._feed(info.iteration)

    def begin(self, feed: Callable[[int], list]) -> None:
        if self._running:
            self.end()
        if self._pipe is None:
            self._pipe = build_pipeline(lambda: self._graph(self._source), **self._args)
            self.builds += 1
        self._feed = feed

    def run(self):
        self._running = True
        try:
            return self._pipe.run()
        except RuntimeError:
            self.discard()
            raise

    def end(self) -> None:
        """Consume what DALI prefetched (an unfinished pass: at most its prefetch depth), read its
        StopIteration and reset it. A decode failure among the discarded batches drops it."""
        self._feed = None
        if self._pipe is None:
            return
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            self._pipe.reset()
        except RuntimeError:
            self.discard()
        self._running = False

    def discard(self) -> None:
        self._pipe, self._feed, self._running = None, None, False


def to_torch(out, device: torch.device) -> torch.Tensor:
    """A copy of a DALI output batch as a torch tensor on `device` (DALI reuses its buffers): GPU
    outputs are copied on the current stream; CPU outputs (images decoded on the CPU, labels,
    jitter factors) go through `pipeline.device.upload`, from pinned memory on CUDA."""
    t = out.as_tensor()
    if isinstance(t, TensorGPU):
        dst = torch.empty(t.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(device))
        return dst
    return upload(torch.from_numpy(np.array(t)), device)


class DecodeProbe:
    """Finds the samples DALI's decoder rejects: decode a set at once, bisect it when that fails
    (or when it is larger than `max_batch`). A failed pipeline is rebuilt: DALI leaves it unusable."""

    def __init__(self, decoder: str, device_id, max_batch: int, workers: int):
        self._max_batch = max_batch
        self._args = dict(batch_size=max_batch, workers=workers, device_id=device_id, prefetch=1)
        self._decoder = decoder
        self._pipe = None

    def _decodes(self, arrays) -> bool:
        if self._pipe is None:
            self._pipe = build_pipeline(lambda: [fn.decoders.image(fn.external_source(name="enc", batch=True),
                                                           **decoder_args(self._decoder))], **self._args)
        self._pipe.feed_input("enc", arrays)
        try:
            self._pipe.run()
            return True
        except RuntimeError:
            self._pipe = None
            return False

    def find(self, samples: Samples, idx: np.ndarray) -> list[int]:
        idx = np.unique(idx)
        if not len(idx) or (len(idx) <= self._max_batch and self._decodes(samples.arrays(idx))):
            return []
        if len(idx) == 1:
            return [int(idx[0])]
        half = len(idx) // 2
        return self.find(samples, idx[:half]) + self.find(samples, idx[half:])
