"""A DICOMweb archive (a PACS such as Orthanc or dcm4chee) as a source of series and a store.

An archive is named by a URL ``dicomweb+http://HOST:PORT/PATH`` (or ``dicomweb+https://``)
whose PATH is the DICOMweb service root; the query string holds QIDO-RS filters, e.g.
``dicomweb+http://127.0.0.1:8042/dicom-web/?Modality=CT&StudyDate=20240101-20240131``.
Series are found with QIDO-RS, retrieved with WADO-RS and maps are sent back with STOW-RS,
all through ``dicomweb-client`` (Herrmann et al., the highdicom authors).

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
from contextlib import contextmanager
from dataclasses import dataclass, field
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
_RETRY_STATUS = (500, 502, 503, 504)
_ACCESS_STATUS = (401, 403)
_AS_STORED = (("application/dicom", "*"),)
"""Retrieve instances in the transfer syntax they are stored in (JPEG 2000 and others are
decoded by the DICOM reader; an archive need not be able to transcode them)."""


class ArchiveAccessError(ConfigError):
    """The archive refused the credentials (401/403), or none could be sent."""


class ArchiveUnreachableError(ConfigError):
    """The archive could not be reached, or kept failing, after the retries."""


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
    """

    archive: Archive
    study_uid: str
    series_uid: str
    facts: tuple[tuple[str, str], ...] = field(default=(), compare=False)

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
            f"{archive}: HTTP {status} while {what} (after {RETRIES} retries)"
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


def series_digest(series: RemoteSeries) -> str:
    """SHA-256 of what a series holds: its UIDs and the SOP Instance UIDs of its instances.

    A DICOM instance never changes under its SOP Instance UID, so the digest stands for the
    series' content (one QIDO-RS request, nothing retrieved).

    Raises:
        ImageReadError: The archive could not be asked (named by the series).
    """
    client = _client(series.archive)
    try:
        with _requests_to(series.archive, f"listing the instances of series {series}"):
            records = client.search_for_instances(
                series.study_uid, series.series_uid, fields=["SOPInstanceUID"], get_remaining=True
            )
    except ArchiveUnreachableError as exc:
        raise ImageReadError(str(series), str(exc).split(": ", 1)[-1]) from None
    instances = sorted(_value(r, "00080018") for r in records)
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


def store_instances(archive: Archive, files: Sequence[str | Path]) -> int:
    """Send DICOM files to the archive with STOW-RS (one request per file).

    Returns:
        How many were stored.

    Raises:
        ArchiveAccessError: The archive refused the credentials.
        ArchiveUnreachableError: It could not be reached or refused an instance.
    """
    import pydicom

    client = _client(archive)
    for file in files:
        dataset = pydicom.dcmread(file)
        with _requests_to(archive, f"storing {Path(file).name}"):
            client.store_instances([dataset])
    return len(files)


def check_access(archive: Archive) -> None:
    """Ask the archive for one study, so that refused credentials are found before any work.

    Raises:
        ArchiveAccessError: The archive refused the credentials.
        ArchiveUnreachableError: It could not be reached.
    """
    client = _client(archive)
    with _requests_to(archive, "checking access"):
        client.search_for_studies(limit=1)
