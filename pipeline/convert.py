"""`convert`: any `Source` -> the converted format of `pipeline.format`, in parallel and resumably.

Order of writes, each one atomic, so that a crash at any point loses at most the shards in flight:

    OUT/convert.json            first: what was asked (the fingerprint a rerun must match)
    OUT/<split>/shard-*.tar     one process-pool task per shard, plus its hidden record
                                (`pipeline.convert_shard`) saying it is done
    OUT/<split>/index.npy       the shards' rows concatenated in shard order
    OUT/skipped.json            the items left out by --on-error skip (only when there are some)
    OUT/meta.json               last: its presence means the conversion is complete
    OUT/<split>.beton           optional add-on written from the finished dataset (--ffcv); a rerun
                                with --ffcv adds it to a complete conversion

Rerunning the same request resumes: shards already done are kept, the rest are written. A rerun
whose fingerprint (source, classes, labels, shard size, max side, quality) differs is refused, so
two different datasets can never be mixed in one folder. `on_error`, `workers` and `ffcv` are not
part of the fingerprint: "stop at a bad file, then rerun with --on-error skip" is the normal way to
leave bad files out, and keeps the shards written before the stop. A conversion that stopped at a
bad item marks its request file so: the other fix its message offers, changing the source (removing
or replacing the file), makes a different request, and a rerun with it starts the folder over
(the unfinished output of the stopped request is deleted) instead of being refused.

Bad items (missing, unreadable or corrupt files, labels out of range) stop the conversion with a
message naming them, or with on_error="skip" are left out: a shard then simply holds fewer samples,
keys keep the source position (see `pipeline.format`), and OUT/skipped.json lists what was left out.

Shards are encoded by spawned worker processes, so a script calling `convert` with workers > 1
needs the usual `if __name__ == "__main__":` guard of Python multiprocessing.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.atomic import atomic_open, output_dir, remove_stale_tmp, write_json
from pipeline.convert_shard import (LARGE_IMAGE_PIXELS, ShardResult, ShardTask, describe_item,
                                    load_done, run_shard)
from pipeline.cpus import usable_cpus
from pipeline.errors import ON_ERROR, DataError
from pipeline.format import (FORMAT_NAME, FORMAT_VERSION, INDEX_DTYPE, INDEX_FILE, META_FILE,
                             REQUEST_FILE, beton_name, read_meta, shard_ids, shard_name, shot_groups)
from pipeline.progress import count, progress, say
from pipeline.sources.base import Source

# 1,000 samples make shards of ~100 MB for ImageNet-size JPEGs (large sequential reads, few
# files) and a few MB for CIFAR (still enough shards for every loader worker to have its own).
DEFAULT_SHARD_SIZE = 1000
STOPPED = "stopped_at_bad_input"  # key in REQUEST_FILE: the conversion stopped there, with this message
SKIPPED_FILE = "skipped.json"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def convert(source: Source, out: str | os.PathLike, *, shard_size: int = DEFAULT_SHARD_SIZE,
            workers: int | None = None, max_side: int | None = None, quality: int = 90,
            ffcv: bool = False, on_error: str = "stop") -> dict:
    """Write `source` to `out` in the converted format and return its meta.json content.

    shard_size: samples per shard. workers: processes encoding shards (default: all cores).
    max_side: shrink images whose longer side exceeds it (stored as baseline JPEG).
    quality: JPEG quality of images that have to be (re-)encoded. ffcv: also write
    `<split>.beton`. on_error: "stop" raises DataError at the first bad item, "skip" leaves
    bad items out and lists them in skipped.json.
    """
    workers = usable_cpus() if workers is None else workers
    _check_options(shard_size, workers, max_side, quality, on_error)
    _check_source(source, on_error)
    out = Path(out)
    options = {"shard_size": shard_size, "max_side": max_side, "quality": quality}
    _claim(out, source, _fingerprint(source, options))

    meta = _complete_meta(out, source)
    if meta is not None:
        say(f"{out}: conversion already complete, nothing to do.")
    else:
        try:
            results = _write_shards(source, out, shard_size, workers, max_side, quality, on_error)
            meta = _finish(source, out, results, {**options, "on_error": on_error, "ffcv": False})
        except DataError as e:  # a bad item or class: the user may fix it by changing the source
            write_json(out / REQUEST_FILE, {**_fingerprint(source, options), STOPPED: str(e)})
            raise
    if ffcv:
        _add_betons(out, meta, workers)
    return meta


# --- checks -----------------------------------------------------------------------------------
def _check_options(shard_size, workers, max_side, quality, on_error) -> None:
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: must be at least 1.")
    if workers < 1:
        raise DataError(f"--workers {workers}: must be at least 1.")
    if max_side is not None and max_side < 1:
        raise DataError(f"--max-side {max_side}: must be at least 1 pixel.")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality {quality}: must be between 1 and 100.")
    if on_error not in ON_ERROR:
        raise DataError(f"--on-error {on_error!r}: must be one of {', '.join(ON_ERROR)}.")


def _check_source(source: Source, on_error: str) -> None:
    if "train" not in source.splits:
        raise DataError(f"{source.name}: the source has no train split "
                        f"(it has {', '.join(sorted(source.splits))}). Check the source path.")
    for name, split in source.splits.items():
        if not _SPLIT_NAME.fullmatch(name):
            raise DataError(f"{source.name}: split name {name!r} is not a plain folder name.")
        if on_error == "stop":  # fail before hours of encoding, not at the shard that holds it
            bad = np.flatnonzero((split.labels < 0) | (split.labels >= len(source.classes)))
            if len(bad):
                i = int(bad[0])
                origin = split.origins[i] if split.origins is not None else None
                raise DataError(
                    f"{describe_item(name, i, split.items[i], origin)}: label {split.labels[i]} out "
                    f"of range [0, {len(source.classes)}) ({len(bad)} such items in {name}). "
                    f"Fix the labels, or pass --on-error skip to leave them out.")


# --- request fingerprint and resuming ---------------------------------------------------------
def _fingerprint(source: Source, options: dict) -> dict:
    """What decides the output: a rerun with the same fingerprint continues the same conversion."""
    def sha(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()

    return _jsonable({
        "name": source.name,
        "description": source.description,
        "num_classes": len(source.classes),
        # Class names come from file names, which need not be valid UTF-8 (held as surrogate
        # escapes, as os.fsdecode gives them): hash the bytes the filesystem has.
        "classes_sha256": sha(b"\n".join(os.fsencode(c) for c in source.classes)),
        "splits": {name: {"num_samples": len(s.labels),
                          "labels_sha256": sha(s.labels.astype("<i8").tobytes())}
                   for name, s in source.splits.items()},
        "options": options,
    })


def _jsonable(obj):
    """obj as JSON would give it back (paths and numpy values as plain types)."""
    def default(o):
        if isinstance(o, (np.generic, np.ndarray)):
            return o.tolist()
        return str(o)
    return json.loads(json.dumps(obj, default=default))


def _claim(out: Path, source: Source, fingerprint: dict) -> None:
    """Make `out` ours: new or empty, or holding the same request (then resume), or the unfinished
    output of a request that stopped at a bad input (then start over)."""
    output_dir(out, "--out", probe=not (out / REQUEST_FILE).is_file())
    remove_stale_tmp(out)
    for name in source.splits:
        if (out / name).is_dir():
            remove_stale_tmp(out / name)
    request = out / REQUEST_FILE
    if request.is_file():
        try:
            previous = json.loads(request.read_text())
        except ValueError as e:
            raise DataError(f"{request}: unreadable ({e}); choose another --out or delete it.") from e
        stopped = isinstance(previous, dict) and previous.pop(STOPPED, None)
        if previous == fingerprint:
            if stopped:
                write_json(request, fingerprint)
            return
        if stopped and not (out / META_FILE).is_file():
            say(f"{out}: the previous conversion stopped at a bad input and the source has changed "
                f"since; starting over.")
            _remove_output(out, set(previous.get("splits", {})) | set(source.splits))
            write_json(request, fingerprint)
            return
        # The differences shown with both values (an option such as --imbalance or --quality, a
        # count) first, then those shown by name only (lists, hashes).
        differences = sorted(_differences(previous, fingerprint), key=lambda d: " before, " not in d)
        shown = ", ".join(differences[:5]) + (", ..." if len(differences) > 5 else "")
        raise DataError(f"{out} holds a different conversion (differs in: {shown}); "
                        f"choose another --out or delete it.")
    elif any(out.iterdir()):
        raise DataError(f"{out} is not empty and holds no conversion (no {REQUEST_FILE}); "
                        f"choose a new or empty --out folder.")
    else:
        write_json(request, fingerprint)


def _remove_output(out: Path, splits: set[str]) -> None:
    """Delete what a conversion writes (its own file names only) from `out`."""
    for name in splits:
        split_dir = out / name
        if _SPLIT_NAME.fullmatch(name) and split_dir.is_dir():
            for p in [*split_dir.glob("shard-*.tar"), *split_dir.glob(".shard-*"), split_dir / INDEX_FILE]:
                p.unlink(missing_ok=True)
        (out / beton_name(name)).unlink(missing_ok=True)
    (out / SKIPPED_FILE).unlink(missing_ok=True)


def _differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    if a == b:
        return []
    key = prefix.rstrip(".")
    short = all(isinstance(v, (int, float, str, type(None))) and len(str(v)) <= 24 for v in (a, b))
    return [f"{key}: {a} before, {b} now" if short else key]


def _complete_meta(out: Path, source: Source) -> dict | None:
    """meta.json when the conversion in `out` is complete; a damaged one is removed for repair."""
    path = out / META_FILE
    if not path.is_file():
        return None
    try:
        meta = read_meta(out)
    except DataError:
        meta = None
    if meta is not None and set(meta["splits"]) == set(source.splits) and all(
            (out / name / INDEX_FILE).is_file()
            and all((out / name / shard_name(k)).is_file() for k in shard_ids(info))
            for name, info in meta["splits"].items()):
        return meta
    say(f"{out}: the conversion has missing or damaged files; rewriting them.")
    path.unlink()
    return None


# --- the work ---------------------------------------------------------------------------------
def _write_shards(source: Source, out: Path, shard_size: int, workers: int,
                  max_side: int | None, quality: int, on_error: str) -> list[ShardResult]:
    """Results of every shard of every split: those done earlier, then the newly written ones."""
    results, todo = [], []
    for name, split in source.splits.items():
        split_dir = out / name
        split_dir.mkdir(exist_ok=True)
        for k in range(math.ceil(len(split.labels) / shard_size)):
            done = load_done(name, split_dir, k)
            if done is not None:
                results.append(done)
                continue
            lo, hi = k * shard_size, min((k + 1) * shard_size, len(split.labels))
            todo.append(ShardTask(
                split=name, dir=split_dir, shard=k, start=lo, items=split.items[lo:hi],
                labels=split.labels[lo:hi],
                origins=split.origins[lo:hi] if split.origins is not None else None,
                num_classes=len(source.classes), max_side=max_side, quality=quality,
                on_error=on_error))
    total = sum(len(s.labels) for s in source.splits.values())
    if results:
        say(f"{out}: resuming; {len(results)} of {count(len(results) + len(todo), 'shard')} already written.")
    with progress(total, f"convert {source.name}", unit="images") as bar:
        bar.advance(sum(r.num_items for r in results))
        for result in _run(todo, workers):
            results.append(result)
            bar.advance(result.num_items)
    return results


def _run(tasks: list[ShardTask], workers: int) -> Iterator[ShardResult]:
    """Results of `tasks` as they finish; in this process when one worker is asked for."""
    if workers == 1 or len(tasks) <= 1:
        yield from map(run_shard, tasks)
        return
    # spawn: workers must not inherit the parent's threads (progress display) or open maps.
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"))
    try:
        for future in as_completed([pool.submit(run_shard, t) for t in tasks]):
            yield future.result()
    finally:
        # On an error (or Ctrl-C) drop the queued shards but let those in flight finish: they are
        # complete files that the rerun keeps.
        pool.shutdown(wait=True, cancel_futures=True)


def _finish(source: Source, out: Path, results: Iterable[ShardResult], options: dict) -> dict:
    """Indexes, skipped.json and meta.json from the shard results."""
    by_split: dict[str, list[ShardResult]] = {name: [] for name in source.splits}
    for r in results:
        by_split[r.split].append(r)
    num_classes = len(source.classes)
    splits, skipped, indexes = {}, [], {}
    for name, rs in by_split.items():
        rs.sort(key=lambda r: r.shard)
        indexes[name] = np.concatenate([r.rows for r in rs] or [np.empty(0, INDEX_DTYPE)])
        labels = indexes[name]["label"].astype(np.int64)
        split_skipped = [s for r in rs for s in r.skipped]
        skipped += split_skipped
        written = [r for r in rs if len(r.rows)]  # a shard that lost every item has no file
        for r in rs:
            if not len(r.rows):  # an empty tar an older version left there
                (out / name / shard_name(r.shard)).unlink(missing_ok=True)
        splits[name] = {
            "num_samples": len(labels), "num_shards": len(written),
            "shards": [r.shard for r in written],
            "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
            "bytes": sum((out / name / shard_name(r.shard)).stat().st_size for r in written),
            "formats": ["webdataset"], "skipped": len(split_skipped),
            "converted_to_rgb": sum(r.converted_to_rgb for r in rs),
            "reencoded": sum(r.reencoded for r in rs),
            "exif_rotated": sum(r.exif_rotated for r in rs),
            "shard_sha256": [r.sha256 for r in written],
        }
    _check_train_classes(source, splits["train"]["class_counts"], skipped)
    turned = sum(s["exif_rotated"] for s in splits.values())
    if turned:
        say(f"{turned} images turned upright by their EXIF orientation (and re-encoded).")
    large = sum(r.large_images for rs in by_split.values() for r in rs)
    if large:
        say(f"hint: {large} images have more than {LARGE_IMAGE_PIXELS // 1_000_000} megapixels and are "
            f"stored at full size; converting with --max-side 512 (or the training size x 2) makes every "
            f"epoch decode them many times faster.")
    for name, index in indexes.items():
        with atomic_open(out / name / INDEX_FILE, "wb") as f:
            np.save(f, index)
    if skipped:
        write_json(out / SKIPPED_FILE, skipped)
        say(f"{count(len(skipped), 'bad item')} left out; see {out / SKIPPED_FILE}.")
    else:
        (out / SKIPPED_FILE).unlink(missing_ok=True)
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "name": source.name,
        "classes": list(source.classes), "splits": splits,
        "shot_groups": shot_groups(splits["train"]["class_counts"]),
        "source": _jsonable({"kind": source.name, **source.description}),
        "options": options,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / META_FILE, meta)
    return meta


def _check_train_classes(source: Source, counts: list[int], skipped: list[dict]) -> None:
    empty = [k for k, n in enumerate(counts) if n == 0]
    if empty:
        k = empty[0]
        why = " after skipping bad items" if skipped else ""
        raise DataError(
            f"{source.name}: class {k} ({source.classes[k]!r}) has no training images{why} "
            f"({len(empty)} empty classes in all; source: {_brief(source.description)}). "
            f"Every class needs at least one: fix the source, or remove the class from it.")


def _brief(description: dict, limit: int = 300) -> str:
    text = json.dumps(_jsonable(description))
    return text if len(text) <= limit else text[:limit] + " ..."


def _add_betons(out: Path, meta: dict, workers: int) -> None:
    """Write the FFCV file of every split that lacks one, then record it in meta.json."""
    from pipeline.dataset import ShardedSplit
    from pipeline.ffcv_writer import write_beton

    for name, info in meta["splits"].items():
        path = out / beton_name(name)
        if "ffcv" in info["formats"] and path.is_file():
            continue
        write_beton(ShardedSplit(out, name), path, workers)
        info["formats"] = ["webdataset", "ffcv"]
        meta["options"]["ffcv"] = True
        write_json(out / META_FILE, meta)
