"""DALI loaders: one DALI pipeline decodes and augments both index streams.

The host does only what is cheap: it draws the step's indices from the samplers, hands DALI
zero-copy views of the stored image bytes (`ShardedSplit.encoded`) through `external_source`, and
draws the step's augmentation parameters with `pipeline.augment.draw_params`. DALI decodes (on the
GPU, `mixed`, when training on CUDA; on the CPU with `workers` threads otherwise), crops, resizes,
flips and jitters, and prepares `PREFETCH` steps ahead of the trainer.

Reproducibility: DALI's own random operators are not used. Crop windows, flips and jitter factors
come from `step_generator(seed, epoch, step, rank, stream)`, exactly as in the other loaders, so a
run resumed mid-epoch gets the same samples AND the same augmentation parameters, and DALI crops
the same windows as the resident and reference loaders. Pixels agree with those loaders up to the
resampling filter (DALI's antialiased bilinear resize) and, for jitter on the CPU, the uint8
rounding between the contrast and saturation steps.

Speed: DALI is at home on the GPU. On the CPU its resize and colour operators are not
vectorised: with 224-px crops of photographs it trails FFCV (measured with `iccl bench pipeline`).

Corrupt images: a sample whose header cannot be read is replaced before it reaches DALI; one that
DALI fails to decode makes the step fail, the failing samples are found by bisection with a
decode-only pipeline (`_DecodeProbe`), and the pipeline is rebuilt from that step with them
replaced by the next readable image of the same class. `skipped` counts distinct corrupt samples.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, types
from nvidia.dali.backend import TensorGPU
from nvidia.dali.plugin.pytorch import feed_ndarray

from pipeline.augment import (STREAM_CLASS_AWARE, STREAM_UNIFORM, color_jitter, draw_params,
                              resized_shape, step_generator, to_u8)
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.loaders.base import AugmentSpec, Batch, EvalLoader, EvalSpec, TrainLoader
from pipeline.loaders.resident import stored_size
from pipeline.samplers import ClassAwareSampler, UniformSampler, eval_indices

PREFETCH = 2  # steps DALI prepares while the trainer works on the current one


# --- host-side helpers ---------------------------------------------------------------------
class _Samples:
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
        """(indices with corrupt samples replaced, their sizes). A stand-in is the next sample of
        the same class, then the next in sample order (the reference loader's rule)."""
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
        same = np.flatnonzero(self.labels == self.labels[i])
        n = len(self.labels)
        for j in np.concatenate([same[same > i], same[same < i], (np.arange(1, n) + i) % n]):
            if int(j) not in self.bad:
                return int(j)
        raise DataError(f"{self.split.dir}: no sample decodes. Run `iccl verify {self.split.root}` "
                        f"and re-convert the dataset.")


def _dense(a: np.ndarray, dtype) -> np.ndarray:
    """C-contiguous `a` as `dtype`: external_source takes no strided arrays (and column picks
    such as a[:, [1, 0]] come out in Fortran order)."""
    return np.ascontiguousarray(a, dtype=dtype)


def _placement(device: torch.device) -> tuple[str, Optional[int]]:
    """(decoder device, DALI device_id): nvJPEG on this process's GPU, else the CPU with no GPU
    at all (device_id=None lets DALI run where CUDA is absent)."""
    if device.type == "cuda":
        return "mixed", device.index if device.index is not None else torch.cuda.current_device()
    return "cpu", None


def _build(graph: Callable[[], list], *, batch_size: int, workers: int, device_id, prefetch: int):
    """Build a pipeline from `graph()`; prefetch > 1 runs it asynchronously, ahead of the caller."""
    pipe = Pipeline(batch_size=batch_size, num_threads=workers, device_id=device_id,
                    prefetch_queue_depth=prefetch, exec_async=prefetch > 1,
                    exec_pipelined=prefetch > 1)
    with pipe:
        pipe.set_outputs(*graph())
    pipe.build()
    return pipe


def _to_torch(out, device: torch.device) -> torch.Tensor:
    """A copy of a DALI output batch as a torch tensor on `device` (DALI reuses its buffers)."""
    t = out.as_tensor()
    if isinstance(t, TensorGPU):
        dst = torch.empty(t.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(device))
        return dst
    return torch.from_numpy(np.array(t)).to(device, non_blocking=True)


class _DecodeProbe:
    """Finds the samples DALI's decoder rejects: decode a set at once, bisect it when that fails
    (or when it is larger than `max_batch`). A failed pipeline is rebuilt: DALI leaves it unusable."""

    def __init__(self, decoder: str, device_id, max_batch: int, workers: int):
        self._max_batch = max_batch
        self._args = dict(batch_size=max_batch, workers=workers, device_id=device_id, prefetch=1)
        self._decoder = decoder
        self._pipe = None

    def _decodes(self, arrays) -> bool:
        if self._pipe is None:
            self._pipe = _build(lambda: [fn.decoders.image(fn.external_source(name="enc", batch=True),
                                                           device=self._decoder)], **self._args)
        self._pipe.feed_input("enc", arrays)
        try:
            self._pipe.run()
            return True
        except RuntimeError:
            self._pipe = None
            return False

    def find(self, samples: _Samples, idx: np.ndarray) -> list[int]:
        idx = np.unique(idx)
        if not len(idx) or (len(idx) <= self._max_batch and self._decodes(samples.arrays(idx))):
            return []
        if len(idx) == 1:
            return [int(idx[0])]
        half = len(idx) // 2
        return self.find(samples, idx[:half]) + self.find(samples, idx[half:])


class DaliLoader(TrainLoader):
    """Two-stream training loader on one DALI pipeline (see the module docstring)."""

    name = "dali"

    def __init__(self, split: ShardedSplit, *, uniform: Optional[UniformSampler],
                 class_aware: Optional[ClassAwareSampler], augment: AugmentSpec, seed: int,
                 steps_per_epoch: int, rank: int = 0, world_size: int = 1, device="cpu",
                 workers: int = 2):
        super().__init__(steps_per_epoch=steps_per_epoch)
        if augment.kind not in ("pad_crop", "rrc"):
            raise ValueError(f"unknown augmentation kind {augment.kind!r} (pad_crop or rrc)")
        self._streams = [(s, k) for s, k in ((uniform, STREAM_UNIFORM), (class_aware, STREAM_CLASS_AWARE))
                         if s is not None]
        if not self._streams:
            raise ValueError("DaliLoader needs at least one of the uniform / class-aware samplers")
        self.augment, self.seed, self.rank = augment, seed, rank
        self.device, self.workers = torch.device(device), max(1, workers)
        self._batch = self._streams[0][0].local_batch
        self._samples = _Samples(split, self._count_corrupt)
        self._decoder, self._device_id = _placement(self.device)
        # Jitter needs each image's mean grey level as an operator argument, which DALI takes only
        # from the CPU: with GPU decoding the factors travel through the pipeline to torch.
        self._jitter_in_torch = augment.kind == "rrc" and augment.jitter > 0 and self._decoder == "mixed"
        self._probe = _DecodeProbe(self._decoder, self._device_id, 2 * self._batch, self.workers)
        self._pipe = None

    def _count_corrupt(self, n: int) -> None:
        self.skipped += n

    # --- host side: what DALI is fed for one step ---------------------------------------------
    def _feed(self, epoch: int, step: int) -> list:
        out = []
        for sampler, stream in self._streams:
            idx, hw = self._samples.usable(sampler.batch(epoch, step))
            gen = step_generator(self.seed, epoch, step, self.rank, stream)
            p = draw_params(self.augment, len(idx), torch.from_numpy(hw[:, 0]),
                            torch.from_numpy(hw[:, 1]), gen)
            out += [self._samples.arrays(idx), self._samples.labels[idx]]
            if self.augment.kind == "pad_crop":
                # DALI slices in (x, y) order and fills outside the image with zeros: the window's
                # corner in the unpadded image is its offset in the padded one minus the padding.
                out.append(_dense((p.offsets[:, [1, 0]] - self.augment.pad).numpy(), np.int32))
            else:
                box = p.boxes.numpy()  # (top, left, height, width)
                out += [_dense(box[:, [1, 0]], np.float32), _dense(box[:, [3, 2]], np.float32)]
            out.append(p.flip.numpy().astype(np.int32))
            if p.jitter is not None:
                out.append(p.jitter.numpy())
        return out

    def _start(self, epoch: int, first_step: int):
        """A pipeline producing the steps first_step, first_step + 1, ... of `epoch`."""
        def source(info):
            step = first_step + info.iteration
            if step >= self.steps_per_epoch:
                raise StopIteration
            return self._feed(epoch, step)

        self.close()
        self._pipe = _build(lambda: _train_graph(source, len(self._streams), self.augment,
                                                 self._decoder, self._jitter_in_torch),
                            batch_size=self._batch, workers=self.workers,
                            device_id=self._device_id, prefetch=PREFETCH)
        return self._pipe

    # --- device side --------------------------------------------------------------------------
    def _batches(self, start_step: int):
        epoch, step = self.epoch, start_step
        while step < self.steps_per_epoch:
            pipe = self._start(epoch, step)
            while step < self.steps_per_epoch:
                try:
                    outputs = pipe.run()
                except RuntimeError as e:  # a decode failure in this step (or a prefetched one)
                    self._recover(epoch, step, e)
                    break  # rebuild from this step, now without the corrupt samples
                step += 1
                yield self._to_batch(outputs)
        self.close()

    def _to_batch(self, outputs) -> Batch:
        per = len(outputs) // len(self._streams)
        got = {}
        for k, (_, stream) in enumerate(self._streams):
            x = _to_torch(outputs[k * per], self.device).permute(0, 3, 1, 2)  # channels_last NCHW
            if self._jitter_in_torch:
                x = to_u8(color_jitter(x.float(), _to_torch(outputs[k * per + 2], self.device)))
            got[stream] = (x, _to_torch(outputs[k * per + 1], self.device))
        x_a, y_a = got.get(STREAM_UNIFORM, (None, None))
        x_c, y_c = got.get(STREAM_CLASS_AWARE, (None, None))
        return Batch(x_a, y_a, x_c, y_c)

    def _recover(self, epoch: int, step: int, error: RuntimeError) -> None:
        """Find and retire the corrupt samples behind a failed step; re-raise if there are none
        (then the failure is not the data's). The prefetched steps after it are checked too."""
        for s in range(step, min(step + PREFETCH + 1, self.steps_per_epoch)):
            idx = np.concatenate([self._samples.usable(sampler.batch(epoch, s))[0]
                                  for sampler, _ in self._streams])
            bad = self._probe.find(self._samples, idx)
            if bad:
                self._samples.retire(bad)
                return
        raise error

    def close(self) -> None:
        self._pipe = None  # DALI frees the pipeline's threads and buffers with the object


def _train_graph(source, num_streams: int, spec: AugmentSpec, decoder: str,
                 jitter_in_torch: bool) -> list:
    """Per stream: decode, crop (and resize), flip, jitter -> image, label (, jitter factors)."""
    jitter = spec.kind == "rrc" and spec.jitter > 0
    per = (4 if spec.kind == "pad_crop" else 5) + jitter
    inputs = fn.external_source(source=source, num_outputs=num_streams * per, batch=True,
                                batch_info=True)
    outputs = []
    for k in range(num_streams):
        enc, label, *geometry = inputs[k * per:(k + 1) * per]
        if spec.kind == "pad_crop":
            start, flip = geometry
            x = fn.decoders.image(enc, device=decoder, output_type=types.RGB, adjust_orientation=False)
            x = fn.slice(x, start=start, shape=[spec.size, spec.size], axis_names="WH",
                         out_of_bounds_policy="pad", fill_values=0)
        else:
            anchor, shape, flip, *factors = geometry
            # Region-of-interest decode: only the crop box is decoded (for JPEG, only the needed
            # scanlines), DALI's main saving over decode-then-crop.
            x = fn.decoders.image_slice(enc, anchor, shape, device=decoder, output_type=types.RGB,
                                        axis_names="WH", normalized_anchor=False,
                                        normalized_shape=False, adjust_orientation=False)
            x = fn.resize(x, resize_x=spec.size, resize_y=spec.size, interp_type=types.INTERP_LINEAR)
        x = fn.flip(x, horizontal=flip)
        if jitter and not jitter_in_torch:
            x = _jitter(x, factors[0])
        outputs += [x, label] + (factors if jitter and jitter_in_torch else [])
    return outputs


def _jitter(x, factors):
    """torchvision's brightness, contrast and saturation blends, with DALI operators.

    brightness_contrast computes b * (c0 + c * (x - c0)); with the pivot c0 = mean grey of the
    input, b * c0 is the mean grey of the brightened image, so this is torchvision's brightness
    then contrast. Saturation is torchvision's blend with the ITU-601 grey, written as arithmetic:
    on the CPU that is ~2x faster than DALI's HSV-based `fn.saturation`."""
    m = fn.reductions.mean(x, axes=[0, 1], dtype=types.FLOAT)
    x = fn.brightness_contrast(x, brightness=factors[0], contrast=factors[1],
                               contrast_center=m[0] * 0.299 + m[1] * 0.587 + m[2] * 0.114)
    grey = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
    s = factors[2]
    return fn.cast(x * s + grey * (1 - s), dtype=types.UINT8)


def _eval_geometry(hw: np.ndarray, spec: EvalSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the resized (height, width) and the crop corner (x, y) of the eval transform,
    computed as the reference loader does (`pipeline.loaders.reference.eval_transform`)."""
    size = np.empty((len(hw), 2), np.float32)
    corner = np.empty((len(hw), 2), np.int32)
    for k, (h, w) in enumerate(hw):
        nh, nw = (h, w) if min(h, w) == spec.resize else resized_shape(int(h), int(w), spec.resize)
        top, left = (nh - spec.size) // 2, (nw - spec.size) // 2
        if top < 0 or left < 0:
            raise DataError(f"eval crop {spec.size} is larger than the resized image {nh}x{nw}; "
                            f"set the eval resize >= size")
        size[k], corner[k] = (nh, nw), (left, top)
    return size, corner


class DaliEvalLoader(EvalLoader):
    """Evaluation with DALI: resize the shorter side, centre crop; this rank's shard once, in
    order. Corrupt images are dropped and counted in `skipped` (never replaced: a swapped test
    image would falsify the accuracy)."""

    name = "dali"

    def __init__(self, split: ShardedSplit, *, spec: EvalSpec, batch_size: int, rank: int = 0,
                 world_size: int = 1, device="cpu", workers: int = 2):
        super().__init__(indices=eval_indices(len(split), rank, world_size), batch_size=batch_size)
        self.spec, self.device, self.workers = spec, torch.device(device), max(1, workers)
        self.skipped = 0
        self._samples = _Samples(split, self._count_corrupt)
        self._decoder, self._device_id = _placement(self.device)
        self._probe = _DecodeProbe(self._decoder, self._device_id, batch_size, self.workers)
        self._pipe = None

    def _count_corrupt(self, n: int) -> None:
        self.skipped += n

    def __iter__(self):
        todo = self.indices
        while len(todo):
            todo = self._samples.readable(todo)
            chunks = [todo[s:s + self.batch_size] for s in range(0, len(todo), self.batch_size)]
            pipe = self._start(chunks)
            for k in range(len(chunks)):
                try:
                    x, y = pipe.run()
                except RuntimeError:  # a decode failure in this chunk (or a prefetched one)
                    bad = self._probe.find(self._samples, np.concatenate(chunks[k:k + PREFETCH + 1]))
                    if not bad:
                        raise
                    self._samples.retire(bad)
                    todo = todo[k * self.batch_size:]
                    break
                yield Batch(_to_torch(x, self.device).permute(0, 3, 1, 2),
                            _to_torch(y, self.device), None, None)
            else:
                todo = todo[:0]
        self.close()

    def _start(self, chunks: list[np.ndarray]):
        def source(info):
            if info.iteration >= len(chunks):
                raise StopIteration
            idx = chunks[info.iteration]
            size, corner = _eval_geometry(self._samples.sizes(idx), self.spec)
            return self._samples.arrays(idx), self._samples.labels[idx], size, corner

        def graph():
            enc, label, size, corner = fn.external_source(source=source, num_outputs=4, batch=True,
                                                          batch_info=True)
            x = fn.decoders.image(enc, device=self._decoder, output_type=types.RGB,
                                  adjust_orientation=False)
            x = fn.resize(x, size=size, interp_type=types.INTERP_LINEAR)
            return [fn.slice(x, start=corner, shape=[self.spec.size] * 2, axis_names="WH"), label]

        self.close()
        self._pipe = _build(graph, batch_size=self.batch_size, workers=self.workers,
                            device_id=self._device_id, prefetch=PREFETCH)
        return self._pipe

    def close(self) -> None:
        self._pipe = None
