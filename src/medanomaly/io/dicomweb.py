"""A DICOMweb archive (a PACS such as Orthanc or dcm4chee) as a source of series and a store.

An archive is named by a URL ``dicomweb+http://HOST:PORT/PATH`` (or ``dicomweb+https://``)
whose PATH is the DICOMweb service root; the query string holds QIDO-RS filters, e.g.
``dicomweb+http://127.0.0.1:8042/dicom-web/?Modality=CT&StudyDate=20240101-20240131``.
Series are found with QIDO-RS, retrieved with WADO-RS and maps are sent back with STOW-RS,
all through ``dicomweb-client`` (Herrmann et al., the highdicom authors). The instances of a
job's series are listed once per study (:func:`with_instances`), and maps are stored several
per STOW-RS request (:func:`store_instances`).

Credentials are never taken from the URL or the command line: HTTP basic authentication
comes from ``MEDANOMALY_DICOMWEB_USER`` with ``MEDANOMALY_DICOMWEB_PASSWORD``, a bearer token
from ``MEDANOMALY_DICOMWEB_TOKEN``, otherwise from the user's netrc file (``~/.netrc`` or
``$NETRC``, read by ``requests``). They are sent in headers only, so that no URL, log line
or error message carries them. TLS certificates are verified (``MEDANOMALY_DICOMWEB_CA_BUNDLE``
or ``--ca-bundle`` names a CA bundle for a private CA).

A server that cannot be reached or answers 5xx is retried with exponential backoff
(:data:`RETRIES`, :data:`BACKOFF_SECONDS`) before the series is given up (and named by the
caller); a 401/403 raises :class:`ArchiveAccessError` at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from medanomaly.errors import ConfigError, ImageReadError

SCHEMES = ("dicomweb+http", "dicomweb+https")
USER_ENV = "MEDANOMALY_DICOMWEB_USER"
PASSWORD_ENV = "MEDANOMALY_DICOMWEB_PASSWORD"
TOKEN_ENV = "MEDANOMALY_DICOMWEB_TOKEN"
CA_BUNDLE_ENV = "MEDANOMALY_DICOMWEB_CA_BUNDLE"
RETRIES = 3
"""Retries of a request that fails to connect or gets a 5xx answer."""
BACKOFF_SECONDS = 0.5
"""urllib3's backoff factor: the second retry waits twice it, each later one doubles that."""
TIMEOUT_SECONDS = 60.0
"""Connect and read timeout of one request."""
STOW_MAX_INSTANCES = 32
"""Most instances in one STOW-RS request (a screen's chunk of maps, 16, goes in one)."""
STOW_MAX_BYTES = 64 << 20
"""Most bytes of DICOM files in one STOW-RS request (a larger file goes alone)."""
LISTING_THREADS = 4
"""Studies listed at a time (QIDO-RS) before a job retrieves their series."""
_MIN_CHUNK = 1 << 20
_MULTIPART_SLACK = 1 << 16
"""Room for the multipart boundaries and headers around a batch's files."""
_RETRY_STATUS = (500, 502, 503, 504)
_ACCESS_STATUS = (401, 403)
_AS_STORED = (("application/dicom", "*"),)
"""Retrieve instances in the transfer syntax they are stored in (JPEG 2000 and others are
decoded by the DICOM reader; an archive need not be able to transcode them)."""


class ArchiveAccessError(ConfigError):
    """The archive refused the credentials (401/403), or none could be sent."""


class ArchiveUnreachableError(ConfigError):
    """The archive could not be reached, or kept failing, after the retries.

    Attributes:
        status: The HTTP status of the archive's last answer (``None``: no answer).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def is_dicomweb_url(source: Any) -> bool:
    """Whether ``source`` is a ``dicomweb+http(s)://`` URL."""
    return isinstance(source, str) and source.split("://", 1)[0].lower() in SCHEMES


@dataclass(frozen=True)
class Archive:
    """Where an archive is and how to reach it (no credentials: they are read when connecting).

    Attributes:
        url: The service root as an ``http(s)://`` URL, without a query string.
        filters: QIDO-RS search filters (attribute keyword or tag -> value).
        ca_bundle: A CA bundle that verifies the server's certificate (``None``: the
            system's; ``MEDANOMALY_DICOMWEB_CA_BUNDLE`` when set).
    """

    url: str
    filters: tuple[tuple[str, str], ...] = ()
    ca_bundle: str | None = None

    @classmethod
    def parse(cls, source: str, ca_bundle: str | Path | None = None) -> Archive:
        """Read a ``dicomweb+http(s)://HOST:PORT/PATH?FILTERS`` URL.

        Raises:
            ConfigError: Not such a URL, or it holds credentials.
        """
        if not is_dicomweb_url(source):
            raise ConfigError(f"not a DICOMweb URL (dicomweb+http(s)://): {source}")
        parts = urlsplit(source[len("dicomweb+") :])
        if parts.username or parts.password:
            raise ConfigError(
                f"a DICOMweb URL must not hold credentials ({parts.hostname}); put them in "
                f"netrc or in {USER_ENV}/{PASSWORD_ENV} or {TOKEN_ENV}"
            )
        if not parts.hostname:
            raise ConfigError(f"a DICOMweb URL needs a host: {source}")
        path = parts.path.rstrip("/") or ""
        url = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        bundle = ca_bundle or os.environ.get(CA_BUNDLE_ENV) or None
        return cls(url, tuple(parse_qsl(parts.query)), None if bundle is None else str(bundle))

    def __str__(self) -> str:
        return f"dicomweb+{self.url}/"

    def with_filters(self, filters: Sequence[tuple[str, str]]) -> Archive:
        """The same archive with other QIDO-RS filters."""
        return Archive(self.url, tuple(filters), self.ca_bundle)


@dataclass(frozen=True)
class RemoteSeries:
    """One series of an archive; its text (the case id) is its Series Instance UID.

    Attributes:
        archive: Where it is.
        study_uid: Its Study Instance UID.
        series_uid: Its Series Instance UID.
        facts: What QIDO-RS said of it (modality, description, instance count).
        instances: Its SOP Instance UIDs, once listed with its study (:func:`with_instances`);
            ``None``: not listed yet.
    """

    archive: Archive
    study_uid: str
    series_uid: str
    facts: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    instances: tuple[str, ...] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return self.series_uid


def _session(archive: Archive) -> requests.Session:
    """A session with the credentials, certificate checks and retries for ``archive``."""
    session = requests.Session()
    token = os.environ.get(TOKEN_ENV)
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user is not None and password is not None:
        session.auth = (user, password)
    # else: requests reads ~/.netrc (or $NETRC) for the host
    session.verify = archive.ca_bundle or True
    retry = Retry(
        total=RETRIES,
        connect=RETRIES,
        read=RETRIES,
        status=RETRIES,
        backoff_factor=BACKOFF_SECONDS,
        status_forcelist=_RETRY_STATUS,
        allowed_methods=None,  # STOW-RS too: stored UIDs are deterministic, so it is idempotent
        raise_on_status=False,
    )
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _client(archive: Archive) -> Any:
    """A ``DICOMwebClient`` for the archive."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(archive.url, session=_session(archive))
    client.set_http_retry_params(retry=False)  # the session retries (and on connect errors)
    return client


@contextmanager
def _requests_to(archive: Archive, what: str) -> Iterator[None]:
    """Turn the HTTP errors of a block into :class:`ArchiveAccessError` / unreachable errors.

    The messages name the archive's service root and the HTTP status only: never a header.
    """
    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in _ACCESS_STATUS:
            raise ArchiveAccessError(
                f"{archive}: the archive refused access (HTTP {status}) while {what}; check "
                f"{USER_ENV}/{PASSWORD_ENV}, {TOKEN_ENV} or the netrc entry for its host"
            ) from None
        raise ArchiveUnreachableError(
            f"{archive}: HTTP {status} while {what} (after {RETRIES} retries)", status
        ) from None
    except requests.exceptions.SSLError:
        raise ArchiveUnreachableError(
            f"{archive}: the server's TLS certificate could not be verified while {what} "
            f"(give a CA bundle with --ca-bundle or {CA_BUNDLE_ENV})"
        ) from None
    except requests.RequestException as exc:
        raise ArchiveUnreachableError(
            f"{archive}: cannot reach the archive while {what} after {RETRIES} retries "
            f"({type(exc).__name__})"
        ) from None


def _value(record: dict[str, Any], tag: str) -> str:
    """The first value of a DICOM JSON attribute, as text ('' when absent)."""
    values = record.get(tag, {}).get("Value") or [""]
    return str(values[0])


def find_series(archive: Archive) -> list[RemoteSeries]:
    """The series that match the archive's QIDO-RS filters, in study then series UID order.

    Raises:
        ArchiveAccessError: The archive refused the credentials.
        ArchiveUnreachableError: It could not be reached.
    """
    client = _client(archive)
    with _requests_to(archive, "searching for series"):
        records = client.search_for_series(search_filters=dict(archive.filters), get_remaining=True)
    series = {
        (_value(r, "0020000D"), _value(r, "0020000E")): (
            ("Modality", _value(r, "00080060")),
            ("SeriesDescription", _value(r, "0008103E")),
            ("NumberOfSeriesRelatedInstances", _value(r, "00201209")),
        )
        for r in records
    }
    return [
        RemoteSeries(archive, study, uid, facts) for (study, uid), facts in sorted(series.items())
    ]


def list_instances(archive: Archive, study_uid: str) -> dict[str, tuple[str, ...]]:
    """The SOP Instance UIDs of every series of a study, sorted (one QIDO-RS request).

    Raises:
        ArchiveAccessError: The archive refused the credentials.
        ArchiveUnreachableError: It could not be reached.
    """
    client = _client(archive)
    with _requests_to(archive, f"listing the instances of study {study_uid}"):
        records = client.search_for_instances(
            study_uid, fields=["SeriesInstanceUID", "SOPInstanceUID"], get_remaining=True
        )
    found: dict[str, list[str]] = {}
    for record in records:
        found.setdefault(_value(record, "0020000E"), []).append(_value(record, "00080018"))
    return {series: tuple(sorted(sops)) for series, sops in found.items()}


def with_instances(series: Sequence[RemoteSeries]) -> list[RemoteSeries]:
    """The same series, each with its SOP Instance UIDs: one QIDO-RS request per study.

    The studies are listed :data:`LISTING_THREADS` at a time. A study that cannot be listed
    leaves its series as they were: :func:`series_digest` then asks for each one and names
    it in the error, as a series on its own is named.
    """
    studies = sorted({(s.archive, s.study_uid) for s in series if s.instances is None}, key=str)

    def listed(key: tuple[Archive, str]) -> dict[str, tuple[str, ...]] | None:
        try:
            return list_instances(*key)
        except ConfigError:
            return None

    with ThreadPoolExecutor(LISTING_THREADS, thread_name_prefix="qido") as pool:
        found = dict(zip(studies, pool.map(listed, studies), strict=True))
    out = []
    for one in series:
        study = found.get((one.archive, one.study_uid))
        if study is not None:
            one = replace(one, instances=study.get(one.series_uid, ()))
        out.append(one)
    return out


def series_digest(series: RemoteSeries) -> str:
    """SHA-256 of what a series holds: its UIDs and the SOP Instance UIDs of its instances.

    A DICOM instance never changes under its SOP Instance UID, so the digest stands for the
    series' content. The instances listed with the study (:func:`with_instances`) are used
    when there; otherwise one QIDO-RS request lists the series' own (nothing retrieved).

    Raises:
        ImageReadError: The archive could not be asked (named by the series).
    """
    instances = series.instances
    if instances is None:
        client = _client(series.archive)
        try:
            with _requests_to(series.archive, f"listing the instances of series {series}"):
                records = client.search_for_instances(
                    series.study_uid,
                    series.series_uid,
                    fields=["SOPInstanceUID"],
                    get_remaining=True,
                )
        except ArchiveUnreachableError as exc:
            raise ImageReadError(str(series), str(exc).split(": ", 1)[-1]) from None
        instances = tuple(sorted(_value(r, "00080018") for r in records))
    text = "\n".join(["dicomweb", series.study_uid, series.series_uid, *instances])
    return hashlib.sha256(text.encode()).hexdigest()


def fetch_series(series: RemoteSeries, folder: str | Path) -> Path:
    """Retrieve a series with WADO-RS into ``folder`` (one ``.dcm`` file per instance).

    A folder already there is complete and kept as it is: a new one is filled in a temporary
    folder beside it and renamed into place, so that a run stopped midway leaves nothing
    half-done.

    Returns:
        ``folder``.

    Raises:
        ImageReadError: The series could not be retrieved (named by its UID).
    """
    folder = Path(folder)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        client = _client(series.archive)
        with _requests_to(series.archive, f"retrieving series {series}"):
            instances = client.iter_series(
                series.study_uid, series.series_uid, media_types=_AS_STORED
            )
            for number, dataset in enumerate(instances):
                dataset.save_as(partial / f"{number:05d}.dcm", enforce_file_format=True)
        try:
            partial.rename(folder)
        except OSError:  # another process put the same series there first
            if not folder.is_dir():
                raise
    except ArchiveUnreachableError as exc:
        raise ImageReadError(str(series), str(exc).split(": ", 1)[-1]) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


@dataclass
class StoreReport:
    """What a STOW-RS job did: the files stored and, for each one not stored, why.

    Attributes:
        stored: The files the archive accepted.
        failed: ``(file, problem)`` of each file not stored (the problem names the archive
            and the HTTP status or error class only, never a credential).
        requests: STOW-RS requests sent (batches, and single instances after a failed batch).
    """

    stored: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    requests: int = 0


def stow_batches(
    files: Sequence[str | Path],
    max_instances: int = STOW_MAX_INSTANCES,
    max_bytes: int = STOW_MAX_BYTES,
) -> list[list[Path]]:
    """Cut ``files`` (in order) into the batches of one STOW-RS request each.

    A batch holds at most ``max_instances`` files and ``max_bytes`` bytes, whichever limit
    comes first; a file larger than ``max_bytes`` goes alone.
    """
    batches: list[list[Path]] = []
    size = 0
    for file in (Path(f) for f in files):
        length = file.stat().st_size
        full = batches and (len(batches[-1]) >= max_instances or size + length > max_bytes)
        if not batches or full:
            batches.append([])
            size = 0
        batches[-1].append(file)
        size += length
    return batches


def store_instances(
    archive: Archive,
    files: Sequence[str | Path],
    max_instances: int = STOW_MAX_INSTANCES,
    max_bytes: int = STOW_MAX_BYTES,
) -> StoreReport:
    """Send DICOM files to the archive with STOW-RS, several instances per request.

    The files go in batches (:func:`stow_batches`). An instance the archive refuses within
    a stored batch (its ``FailedSOPSequence``) is named with the failure reason. A batch the
    archive refuses as a whole (an HTTP 4xx other than 401/403, e.g. 413 for a body too
    large) is sent again one instance per request, so that the others are stored and each
    refused file is named with its own problem. A batch that cannot reach the archive
    (connection errors or 5xx after :data:`RETRIES`) is not sent again: each of its files is
    named with that problem. So each file is stored once per call; its UIDs decide whether
    the archive adds it or replaces an earlier copy.

    Returns:
        The :class:`StoreReport`.

    Raises:
        ArchiveAccessError: The archive refused the credentials (HTTP 401/403).
    """
    import pydicom

    client = _client(archive)
    # bodies up to the batch limit are sent whole (with a length), not in chunks: the
    # session's retries can then send them again
    client.set_chunk_size(max(max_bytes, _MIN_CHUNK) + _MULTIPART_SLACK)
    report = StoreReport()
    for batch in stow_batches(files, max_instances, max_bytes):
        datasets = [pydicom.dcmread(file) for file in batch]
        problem, refused = _stow(client, archive, datasets, _names(batch))
        report.requests += 1
        if problem is None:  # stored, but for the instances the archive names as refused
            for file, dataset in zip(batch, datasets, strict=True):
                reason = refused.get(str(dataset.get("SOPInstanceUID", "")))
                if reason is None:
                    report.stored.append(file)
                else:
                    report.failed.append((file, _refusal(archive, file, reason)))
        elif problem.unreachable:
            report.failed += [(file, problem.text) for file in batch]
        else:  # the whole request was refused: find out which instances it was
            _store_one_by_one(client, archive, batch, datasets, report)
    return report


@dataclass(frozen=True)
class _StowProblem:
    text: str
    unreachable: bool


def _names(files: Sequence[Path]) -> str:
    shown = ", ".join(f.name for f in files[:3])
    return shown + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _refusal(archive: Archive, file: Path, reason: str) -> str:
    return f"{archive}: the archive refused {file.name} (STOW-RS failure reason {reason})"


def _stow(
    client: Any, archive: Archive, datasets: Sequence[Any], what: str
) -> tuple[_StowProblem | None, dict[str, str]]:
    """One STOW-RS request: ``(problem or None, refused SOP Instance UID -> reason)``."""
    try:
        with _requests_to(archive, f"storing {what}"):
            answer = client.store_instances(list(datasets))
    except ArchiveAccessError:
        raise
    except ArchiveUnreachableError as error:
        unreachable = error.status is None or error.status >= 500
        return _StowProblem(str(error), unreachable), {}
    refused = {
        str(item.get("ReferencedSOPInstanceUID", "")): str(item.get("FailureReason", "?"))
        for item in getattr(answer, "FailedSOPSequence", None) or []
    }
    return None, refused


def _store_one_by_one(
    client: Any,
    archive: Archive,
    batch: Sequence[Path],
    datasets: Sequence[Any],
    report: StoreReport,
) -> None:
    """After a refused request: each instance in a request of its own."""
    for file, dataset in zip(batch, datasets, strict=True):
        problem, refused = _stow(client, archive, [dataset], file.name)
        report.requests += 1
        if problem is not None:
            report.failed.append((file, problem.text))
        elif refused:
            report.failed.append((file, _refusal(archive, file, next(iter(refused.values())))))
        else:
            report.stored.append(file)


def check_access(archive: Archive) -> None:
    """Ask the archive for one study, so that refused credentials are found before any work.

    Raises:
        ArchiveAccessError: The archive refused the credentials.
        ArchiveUnreachableError: It could not be reached.
    """
    client = _client(archive)
    with _requests_to(archive, "checking access"):
        client.search_for_studies(limit=1)
