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
resampling filter (DALI's antialiased bilinear resize) and, for jitter done by DALI's operators
(CPU decoding), a brightness not clamped before the contrast step and a uint8 rounding before the
saturation step (a level or two where the brightened image saturates). With GPU decoding, or
`jitter_in_torch=True`, the jitter is `pipeline.augment.color_jitter` in torch, as in the resident
loader. JPEG chroma is upsampled the same way on the
GPU and the CPU (`dali_support.decoder_args`), so GPU-decoded training images and CPU-decoded ones
differ only by the decoders' arithmetic rounding.

One pipeline per loader (`dali_support.PassPipeline`): built on the first pass, reused by every
epoch (training) or evaluation pass; its external source reads the pass's (epoch, first step) —
or chunk list — from the loader, and the pipeline is `reset()` after DALI's StopIteration.

Speed: DALI is at home on the GPU. On the CPU its resize and colour operators are not
vectorised: with 224-px crops of photographs it trails FFCV (measured with `iccl bench pipeline`).

Corrupt images: a sample whose header cannot be read is replaced before it reaches DALI; one that
DALI fails to decode makes the step fail, the failing samples are found by bisection with a
decode-only pipeline (`DecodeProbe`), and the pipeline is rebuilt (the only rebuild: DALI leaves a
failed pipeline unusable) from that step with them replaced by the rule every loader shares
(`pipeline.loaders.corrupt`: the next usable sample of the same class, at most 32 candidates,
then a DataError). `skipped` counts distinct corrupt samples.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from nvidia.dali import fn, types

from pipeline.augment import (STREAM_CLASS_AWARE, STREAM_UNIFORM, color_jitter, draw_params, resized_shape,
                              sampler_streams, step_generator, to_u8)
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.loaders.base import AugmentSpec, Batch, EvalLoader, EvalSpec, TrainLoader
from pipeline.loaders.dali_support import (DecodeProbe, PassPipeline, Samples, decoder_args, dense, placement,
                                          to_torch)
from pipeline.samplers import ClassAwareSampler, UniformSampler, eval_indices

PREFETCH = 2  # steps DALI prepares while the trainer works on the current one


class DaliLoader(TrainLoader):
    """Two-stream training loader on one DALI pipeline (see the module docstring)."""

    name = "dali"

    def __init__(self, split: ShardedSplit, *, uniform: Optional[UniformSampler],
                 class_aware: Optional[ClassAwareSampler], augment: AugmentSpec, seed: int,
                 steps_per_epoch: int, rank: int = 0, world_size: int = 1, device="cpu",
                 workers: int = 2, jitter_in_torch: bool = False):
        super().__init__(steps_per_epoch=steps_per_epoch)
        self._streams = sampler_streams("DaliLoader", augment, uniform, class_aware)
        self.augment, self.seed, self.rank = augment, seed, rank
        self.device, self.workers = torch.device(device), max(1, workers)
        self._batch = self._streams[0][0].local_batch
        self._samples = Samples(split, self._count_corrupt)
        self._decoder, self._device_id = placement(self.device)
        # Jitter needs each image's mean grey level as an operator argument, which DALI takes only
        # from the CPU: with GPU decoding the factors travel through the pipeline to torch.
        # `jitter_in_torch=True` takes that route with CPU decoding too (so tests cover it).
        jitter = augment.kind == "rrc" and augment.jitter > 0
        self._jitter_in_torch = jitter and (self._decoder == "mixed" or jitter_in_torch)
        self._probe = DecodeProbe(self._decoder, self._device_id, 2 * self._batch, self.workers)
        self._pipe = PassPipeline(
            lambda source: _train_graph(source, len(self._streams), augment, self._decoder,
                                        self._jitter_in_torch),
            batch_size=self._batch, workers=self.workers, device_id=self._device_id, prefetch=PREFETCH)

    def _count_corrupt(self, n: int) -> None:
        self.skipped += n

    @property
    def pipeline_builds(self) -> int:
        """DALI pipelines built so far: 1 after any number of passes, +1 per decode failure."""
        return self._pipe.builds

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
                out.append(dense((p.offsets[:, [1, 0]] - self.augment.pad).numpy(), np.int32))
            else:
                box = p.boxes.numpy()  # (top, left, height, width)
                out += [dense(box[:, [1, 0]], np.float32), dense(box[:, [3, 2]], np.float32)]
            out.append(p.flip.numpy().astype(np.int32))
            if p.jitter is not None:
                out.append(p.jitter.numpy())
        return out

    def _feeder(self, epoch: int, first_step: int):
        """The pass's source: batch k of the pipeline is step first_step + k of `epoch`."""
        def feed(k: int) -> list:
            if first_step + k >= self.steps_per_epoch:
                raise StopIteration
            return self._feed(epoch, first_step + k)
        return feed

    # --- device side --------------------------------------------------------------------------
    def _batches(self, start_step: int):
        epoch, step = self.epoch, start_step
        self._pipe.begin(self._feeder(epoch, step))
        while step < self.steps_per_epoch:
            try:
                outputs = self._pipe.run()
            except RuntimeError as e:  # a decode failure in this step (or a prefetched one)
                self._recover(epoch, step, e)
                self._pipe.begin(self._feeder(epoch, step))  # rebuilt, without the corrupt samples
                continue
            step += 1
            yield self._to_batch(outputs)
        self._pipe.end()

    def _to_batch(self, outputs) -> Batch:
        per = len(outputs) // len(self._streams)
        got = {}
        for k, (_, stream) in enumerate(self._streams):
            x = to_torch(outputs[k * per], self.device).permute(0, 3, 1, 2)  # channels_last NCHW
            if self._jitter_in_torch:
                x = to_u8(color_jitter(x.float(), to_torch(outputs[k * per + 2], self.device)))
            got[stream] = (x, to_torch(outputs[k * per + 1], self.device))
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
        self._pipe.discard()  # DALI frees the pipeline's threads and buffers with the object


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
            x = fn.decoders.image(enc, **decoder_args(decoder))
            x = fn.slice(x, start=start, shape=[spec.size, spec.size], axis_names="WH",
                         out_of_bounds_policy="pad", fill_values=0)
        else:
            anchor, shape, flip, *factors = geometry
            # Region-of-interest decode: only the crop box is decoded (for JPEG, only the needed
            # scanlines), DALI's main saving over decode-then-crop.
            x = fn.decoders.image_slice(enc, anchor, shape, axis_names="WH", normalized_anchor=False,
                                        normalized_shape=False, **decoder_args(decoder))
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
        self._samples = Samples(split, self._count_corrupt)
        self._decoder, self._device_id = placement(self.device)
        self._probe = DecodeProbe(self._decoder, self._device_id, batch_size, self.workers)
        self._pipe = PassPipeline(lambda source: _eval_graph(source, spec, self._decoder),
                                  batch_size=batch_size, workers=self.workers,
                                  device_id=self._device_id, prefetch=PREFETCH)

    def _count_corrupt(self, n: int) -> None:
        self.skipped += n

    def _feeder(self, chunks: list[np.ndarray]):
        """The pass's source: batch k of the pipeline is chunks[k]."""
        def feed(k: int) -> list:
            if k >= len(chunks):
                raise StopIteration
            idx = chunks[k]
            size, corner = _eval_geometry(self._samples.sizes(idx), self.spec)
            return [self._samples.arrays(idx), self._samples.labels[idx], size, corner]
        return feed

    def __iter__(self):
        todo = self.indices
        while len(todo):
            todo = self._samples.readable(todo)
            chunks = [todo[s:s + self.batch_size] for s in range(0, len(todo), self.batch_size)]
            self._pipe.begin(self._feeder(chunks))
            for k in range(len(chunks)):
                try:
                    x, y = self._pipe.run()
                except RuntimeError:  # a decode failure in this chunk (or a prefetched one)
                    bad = self._probe.find(self._samples, np.concatenate(chunks[k:k + PREFETCH + 1]))
                    if not bad:
                        raise
                    self._samples.retire(bad)
                    todo = todo[k * self.batch_size:]  # rebuilt from this chunk, without them
                    break
                yield Batch(to_torch(x, self.device).permute(0, 3, 1, 2),
                            to_torch(y, self.device), None, None)
            else:
                todo = todo[:0]
                self._pipe.end()

    def close(self) -> None:
        self._pipe.discard()


def _eval_graph(source, spec: EvalSpec, decoder: str) -> list:
    """Decode, resize to the per-sample size, centre crop -> image, label."""
    enc, label, size, corner = fn.external_source(source=source, num_outputs=4, batch=True,
                                                  batch_info=True)
    x = fn.decoders.image(enc, **decoder_args(decoder))
    x = fn.resize(x, size=size, interp_type=types.INTERP_LINEAR)
    return [fn.slice(x, start=corner, shape=[spec.size] * 2, axis_names="WH"), label]
