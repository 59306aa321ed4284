"""Read and preprocess listed cases into an :class:`ImageSet` (or a streamed set).

The cases come from :func:`medanomaly.data.listing.list_cases` (a manifest, a folder or a
DICOMweb query); a case that cannot be read, or does not fit the model, is left out and named
in the :class:`LoadReport` with the reason.

With ``cache`` on, each case is read and put through the deterministic transforms once;
later loads read the stored arrays (see :mod:`medanomaly.data.cache`).

The first pass runs in worker processes (``num_workers``, default: the cores available;
:mod:`medanomaly.data.workers`), one case per task, with a progress bar in cases/s. A case that
fails in a worker is skipped and named exactly as in the main process; a worker that dies
is replaced and the case it was on is named. The series of a DICOMweb archive are listed
once per study before the first pass (:func:`medanomaly.io.dicomweb.with_instances`); in this
process the next series is retrieved in a background thread, one series ahead, while the
current one is read and preprocessed. With ``stream=True`` the result is a
:class:`~medanomaly.data.streaming.StreamedSet`, which reads each case from the cache when it is
used and lets cases keep their own shapes; otherwise an in-memory :class:`ImageSet`.

:func:`load_cases` returns once the first pass has ended. ``score`` and ``screen`` in one
process do not wait for it: :mod:`medanomaly.data.ahead` runs the same first pass in a
background thread and hands out each chunk of cases as soon as it is prepared, so that the
scoring of a chunk overlaps the retrieval and preparation of the next.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import get_track_meta, set_track_meta
from tqdm.auto import tqdm

from medanomaly.data.cache import CacheEntry, PreprocessCache, Preprocessed
from medanomaly.data.listing import Case, list_cases
from medanomaly.data.sets import ImageSet
from medanomaly.data.streaming import StreamedSet
from medanomaly.data.workers import WorkerDied, available_cores, map_in_workers
from medanomaly.errors import (
    ConfigError,
    ImageReadError,
    InvalidImageError,
    MedanomalyError,
    problem_text,
)
from medanomaly.image import SOURCE_GRID_KEY, MedicalImage
from medanomaly.io import read_image
from medanomaly.io.dicomweb import (
    RemoteSeries,
    fetch_series,
    series_digest,
    with_instances,
)
from medanomaly.io.temporary import temporary_folder
from medanomaly.transforms import FOREGROUND_KEY, LESION_KEY, Compose, build_transforms
from medanomaly.transforms.augment import RandAffine, RandFlip, RandIntensity

log = logging.getLogger(__name__)

AUTO_SERIAL_SECONDS = 3.0
"""With ``num_workers`` left to its default, cases are prepared in this process while the
first pass has taken less than this: small sets never pay for starting worker processes."""

MIN_SIZE = 2
"""Default ``data.min_size``: images with fewer voxels than this along an axis are skipped."""


@dataclass(frozen=True)
class InputSpec:
    """What a run's model takes: cases that do not fit are skipped before preprocessing.

    Attributes:
        spatial_dims: 2 for slices, 3 for volumes.
        channels: Image channels the model takes (``None``: any).
        shape: The preprocessed ``(C, *spatial)`` the model was trained on (``None``: any).
    """

    spatial_dims: int
    channels: int | None = None
    shape: tuple[int, ...] | None = None


@dataclass
class LoadReport:
    """Cases that could not be used, each with the reason, and non-fatal problems of the rest.

    Attributes:
        skipped: ``(path, problem)`` of every case left out.
        warnings: ``(path, problem)`` of problems in cases that were kept (e.g. slices
            missing from a DICOM series); they do not make the report true.
    """

    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    """Position in the case list of each case that was kept, in the set's order."""

    def __bool__(self) -> bool:
        return bool(self.skipped)

    def lines(self) -> list[str]:
        """One ``path: problem`` line per skipped case."""
        return [f"{path}: {problem}" for path, problem in self.skipped]

    def skipped_records(self) -> list[dict[str, str]]:
        """The skipped cases as ``{"case", "reason"}`` dicts (for JSON outputs)."""
        return [{"case": path, "reason": problem} for path, problem in self.skipped]

    def warning_lines(self) -> list[str]:
        """One ``path: problem`` line per problem of a kept case."""
        return [f"{path}: {problem}" for path, problem in self.warnings]


def _read_facts(image: MedicalImage) -> dict[str, Any]:
    """What the fit checks need to know of a case as read (kept in the cache)."""
    file_shape = image.meta.get("file_shape")
    return {
        "read_shape": [int(n) for n in image.array.shape],
        "file_shape": None if file_shape is None else [int(n) for n in file_shape],
        "format": image.meta.get("format"),
    }


def _size_text(shape: Any) -> str:
    return "×".join(str(int(n)) for n in shape)


def check_fits(
    path: str | Path, facts: dict[str, Any], expect: InputSpec | None, min_size: int
) -> None:
    """Refuse a case whose dimensionality, channels or size do not fit the run.

    Args:
        path: The case (for the error).
        facts: From reading it: ``read_shape`` ``(C, *spatial)`` and the ``file_shape``;
            ``model_channels``, the channels after preprocessing, once known (a
            ``select_channels`` transform may keep fewer than were read).
        expect: What the model takes (``None``: only the size is checked).
        min_size: Fewest voxels allowed along any spatial axis longer than one voxel.

    Raises:
        InvalidImageError: The case does not fit; the message says how.
    """
    problem = _misfit(facts, expect, min_size)
    if problem is not None:
        raise InvalidImageError(path, problem)


def _misfit(facts: dict[str, Any], expect: InputSpec | None, min_size: int) -> str | None:
    """Why a case read as ``facts`` cannot go into the model, or ``None``."""
    channels, *spatial = facts["read_shape"]
    stored = _size_text(facts.get("file_shape") or spatial)
    thick = [n for n in spatial if n > 1]
    one_slice = len(spatial) == 3 and len(thick) == 2 and min(thick) >= min_size
    if expect is not None and expect.spatial_dims == 3 and (len(spatial) == 2 or one_slice):
        return f"a 2-D image ({stored}) cannot go into a 3-D model"
    if not thick or min(thick) < min_size:  # one-voxel axes are a slice stored as a volume
        kind = "volume" if len(spatial) == 3 else "image"
        return (
            f"{kind} {_size_text(spatial)} is smaller than the minimum of {min_size} voxels "
            "per axis (data.min_size)"
        )
    if expect is None:
        return None
    if expect.spatial_dims == 2 and len(spatial) == 3:
        return f"a 3-D volume ({stored}) cannot go into a 2-D model"
    model_channels = facts.get("model_channels", channels)
    if expect.channels is not None and model_channels != expect.channels:
        after = (
            "" if model_channels == channels else f" as read, {model_channels} after preprocessing"
        )
        return (
            f"{channels} channels{after} (stored as {stored}); the run's model takes "
            f"{expect.channels}"
        )
    return None


def _preprocess(
    case: Case,
    pipeline: Compose,
    read_options: dict[str, Any],
    expect: InputSpec | None = None,
    min_size: int = MIN_SIZE,
) -> Preprocessed:
    """Read one case (and its lesion mask), check that it fits the run, preprocess both."""
    image = read_image(case.path, **read_options)
    facts = _read_facts(image)
    check_fits(
        case.path, facts, None if expect is None else replace(expect, channels=None), min_size
    )
    if case.mask is not None:
        mask = read_image(case.mask).array[0] > 0
        if mask.shape != image.spatial_shape:
            raise InvalidImageError(
                case.mask, f"mask shape {mask.shape} differs from image shape {image.spatial_shape}"
            )
        image.meta[LESION_KEY] = mask
    image = pipeline(image)
    array = np.asarray(image.array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InvalidImageError(case.path, "preprocessed image contains NaN or infinite values")
    facts["model_channels"] = int(array.shape[0])  # after channel selection, if any
    check_fits(case.path, facts, expect, min_size)
    masks = {
        k: np.asarray(image.meta[k], bool) for k in (FOREGROUND_KEY, LESION_KEY) if k in image.meta
    }
    return Preprocessed(
        array=array,
        masks=masks,
        problems=list(image.problems),
        grid=image.meta.get(SOURCE_GRID_KEY),
        facts=facts,
    )


def _load_case(
    case: Case,
    pipeline: Compose,
    read_options: dict[str, Any],
    cache: PreprocessCache | None,
    expect: InputSpec | None,
    min_size: int,
    arrays: bool = True,
) -> Preprocessed | CacheEntry:
    """Preprocess one case, through the cache when there is one; refuse cases that do not fit.

    With ``arrays`` the result holds the arrays (:class:`Preprocessed`); without, the case is
    only made sure to be in ``cache`` and its index (:class:`CacheEntry`) is returned.
    """
    if case.problem is not None:
        raise ImageReadError(case.path, case.problem)
    remote = case.path if isinstance(case.path, RemoteSeries) else None
    digest = None if remote is None else series_digest(remote)

    def compute() -> Preprocessed:
        if remote is None:
            return _preprocess(case, pipeline, read_options, expect, min_size)
        with _retrieved(remote, digest, cache) as folder:  # type: ignore[arg-type]
            local = replace(case, path=folder)
            return _preprocess(local, pipeline, read_options, expect, min_size)

    if cache is None:
        result: Preprocessed | CacheEntry = compute()
    else:
        key = cache.key(case.path, pipeline, read_options, mask=case.mask, source_digest=digest)
        details = {"source": str(case.path), "transforms": pipeline.to_config()}
        result = (cache.fetch if arrays else cache.ensure)(key, compute, details)
        if result.facts:  # a hit was stored by another run: check it against this one
            check_fits(case.path, result.facts, expect, min_size)
    if expect is not None and expect.shape is not None and result.shape != expect.shape:
        raise InvalidImageError(
            case.path,
            f"preprocessed to shape {tuple(result.shape)}, not the model's input {expect.shape}",
        )
    return result


@contextmanager
def _retrieved(series: RemoteSeries, digest: str, cache: PreprocessCache | None) -> Iterator[Path]:
    """The folder holding an archive's series: kept in the cache, else temporary."""
    if cache is not None:
        yield fetch_series(series, cache.series_folder(digest))
        return
    with tempfile.TemporaryDirectory(prefix="medanomaly-series-") as folder:
        yield fetch_series(series, Path(folder) / "series")


@dataclass(frozen=True)
class _Job:
    """How to prepare each case: plain data, so that it can go to worker processes.

    Attributes:
        transforms: The deterministic transforms, in their config form.
        read_options: Keyword arguments of ``read_image``.
        store: Cache folder the cases go through (``None``: no cache).
        expect: What the run's model takes.
        min_size: Fewest voxels per axis.
        keep_arrays: Return the arrays (this process keeps them in memory); otherwise the
            case only goes into ``store`` and its index is returned.
    """

    transforms: str
    read_options: dict[str, Any]
    store: str | None
    expect: InputSpec | None
    min_size: int
    keep_arrays: bool = True


@dataclass
class CaseOutcome:
    """What preparing one case gave: arrays, a cache index, or the error that stopped it."""

    value: Preprocessed | CacheEntry | None = None
    error: BaseException | None = None
    cached: bool = False


@functools.lru_cache(maxsize=8)
def _pipeline(transforms: str) -> Compose:
    """The transforms of a job, built once per process."""
    return build_transforms(json.loads(transforms))


def _prepare(job: _Job, case: Case) -> CaseOutcome:
    """Prepare one case (in this process or a worker); expected failures are returned."""
    cache = None if job.store is None else PreprocessCache(job.store)
    try:
        value = _load_case(
            case,
            _pipeline(job.transforms),
            job.read_options,
            cache,
            job.expect,
            job.min_size,
            arrays=job.keep_arrays or cache is None,
        )
    except (MedanomalyError, OSError, ValueError) as error:
        log.info("skipping %s", case.path, exc_info=True)
        return CaseOutcome(error=error)
    return CaseOutcome(value=value, cached=bool(cache is not None and cache.hits))


def _prepare_in_worker(task: tuple[_Job, Case]) -> CaseOutcome:
    return _prepare(*task)


class FirstPass:
    """Prepares every case of a load, in this process or in worker processes.

    Args:
        job: How to prepare a case.
        num_workers: Worker processes; ``None``: the cores available, once the cases done
            here have taken :data:`AUTO_SERIAL_SECONDS`; 0 or 1: all in this process.
        stream: Every case goes into a store (a temporary one without a cache folder).
    """

    def __init__(self, job: _Job, num_workers: int | None, stream: bool) -> None:
        self.job = job
        self.num_workers = num_workers
        self.owner: tempfile.TemporaryDirectory | None = None
        if stream:
            self._store_only()

    def _store_only(self) -> None:
        """From now on cases only go into the store: a temporary folder without a cache."""
        if self.job.store is None:
            self.owner = temporary_folder("stream")
            self.job = replace(self.job, store=self.owner.name)
        self.job = replace(self.job, keep_arrays=False)

    def run(self, cases: Sequence[Case]) -> Iterator[tuple[int, CaseOutcome]]:
        """Yield ``(index, outcome)`` for every case (in any order), with a progress bar."""
        cases = _listed(cases)
        bar = tqdm(total=len(cases), unit="case", desc="preparing cases", disable=None)
        outcomes = self._outcomes(cases)
        try:
            for index, outcome in outcomes:
                bar.update(1)
                yield index, outcome
        finally:  # stopped early: the retrieval ahead and the worker processes end here
            outcomes.close()
            bar.close()

    def _outcomes(self, cases: Sequence[Case]) -> Iterator[tuple[int, CaseOutcome]]:
        workers = available_cores() if self.num_workers is None else int(self.num_workers)
        started = time.perf_counter()
        done = 0
        if self.num_workers is None or workers < 2:
            with _Prefetch(self.job) as ahead:
                if cases:
                    ahead.start(0, cases[0])
                for done, case in enumerate(cases, start=1):
                    error = ahead.wait(done - 1)  # this case's series is here (or failed)
                    if done < len(cases):  # the next one's comes while this one is prepared
                        ahead.start(done, cases[done])
                    yield done - 1, _prepare(self.job, case) if error is None else error
                    slow = time.perf_counter() - started > AUTO_SERIAL_SECONDS
                    if workers >= 2 and slow and len(cases) - done >= 2:
                        break
                else:
                    return
        self._store_only()
        rest = [(self.job, case) for case in cases[done:]]
        log.info("preparing %d cases in %d worker processes", len(rest), workers)
        for index, outcome in map_in_workers(_prepare_in_worker, rest, workers):
            if isinstance(outcome, WorkerDied):
                outcome = CaseOutcome(
                    error=ImageReadError(cases[done + index].path, outcome.message)
                )
            yield done + index, outcome


def _listed(cases: Sequence[Case]) -> Sequence[Case]:
    """The cases, their archive series' instances listed once per study (one QIDO-RS each)."""
    remote = [i for i, case in enumerate(cases) if isinstance(case.path, RemoteSeries)]
    if not remote:
        return cases
    series = with_instances([cases[i].path for i in remote])  # type: ignore[misc]
    listed = list(cases)
    for i, one in zip(remote, series, strict=True):
        listed[i] = replace(cases[i], path=one)
    return listed


def _retrieve(job: _Job, case: Case) -> None:
    """Retrieve a case's archive series into the cache, unless the case is prepared there."""
    cache = PreprocessCache(job.store)  # type: ignore[arg-type]
    series: RemoteSeries = case.path  # type: ignore[assignment]
    digest = series_digest(series)
    pipeline = _pipeline(job.transforms)
    key = cache.key(series, pipeline, job.read_options, mask=case.mask, source_digest=digest)
    if cache.entry(key) is None:
        fetch_series(series, cache.series_folder(digest))


class _Prefetch:
    """Retrieves the next archive series in a background thread while this one is prepared.

    At most one series is retrieved ahead. A retrieval that fails with an expected error
    (the archive cannot be reached) gives the case the outcome that preparing it would
    have given (the same error, naming the series); any other exception is raised in the
    caller's thread when the case's turn comes.

    Args:
        job: How the cases are prepared; its ``store`` is the cache folder the series go into
            (``None``: no prefetch; each case then retrieves its series into a temporary
            folder of its own).
    """

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if job.store else None
        self.pending: dict[int, tuple[Future, Case]] = {}

    def start(self, index: int, case: Case) -> None:
        """Start retrieving ``case``'s series (if it is an archive's)."""
        if self.pool is not None and isinstance(case.path, RemoteSeries) and case.problem is None:
            self.pending[index] = (self.pool.submit(_retrieve, self.job, case), case)

    def wait(self, index: int) -> CaseOutcome | None:
        """Wait for the case's retrieval; its outcome if it failed, else ``None``."""
        future, case = self.pending.pop(index, (None, None))
        if future is None:
            return None
        try:
            future.result()
        except (MedanomalyError, OSError, ValueError) as error:
            log.info("skipping %s", case.path, exc_info=True)  # type: ignore[union-attr]
            return CaseOutcome(error=error)
        return None

    def __enter__(self) -> _Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:  # a retrieval still running ends before the workers start
            self.pool.shutdown(wait=True, cancel_futures=True)


def load_dataset(
    source: str | Path,
    transforms: list[dict[str, Any]] | None = None,
    label_names: dict[str, int] | None = None,
    read_options: dict[str, Any] | None = None,
    strict: bool = False,
    augment: bool = False,
    cache: bool | str | Path | None = None,
    min_size: int = MIN_SIZE,
    expect: InputSpec | None = None,
    stream: bool = False,
    num_workers: int | None = None,
) -> tuple[ImageSet | StreamedSet, LoadReport]:
    """Read and preprocess every case of a manifest or folder.

    Args:
        source: A CSV manifest or a folder.
        transforms: Preprocessing in the YAML list form of :func:`build_transforms`; in
            memory (``stream`` off) the result must put every image on one grid (e.g. end
            with ``resize``).
        label_names: Extra label names, e.g. ``{"hemorrhage": 1}``.
        read_options: Keyword arguments of :func:`medanomaly.io.read_image`.
        strict: Raise on the first unreadable case instead of skipping it.
        augment: Attach the random transforms of ``transforms`` (everything from the first
            random one on) to the set, to be drawn anew each time an image is used in
            training. Without it they are left out (validation, scoring).
        cache: Store the result of the deterministic transforms per case and read it back
            on later loads: ``None``/``False`` off, ``True`` in ``$MEDANOMALY_CACHE`` (else
            ``~/.cache/medanomaly``), a folder name for that folder. Random transforms stay
            live.
        min_size: Skip images with fewer voxels than this along any axis (as read).
        expect: What the run's model takes (its ``input_spec()``): cases of another
            dimensionality, channel count or preprocessed shape are skipped and named.
        stream: Return a :class:`~medanomaly.data.streaming.StreamedSet` that reads each case
            from the cache when used (a temporary folder without ``cache``), instead of
            an :class:`ImageSet` in memory; cases may then differ in shape.
        num_workers: Worker processes of the first pass (decoding and preprocessing);
            ``None``: the cores available (sets prepared within a few seconds stay in this
            process); 0 or 1: this process only.

    Returns:
        The image set and a report of skipped cases (each with its reason).
    """
    return load_cases(
        list_cases(source, label_names),
        source,
        transforms=transforms,
        read_options=read_options,
        strict=strict,
        augment=augment,
        cache=cache,
        min_size=min_size,
        expect=expect,
        stream=stream,
        num_workers=num_workers,
    )


def load_cases(
    cases: Sequence[Case],
    source: str | Path,
    transforms: list[dict[str, Any]] | None = None,
    read_options: dict[str, Any] | None = None,
    strict: bool = False,
    augment: bool = False,
    cache: bool | str | Path | None = None,
    min_size: int = MIN_SIZE,
    expect: InputSpec | None = None,
    stream: bool = False,
    num_workers: int | None = None,
    allow_empty: bool = False,
) -> tuple[ImageSet | StreamedSet, LoadReport]:
    """Prepare the given cases (a list from :func:`list_cases`, or one rank's share of it).

    Args:
        cases: The cases, in the order of the set.
        source: Where they were listed from (for messages).
        transforms: As in :func:`load_dataset`.
        read_options: As in :func:`load_dataset`.
        strict: As in :func:`load_dataset`.
        augment: As in :func:`load_dataset`.
        cache: As in :func:`load_dataset`.
        min_size: As in :func:`load_dataset`.
        expect: As in :func:`load_dataset`.
        stream: As in :func:`load_dataset`.
        num_workers: As in :func:`load_dataset`.
        allow_empty: Return an empty set instead of raising when no case is readable (a
            rank's share may hold only bad files).

    Returns:
        The set and the :class:`LoadReport` (whose ``kept`` gives each kept case's position
        in ``cases``).
    """
    first_pass, augmentation = build_first_pass(
        transforms, read_options, cache, min_size, expect, stream, num_workers
    )
    outcomes: list[CaseOutcome | None] = [None] * len(cases)
    for index, outcome in first_pass.run(cases):
        if outcome.error is not None and strict:
            raise outcome.error
        outcomes[index] = outcome
    augment_fn = ArrayAugment(augmentation) if augment and len(augmentation) else None
    return gather_loaded(source, cases, outcomes, first_pass, augment_fn, stream, allow_empty)


def build_first_pass(
    transforms: list[dict[str, Any]] | None,
    read_options: dict[str, Any] | None,
    cache: bool | str | Path | None,
    min_size: int,
    expect: InputSpec | None,
    stream: bool,
    num_workers: int | None,
) -> tuple[FirstPass, Compose]:
    """The first pass of a load, and the random transforms left for later (augmentation)."""
    pipeline, augmentation = build_transforms(transforms).split_deterministic()
    store = PreprocessCache.from_option(cache)
    job = _Job(
        transforms=json.dumps(pipeline.to_config()),
        read_options=dict(read_options or {}),
        store=None if store is None else str(store.root),
        expect=expect,
        min_size=min_size,
    )
    return FirstPass(job, num_workers, stream), augmentation


def gather_loaded(
    source: str | Path,
    cases: Sequence[Case],
    outcomes: Sequence[CaseOutcome | None],
    first_pass: FirstPass,
    augment: ArrayAugment | None,
    stream: bool,
    allow_empty: bool,
) -> tuple[ImageSet | StreamedSet, LoadReport]:
    """The set of the kept cases once every case has its outcome, and the report."""
    report = _report(cases, outcomes)
    if not report.kept and not allow_empty:
        raise ImageReadError(source, "no readable images: " + "; ".join(report.lines()[:3]))
    kept = [cases[i] for i in report.kept]
    values = [outcomes[i].value for i in report.kept]  # type: ignore[union-attr]
    if stream:
        folder = PreprocessCache(first_pass.job.store)  # type: ignore[arg-type]
        return streamed_set(folder, values, kept, augment, first_pass.owner), report  # type: ignore[arg-type]
    results = [_in_memory(v, first_pass.job.store) for v in values]  # type: ignore[arg-type]
    return _image_set(source, results, kept, augment), report


def _report(cases: Sequence[Case], outcomes: Sequence[CaseOutcome | None]) -> LoadReport:
    """Skipped cases with their reasons, problems of the kept ones, positions kept."""
    report = LoadReport()
    hits = 0
    for index, (case, outcome) in enumerate(zip(cases, outcomes, strict=True)):
        assert outcome is not None  # every case has been prepared
        if outcome.error is not None:
            report.skipped.append((str(case.path), problem_text(outcome.error, str(case.path))))
            continue
        for problem in outcome.value.problems:  # type: ignore[union-attr]
            report.warnings.append((str(case.path), problem))
            log.info("%s: %s", case.path, problem)
        report.kept.append(index)
        hits += outcome.cached
    log.info("first pass: %d cases prepared, %d read from the cache", len(report.kept), hits)
    return report


def _in_memory(value: Preprocessed | CacheEntry, store: str | None) -> Preprocessed:
    """The arrays of a prepared case, read from the store when a worker put them there."""
    if isinstance(value, Preprocessed):
        return value
    folder = PreprocessCache(store)  # type: ignore[arg-type]
    return Preprocessed(
        array=folder.open_array(value.key, mmap=False),
        masks={name: folder.open_array(value.key, name, mmap=False) for name in value.masks},
        problems=value.problems,
        grid=value.grid,
        facts=value.facts,
    )


def streamed_set(
    store: PreprocessCache,
    entries: list[CacheEntry],
    cases: list[Case],
    augment: ArrayAugment | None,
    owner: Any,
    flags: dict[str, bool] | None = None,
) -> StreamedSet:
    """The kept cases as a set read from the cache when used (``flags``: its mask flags)."""
    return StreamedSet(
        store,
        entries,
        labels=np.array([c.label for c in cases], dtype=np.int64),
        ids=[str(c.path) for c in cases],
        groups=np.array([c.group or str(c.path) for c in cases]),
        augment=augment,
        owner=owner,
        **(flags or {}),
    )


def _image_set(
    source: str | Path,
    results: list[Preprocessed],
    cases: list[Case],
    augment: ArrayAugment | None,
) -> ImageSet:
    arrays = [r.array for r in results]
    check_one_grid(source, [a.shape for a in arrays], [c.path for c in cases])
    spatial = arrays[0].shape[1:] if arrays else ()
    return ImageSet(
        images=np.stack(arrays) if arrays else np.zeros((0, 1), np.float32),
        labels=np.array([c.label for c in cases], dtype=np.int64),
        ids=[str(c.path) for c in cases],
        masks=_stack_masks([r.masks.get(LESION_KEY) for r in results], spatial, fill=False),
        foreground=_stack_masks([r.masks.get(FOREGROUND_KEY) for r in results], spatial, fill=True),
        groups=np.array([c.group or str(c.path) for c in cases]),
        augment=augment,
        grids=[r.grid for r in results],
    )


def check_one_grid(
    source: str | Path, shapes: Sequence[tuple[int, ...]], paths: Sequence[str | Path]
) -> None:
    """Raise ConfigError naming the cases whose preprocessed shape differs from the most common."""
    if not shapes:
        return
    common = max(set(shapes), key=list(shapes).count)
    odd = [f"{Path(p).name} {s}" for p, s in zip(paths, shapes, strict=True) if s != common]
    if odd:
        raise ConfigError(
            f"{source}: images end up with different shapes (most are {common}; "
            f"{', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''}); add a 'resize' (or 'pad') "
            "step to data.transforms"
        )


def _stack_masks(
    masks: list[np.ndarray | None], spatial: tuple[int, ...], fill: bool
) -> np.ndarray | None:
    """Stack per-case masks; cases without one get all-``fill``; ``None`` if no case has one."""
    if all(m is None for m in masks):
        return None
    return np.stack([np.full(spatial, fill, bool) if m is None else m for m in masks])


PLAIN_TENSOR_TRANSFORMS = (RandFlip, RandAffine, RandIntensity)
"""Random transforms that read no MONAI metadata: drawn without it (the same arrays)."""


@contextmanager
def _monai_metadata_off() -> Iterator[None]:
    """Run MONAI transforms on plain tensors, without tracking metadata (restored after).

    A bare training array carries no metadata that anyone reads, and MONAI's tracking
    (a ``MetaTensor`` per operation, each transform's affine and history) cost about 60 % of
    each random draw of a head CT slice (``docs/compare.md``, cost); the arrays drawn are the
    same.
    """
    tracking = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(tracking)


class ArrayAugment:
    """Apply random transforms to a bare array ``(C, *spatial)`` (unit spacing)."""

    def __init__(self, transforms: Compose) -> None:
        self.transforms = transforms

    def set_random_state(self, seed: int | None) -> ArrayAugment:
        """Reseed the random transforms (see :meth:`Compose.set_random_state`)."""
        self.transforms.set_random_state(seed)
        return self

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """One random draw of the transforms applied to ``array``."""
        image = MedicalImage(array=array, spacing=(1.0,) * (array.ndim - 1))
        for transform in self.transforms:
            if isinstance(transform, PLAIN_TENSOR_TRANSFORMS):
                with _monai_metadata_off():
                    image = transform(image)
            else:  # e.g. pad, crop: geometry comes back through MONAI's metadata
                image = transform(image)
        return image.array
