"""DICOMweb: score, screen and evaluate straight from a real Orthanc archive, store maps back.

One Orthanc server (with its DICOMweb plugin, a user and a password) serves the module. It
holds ``../shared/data/dicom_head_ct``, ``dicom_mr_oblique`` and ``totalseg_ct`` (loaded over
its REST API), and three small synthetic CT series that the scoring tests use (seconds each).
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import yaml
from conftest import real_data  # noqa: I001
from orthanc import PASSWORD, USER, OrthancServer, skip_without_orthanc

import medanomaly.data.loading as loading
import medanomaly.io.dicomweb as dicomweb
from medanomaly import get_model
from medanomaly.cli import main
from medanomaly.data.listing import list_cases, read_manifest
from medanomaly.data.phantoms import make_phantoms, write_dicom_series
from medanomaly.detectors.base import CONFIG_FILE
from medanomaly.errors import ConfigError
from medanomaly.io.dicomweb import Archive, RemoteSeries

SYNTH_STUDY = "1.2.826.0.1.3680043.10.543.1"
SYNTH_SERIES = [f"{SYNTH_STUDY}.{k}" for k in (1, 2, 3)]
SYNTH_PATIENT = "SYNTH"
MR_SERIES = "0.0.0.0.3.8811.2.20010413115754.12432"
MAP_SERIES_NUMBER = 9901
DATA_CFG = {
    "transforms": [
        {"hu_window": {"center": 0, "width": 2000}},
        {"resize": {"shape": [16, 16, 16]}},
    ]
}


def _with_uids(file: Path, folder: Path) -> bytes:
    """A file's bytes, its missing Study/Series/SOP Instance UIDs filled in (archives need them).

    ``totalseg_ct``'s slices were anonymised without them: the study and series UIDs are
    derived from the folder, the SOP Instance UID comes from the File Meta.
    """
    dataset = pydicom.dcmread(file, force=True)
    if dataset.get("SOPInstanceUID") and dataset.get("SeriesInstanceUID"):
        return file.read_bytes()
    seed = folder.name.encode()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[seed.decode(), "study"])
    dataset.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[seed.decode(), "series"])
    dataset.FrameOfReferenceUID = pydicom.uid.generate_uid(entropy_srcs=[seed.decode(), "frame"])
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def _upload(server: OrthancServer, folder: Path, fix_uids: bool = False) -> int:
    """POST the DICOM files directly in ``folder``; return how many Orthanc stored."""
    stored = 0
    with requests.Session() as session:
        session.auth = (USER, PASSWORD)
        for file in sorted(p for p in folder.iterdir() if p.is_file()):
            if file.suffix in (".txt", ".gz"):
                continue
            body = _with_uids(file, folder) if fix_uids else file.read_bytes()
            stored += session.post(server.rest + "/instances", data=body, timeout=60).ok
    return stored


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc on a free loopback port, loaded with the real series and three synthetic ones."""
    plugin = skip_without_orthanc()
    head = real_data("dicom_head_ct")
    mr = real_data("dicom_mr_oblique")
    body = real_data("totalseg_ct", "example_ct_dicom")
    root = tmp_path_factory.mktemp("orthanc")
    server = OrthancServer(root, plugin).start()
    try:
        assert _upload(server, head) == 123
        assert _upload(server, mr) == 20
        assert _upload(server, body, fix_uids=True) == 20
        volumes = make_phantoms(3, 0, (8, 24, 24), seed=5).images[:, 0]
        for uid, volume in zip(SYNTH_SERIES, volumes, strict=True):
            files = write_dicom_series(
                root / "synthetic" / uid,
                2000 * volume - 1000,
                series_uid=uid,
                study_uid=SYNTH_STUDY,
                patient_id=SYNTH_PATIENT,
            )
            assert _upload(server, files[0].parent) == len(files)
        yield server
    finally:
        server.stop()


@pytest.fixture
def credentials(monkeypatch):
    """The server's user and password in the environment, nothing in netrc."""
    monkeypatch.setenv(dicomweb.USER_ENV, USER)
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, PASSWORD)
    monkeypatch.delenv(dicomweb.TOKEN_ENV, raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setattr(dicomweb, "BACKOFF_SECONDS", 0.01)
    monkeypatch.setattr(dicomweb, "RETRIES", 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A fitted no-model intensity baseline on 16³ CT phantoms; its cases go through a cache."""
    return _fit_run(tmp_path_factory.mktemp("dicomweb-run"), hu_range=2000)


def _fit_run(root: Path, hu_range: float) -> Path:
    """An intensity baseline fitted on phantoms spanning ``hu_range`` HU from -1000."""
    detector = get_model("intensity", spatial_dims=3, engine={"val_fraction": 0.5, "seed": 0})
    data = {**DATA_CFG, "cache": str(root / "cache")}
    folder = root / "run"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(yaml.safe_dump({**detector.config(), "data": data}))
    phantoms = make_phantoms(16, 0, (16, 16, 16), seed=1)
    phantoms.images = hu_range * phantoms.images - 1000
    detector.fit(phantoms, run_dir=folder)
    return folder


def _synthetic(server: OrthancServer) -> str:
    return f"{server.dicomweb}?PatientID={SYNTH_PATIENT}&Modality=CT"


def _map_series(server: OrthancServer) -> dict[str, list[str]]:
    """Source series UID -> SOP Instance UIDs of the maps in the archive that reference it."""
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    found: dict[str, list[str]] = {}
    qido = f"{server.rest}/dicom-web/series?SeriesNumber={MAP_SERIES_NUMBER}"
    for record in session.get(qido, timeout=30).json():
        study, series = record["0020000D"]["Value"][0], record["0020000E"]["Value"][0]
        url = f"{server.rest}/dicom-web/studies/{study}/series/{series}/metadata"
        for instance in session.get(url, timeout=30).json():
            referenced = instance["00081115"]["Value"][0]["0020000E"]["Value"][0]
            found.setdefault(referenced, []).append(instance["00080018"]["Value"][0])
    return found


def test_a_dicomweb_url_names_the_service_root_and_its_filters() -> None:
    archive = Archive.parse("dicomweb+https://pacs.example.org:8443/dicom-web/?Modality=CT")
    assert archive.url == "https://pacs.example.org:8443/dicom-web"
    assert archive.filters == (("Modality", "CT"),)
    with pytest.raises(ConfigError, match="netrc") as error:
        Archive.parse("dicomweb+http://bob:hunter2@pacs:8042/dicom-web/")
    assert "hunter2" not in str(error.value)


def test_query_filters_select_the_expected_series(orthanc, credentials) -> None:
    def series(query: str) -> set[str]:
        return {str(case.path) for case in list_cases(orthanc.dicomweb + query)}

    mr = series("?Modality=MR")
    assert mr == {MR_SERIES}
    ct = series(f"?Modality=CT&PatientID={SYNTH_PATIENT}")
    assert ct == set(SYNTH_SERIES)
    assert len(series("?Modality=CT")) >= 5  # head CT, body CT and the synthetic ones
    assert series(f"?SeriesInstanceUID={SYNTH_SERIES[1]}") == {SYNTH_SERIES[1]}
    # the study may also hold maps (OT) and key objects (KO) that other tests stored
    assert series(f"?StudyInstanceUID={SYNTH_STUDY}&Modality=CT") == set(SYNTH_SERIES)
    case = list_cases(orthanc.dicomweb + "?Modality=MR")[0]
    assert isinstance(case.path, RemoteSeries) and case.path.study_uid


def test_real_series_are_retrieved_and_read_like_files(orthanc, credentials, tmp_path) -> None:
    from medanomaly.io import read_image

    real = [
        case.path
        for query in ("?Modality=MR", "?Modality=CT")
        for case in list_cases(orthanc.dicomweb + query)
        if not case.path.study_uid.startswith(SYNTH_STUDY.rsplit(".", 1)[0])
    ]
    shapes = {}
    for series in real:
        folder = dicomweb.fetch_series(series, tmp_path / str(series))
        shapes[series.facts[0][1]] = shapes.get(series.facts[0][1], []) + [
            read_image(folder).spatial_shape
        ]
    # head CT (123 slices of 512²), body CT (20 JPEG 2000 slices), oblique brain MR
    assert sorted(shapes["CT"]) == [(512, 512, 20), (512, 512, 123)], shapes
    assert shapes["MR"] == [(256, 256, 20)]


def test_manifest_rows_give_their_label_to_the_series_they_find(orthanc, tmp_path) -> None:
    manifest = tmp_path / "labels.csv"
    rows = [
        f"{orthanc.dicomweb}?SeriesInstanceUID={uid},{label}"
        for uid, label in zip(SYNTH_SERIES, ("normal", "normal", "abnormal"), strict=True)
    ]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(dicomweb.USER_ENV, USER)
        patch.setenv(dicomweb.PASSWORD_ENV, PASSWORD)
        cases = read_manifest(manifest)
    assert [str(c.path) for c in cases] == SYNTH_SERIES
    assert [c.label for c in cases] == [0, 0, 1]


def test_maps_stored_in_the_archive_reference_their_series_once_however_often(
    orthanc, credentials, run, tmp_path, monkeypatch, capsys
) -> None:
    retrieved: list[str] = []
    fetch = loading.fetch_series

    def counted(series, folder):
        if not Path(folder).is_dir():
            retrieved.append(str(series))
        return fetch(series, folder)

    monkeypatch.setattr(loading, "fetch_series", counted)
    data = _synthetic(orthanc)
    after_first = []
    for attempt in range(2):
        out = tmp_path / f"scores{attempt}.csv"
        code = main(
            [
                "score",
                "--run",
                str(run),
                "--data",
                data,
                "--out",
                str(out),
                "--dicom",
                "--num-workers",
                "0",
            ]
        )
        assert code == 0, capsys.readouterr().err
        with open(out, newline="") as handle:
            assert sorted(row["id"] for row in csv.DictReader(handle)) == SYNTH_SERIES
        if attempt == 0:
            after_first = list(retrieved)
    # the second run read every series from the cache (another test may have filled it first)
    assert retrieved == after_first and len(set(retrieved)) == len(retrieved)
    # this run's maps (another test's run may have stored maps of the same series)
    ours = {
        pydicom.dcmread(file).SOPInstanceUID
        for folder in ("scores0_maps", "scores1_maps")
        for file in (tmp_path / folder).glob("*_map.dcm")
    }
    assert len(ours) == len(SYNTH_SERIES), "a rerun made maps with other UIDs"
    stored = {uid: [s for s in sops if s in ours] for uid, sops in _map_series(orthanc).items()}
    assert {uid: len(stored.get(uid, [])) for uid in SYNTH_SERIES} == dict.fromkeys(SYNTH_SERIES, 1)
    pm = pydicom.dcmread(next((tmp_path / "scores0_maps").glob("*_map.dcm")))
    referenced = pm.ReferencedSeriesSequence[0].SeriesInstanceUID
    source = pydicom.dcmread(orthanc.folder / "synthetic" / referenced / "slice_00000.dcm")
    assert pm.StudyInstanceUID == SYNTH_STUDY
    assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert pm.SOPInstanceUID in {uid for uids in stored.values() for uid in uids}


def test_wrong_credentials_are_one_line_and_exit_code_2(
    orthanc, credentials, run, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, "not-the-password")
    out = tmp_path / "scores.csv"
    code = main(["score", "--run", str(run), "--data", _synthetic(orthanc), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "HTTP 401" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert "not-the-password" not in err and not out.exists()


def test_a_server_killed_midway_then_the_same_command_again_scores_and_stores_each_once(
    orthanc, credentials, run, tmp_path, monkeypatch, capsys, caplog
) -> None:
    retrieved: list[str] = []
    fetch = loading.fetch_series

    def kill_after_the_first(series, folder):
        fresh = not Path(folder).is_dir()
        result = fetch(series, folder)  # the series were listed before: retrievals fail
        if fresh:
            retrieved.append(str(series))
        if len(retrieved) == 1:
            orthanc.stop()
        return result

    monkeypatch.setattr(loading, "fetch_series", kill_after_the_first)
    study = f"1.2.826.0.1.3680043.10.543.{9}"
    volumes = make_phantoms(3, 0, (6, 20, 20), seed=11).images[:, 0]
    uids = [f"{study}.{k}" for k in range(3)]
    for uid, volume in zip(uids, volumes, strict=True):
        files = write_dicom_series(
            tmp_path / "new" / uid,
            2000 * volume - 1000,
            series_uid=uid,
            study_uid=study,
            patient_id="KILLED",
        )
        assert _upload(orthanc, files[0].parent) == len(files)
    data = f"{orthanc.dicomweb}?PatientID=KILLED"
    command = [
        "-v",
        "screen",
        "--run",
        str(run),
        "--data",
        data,
        "--out",
        str(tmp_path / "out"),
        "--dicom",
        "--num-workers",
        "0",
    ]
    try:
        assert main(command) == 0
        first = capsys.readouterr()
        assert "skipped 2 unreadable case(s)" in first.err
        assert all(f"{uid}: cannot reach the archive" in first.err for uid in uids[1:])
        assert "not stored in the archive" in first.err
        orthanc.start()
        assert main(command) == 0
        second = capsys.readouterr()
    finally:
        if orthanc.process is None:
            orthanc.start()
    assert sorted(retrieved) == sorted(uids)  # each series retrieved once over both runs
    with open(tmp_path / "out" / "screen.csv", newline="") as handle:
        assert sorted(row["id"] for row in csv.DictReader(handle)) == sorted(uids)
    stored = _map_series(orthanc)
    assert {uid: len(stored.get(uid, [])) for uid in uids} == dict.fromkeys(uids, 1)
    # the password (and its basic-auth header form) is nowhere: outputs, cache, logs
    secret = PASSWORD.encode()
    header = base64.b64encode(f"{USER}:{PASSWORD}".encode())
    texts = [first.out, first.err, second.out, second.err, caplog.text]
    assert not any(PASSWORD in text for text in texts)
    for file in [*tmp_path.rglob("*"), *(run.parent / "cache").rglob("*.json")]:
        if file.is_file():
            content = file.read_bytes()
            assert secret not in content and header not in content, file
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert not summary["skipped"]


def test_screen_stores_a_key_object_selection_of_the_flagged_series(
    orthanc, credentials, tmp_path, capsys
) -> None:
    out = tmp_path / "screen"
    dim = _fit_run(tmp_path, hu_range=200)  # trained on darker scans: every series is flagged
    command = ["screen", "--run", str(dim), "--data", _synthetic(orthanc), "--out", str(out),
               "--dicom", "--num-workers", "0"]  # fmt: skip
    for _ in range(2):  # a rerun replaces the document
        assert main(command) == 0, capsys.readouterr().err
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    qido = f"{orthanc.rest}/dicom-web/studies/{SYNTH_STUDY}/series?SeriesNumber=9902"
    documents = session.get(qido, timeout=30).json()
    assert len(documents) == 1
    series = documents[0]["0020000E"]["Value"][0]
    url = f"{orthanc.rest}/dicom-web/studies/{SYNTH_STUDY}/series/{series}/instances"
    (instance,) = session.get(url, timeout=30).json()
    sop = instance["00080018"]["Value"][0]
    body = session.get(
        f"{url}/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=30,
    )
    assert body.ok
    local = pydicom.dcmread(out / "maps" / f"{SYNTH_STUDY}_flagged.dcm")
    assert local.SOPInstanceUID == sop
    assert local.Modality == "KO"
    referenced = {
        item.SeriesInstanceUID
        for study in local.CurrentRequestedProcedureEvidenceSequence
        for item in study.ReferencedSeriesSequence
    }
    assert referenced == set(SYNTH_SERIES)
    text = local.to_json()  # the description lists every flagged series
    assert all(f"{uid} score" in text for uid in SYNTH_SERIES)


def test_tls_is_verified_unless_a_ca_bundle_is_named_and_a_token_goes_in_a_header(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.delenv(dicomweb.CA_BUNDLE_ENV, raising=False)
    monkeypatch.setenv(dicomweb.TOKEN_ENV, "tok-123")
    session = dicomweb._session(Archive.parse("dicomweb+https://pacs.example.org/dicom-web/"))
    assert session.verify is True
    assert session.headers["Authorization"] == "Bearer tok-123" and session.auth is None
    bundle = tmp_path / "ca.pem"
    monkeypatch.setenv(dicomweb.CA_BUNDLE_ENV, str(bundle))
    session = dicomweb._session(Archive.parse("dicomweb+https://pacs.example.org/dicom-web/"))
    assert session.verify == str(bundle)


# -- throughput: batched STOW-RS, one listing per study, retrieval one series ahead ----------
def _requests_seen(monkeypatch) -> list[tuple[str, str, str]]:
    """``(method, path, thread)`` of every request the archive code sends from now on.

    A response hook on the real sessions (the requests go to the real Orthanc). A search's
    later pages (``offset=``, which ``dicomweb-client`` asks for) are not counted again.
    """
    import threading
    from urllib.parse import parse_qs, urlsplit

    seen: list[tuple[str, str, str]] = []
    make = dicomweb._session

    def hooked(archive):
        session = make(archive)

        def record(response, *args, **kwargs):
            request = response.request
            url = urlsplit(request.url)
            if parse_qs(url.query).get("offset", ["0"]) == ["0"]:  # not a search's next page
                seen.append((request.method, url.path, threading.current_thread().name))

        session.hooks["response"].append(record)
        return session

    monkeypatch.setattr(dicomweb, "_session", hooked)
    return seen


def _new_study(server: OrthancServer, folder: Path, study: str, patient: str) -> list[str]:
    """Upload three small synthetic CT series of one new study; their UIDs."""
    volumes = make_phantoms(3, 0, (6, 20, 20), seed=13).images[:, 0]
    uids = [f"{study}.{k}" for k in range(3)]
    for uid, volume in zip(uids, volumes, strict=True):
        files = write_dicom_series(
            folder / uid, 2000 * volume - 1000, series_uid=uid, study_uid=study, patient_id=patient
        )
        assert _upload(server, files[0].parent) == len(files)
    return uids


def test_batches_are_cut_by_instance_count_and_by_bytes(tmp_path) -> None:
    files = []
    for name, size in [("a", 10), ("b", 10), ("c", 30), ("d", 100), ("e", 5)]:
        files.append(tmp_path / name)
        files[-1].write_bytes(b"x" * size)
    names = [[f.name for f in batch] for batch in dicomweb.stow_batches(files, 2, 50)]
    assert names == [["a", "b"], ["c"], ["d"], ["e"]]  # d (100 bytes) goes alone
    assert [len(b) for b in dicomweb.stow_batches(files, 32, 10_000)] == [5]


def test_a_job_stores_its_maps_in_one_request_and_a_rerun_does_not_add_any(
    orthanc, credentials, tmp_path, monkeypatch, capsys
) -> None:
    uids = _new_study(orthanc, tmp_path / "new", f"{SYNTH_STUDY}5.1", "BATCHED")
    run = _fit_run(tmp_path, hu_range=2000)  # its own cache: every series is retrieved
    seen = _requests_seen(monkeypatch)
    data = f"{orthanc.dicomweb}?PatientID=BATCHED"
    for attempt in range(2):
        out = tmp_path / f"scores{attempt}.csv"
        command = ["score", "--run", str(run), "--data", data, "--out", str(out), "--dicom",
                   "--num-workers", "0"]  # fmt: skip
        assert main(command) == 0, capsys.readouterr().err
        stow = [path for method, path, _ in seen if method == "POST"]
        assert stow == ["/dicom-web/studies"], seen  # the three maps in one request
        seen.clear()
    stored = _map_series(orthanc)
    assert {uid: len(stored.get(uid, [])) for uid in uids} == dict.fromkeys(uids, 1)


def test_a_refused_batch_is_sent_again_one_by_one_and_names_the_refused_file(
    orthanc, credentials, tmp_path
) -> None:
    folder = tmp_path / "maps"
    files = write_dicom_series(
        folder,
        np.zeros((3, 8, 8)),
        series_uid=f"{SYNTH_STUDY}6.1",
        study_uid=f"{SYNTH_STUDY}6",
        patient_id="REFUSED",
    )
    broken = pydicom.dcmread(files[1])
    del broken.SOPInstanceUID  # no archive can file it
    broken.save_as(files[1])
    archive = Archive.parse(orthanc.dicomweb)
    report = dicomweb.store_instances(archive, files)
    assert report.stored == [files[0], files[2]]
    assert [file for file, _ in report.failed] == [files[1]]
    assert report.requests == 1 + 3  # the batch, then one request per instance
    assert PASSWORD not in report.failed[0][1]


def test_instances_are_listed_once_per_study_and_retrieved_one_series_ahead(
    orthanc, credentials, tmp_path, monkeypatch, capsys
) -> None:
    import threading

    study = f"{SYNTH_STUDY}7.1"
    uids = _new_study(orthanc, tmp_path / "new", study, "AHEAD")
    run = _fit_run(tmp_path, hu_range=2000)
    seen = _requests_seen(monkeypatch)
    retrieved: dict[str, str] = {}
    fetch = loading.fetch_series

    def on_thread(series, folder):
        if not Path(folder).is_dir():  # not yet retrieved
            retrieved[str(series)] = threading.current_thread().name
        return fetch(series, folder)

    monkeypatch.setattr(loading, "fetch_series", on_thread)
    out = tmp_path / "scores.csv"
    command = ["score", "--run", str(run), "--data", f"{orthanc.dicomweb}?PatientID=AHEAD",
               "--out", str(out), "--num-workers", "0"]  # fmt: skip
    assert main(command) == 0, capsys.readouterr().err
    listings = [path for method, path, _ in seen if method == "GET" and path.endswith("/instances")]
    assert listings == [f"/dicom-web/studies/{study}/instances"]  # not one per series
    assert all(retrieved[uid].startswith("prefetch") for uid in uids), retrieved
    with open(out, newline="") as handle:
        assert [row["id"] for row in csv.DictReader(handle)] == uids  # the input order


def test_a_series_that_fails_to_arrive_ahead_is_named_and_skipped(
    orthanc, credentials, tmp_path, monkeypatch, capsys
) -> None:
    uids = _new_study(orthanc, tmp_path / "new", f"{SYNTH_STUDY}8.1", "VANISHED")
    run = _fit_run(tmp_path, hu_range=2000)
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    fetch = loading.fetch_series

    def delete_the_second_first(series, folder):
        # the second series leaves the archive after it was listed, before it is retrieved
        _delete_series(session, orthanc.rest, uids[1])
        return fetch(series, folder)

    monkeypatch.setattr(loading, "fetch_series", delete_the_second_first)
    out = tmp_path / "screen"
    command = ["screen", "--run", str(run), "--data", f"{orthanc.dicomweb}?PatientID=VANISHED",
               "--out", str(out), "--num-workers", "0"]  # fmt: skip
    assert main(command) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable case(s)" in err
    assert f"{uids[1]}: HTTP 404 while retrieving series {uids[1]}" in err, err
    with open(out / "screen.csv", newline="") as handle:
        assert sorted(row["id"] for row in csv.DictReader(handle)) == [uids[0], uids[2]]
    summary = json.loads((out / "summary.json").read_text())
    assert [item["case"] for item in summary["skipped"]] == [uids[1]]


# -- overlap: the screen scores a chunk while the next series are retrieved and prepared ------
def _new_series(server: OrthancServer, folder: Path, study: str, patient: str, n: int) -> list[str]:
    """Upload ``n`` tiny synthetic CT series of one new study; their UIDs in listing order."""
    volumes = make_phantoms(n, 0, (4, 16, 16), seed=17).images[:, 0]
    uids = [f"{study}.{k}" for k in range(n)]
    for uid, volume in zip(uids, volumes, strict=True):
        files = write_dicom_series(
            folder / uid, 2000 * volume - 1000, series_uid=uid, study_uid=study, patient_id=patient
        )
        assert _upload(server, files[0].parent) == len(files)
    return uids


def _record_events(monkeypatch) -> list[tuple[str, str]]:
    """``(event, series UID)`` in the order they happen, from every thread: ``retrieve`` when
    a series' retrieval starts (the real one, into the cache), ``scoring`` / ``scored`` around
    the real detector's ``detect`` of each case."""
    events: list[tuple[str, str]] = []
    fetch = loading.fetch_series

    def retrieve(series, folder):
        if not Path(folder).is_dir():  # the first retrieval, not a look into the cache
            events.append(("retrieve", str(series)))
        return fetch(series, folder)

    detector_class = type(get_model("intensity", spatial_dims=3))
    detect = detector_class.detect

    def detect_recorded(self, x):
        events.extend(("scoring", case) for case in x.ids)
        result = detect(self, x)
        events.extend(("scored", case) for case in x.ids)
        return result

    monkeypatch.setattr(loading, "fetch_series", retrieve)
    monkeypatch.setattr(detector_class, "detect", detect_recorded)
    return events


def test_the_screen_scores_a_case_while_the_next_series_are_retrieved(
    orthanc, credentials, tmp_path, monkeypatch, capsys
) -> None:
    uids = _new_series(orthanc, tmp_path / "new", f"{SYNTH_STUDY}9.1", "OVERLAP", 4)
    run = _fit_run(tmp_path, hu_range=2000)  # its own cache: every series is retrieved
    events = _record_events(monkeypatch)
    out = tmp_path / "screen"
    command = ["screen", "--run", str(run), "--data", f"{orthanc.dicomweb}?PatientID=OVERLAP",
               "--out", str(out), "--batch", "1", "--num-workers", "0"]  # fmt: skip
    assert main(command) == 0, capsys.readouterr().err
    order = {event: position for position, event in enumerate(events)}
    assert len(order) == len(events) == 3 * len(uids), events  # each event once
    # scoring began before the first pass ended: the last series came after case 0 was scored
    assert order["scoring", uids[0]] < order["scored", uids[0]] < order["retrieve", uids[3]]
    for k in range(len(uids) - 1):  # case k + 1's series was on its way while case k was scored
        assert order["retrieve", uids[k + 1]] < order["scored", uids[k]], events
    # ... and the first pass ran at most one case (a chunk) ahead of the scoring
    assert order["scored", uids[0]] < order["retrieve", uids[3]]
    assert order["scored", uids[1]] < order["scoring", uids[2]]
    assert [uid for event, uid in events if event == "scored"] == uids  # the input order
    with open(out / "screen.csv", newline="") as handle:
        assert sorted(row["id"] for row in csv.DictReader(handle)) == uids


def _screen_outputs(out: Path, maps: Path) -> dict[str, object]:
    """What a screen wrote that must not depend on when its cases were prepared."""
    import nibabel as nib

    with open(out / "screen.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((out / "summary.json").read_text())
    arrays = {
        str(file.relative_to(maps)): np.asarray(nib.load(file).dataobj)
        for file in sorted(maps.rglob("*.nii.gz"))
    }
    return {"rows": rows, "skipped": summary["skipped"], "arrays": arrays}


def test_a_screen_overlapped_with_its_first_pass_writes_what_one_after_it_writes(
    orthanc, credentials, tmp_path, monkeypatch, capsys
) -> None:
    uids = _new_series(orthanc, tmp_path / "new", f"{SYNTH_STUDY}9.2", "SAME", 5)
    run = _fit_run(tmp_path, hu_range=2000)
    data = f"{orthanc.dicomweb}?PatientID=SAME"
    found = {}
    # --strict prepares every case before the first is scored (the code before the overlap);
    # without it, 2 worker processes prepare while this process scores chunks of 2 (2 + 2 + 1)
    for name, extra in [("after", ["--strict", "--num-workers", "0"]),
                        ("overlapped", ["--num-workers", "2"])]:  # fmt: skip
        out, maps = tmp_path / name, tmp_path / f"{name}_maps"
        command = ["screen", "--run", str(run), "--data", data, "--out", str(out),
                   "--maps", str(maps), "--batch", "2", *extra]  # fmt: skip
        assert main(command) == 0, capsys.readouterr().err
        found[name] = _screen_outputs(out, maps)
    after, overlapped = found["after"], found["overlapped"]
    assert sorted(row["id"] for row in overlapped["rows"]) == uids
    assert overlapped["rows"] == after["rows"]  # scores, p-values, facts: the same text
    assert overlapped["skipped"] == after["skipped"] == []
    assert overlapped["arrays"].keys() == after["arrays"].keys() and after["arrays"]
    for name, array in after["arrays"].items():
        np.testing.assert_array_equal(overlapped["arrays"][name], array)


def test_an_interrupted_screen_stops_its_first_pass_and_the_retrieval_ahead(
    orthanc, credentials, tmp_path, monkeypatch
) -> None:
    import threading

    from medanomaly.data.ahead import prepare_ahead

    uids = _new_series(orthanc, tmp_path / "new", f"{SYNTH_STUDY}9.3", "STOPPED", 4)
    events = _record_events(monkeypatch)
    data = f"{orthanc.dicomweb}?PatientID=STOPPED"
    options = {**DATA_CFG, "cache": str(tmp_path / "cache"), "num_workers": 0}
    taken = []
    cases = list_cases(data)
    # Ctrl-C while the first chunk is scored
    with pytest.raises(KeyboardInterrupt), prepare_ahead(cases, data, **options) as preparing:
        for index in preparing.chunks(1):
            taken.append(preparing.subset(index).ids)
            raise KeyboardInterrupt
    assert taken == [[uids[0]]]
    alive = [t.name for t in threading.enumerate() if t.name.startswith(("first-pass", "prefetch"))]
    assert alive == []  # the first pass and its retrieval thread have ended
    retrieved = [uid for event, uid in events if event == "retrieve"]
    assert uids[3] not in retrieved  # it stopped one case ahead, never reaching the last


def test_a_series_lost_while_the_screen_runs_is_skipped_and_named_in_input_order(
    orthanc, credentials, tmp_path, monkeypatch, capsys
) -> None:
    uids = _new_series(orthanc, tmp_path / "new", f"{SYNTH_STUDY}9.4", "LOST", 5)
    run = _fit_run(tmp_path, hu_range=2000)
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    events = _record_events(monkeypatch)
    detector_class = type(get_model("intensity", spatial_dims=3))
    detect = detector_class.detect  # the recording one

    def delete_the_fourth_while_the_first_is_scored(self, x):
        if x.ids == [uids[0]]:  # listed, not yet retrieved: the first pass is one case ahead
            _delete_series(session, orthanc.rest, uids[3])
        return detect(self, x)

    monkeypatch.setattr(detector_class, "detect", delete_the_fourth_while_the_first_is_scored)
    out = tmp_path / "screen"
    command = ["screen", "--run", str(run), "--data", f"{orthanc.dicomweb}?PatientID=LOST",
               "--out", str(out), "--batch", "1", "--num-workers", "0"]  # fmt: skip
    assert main(command) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable case(s)" in err
    assert f"{uids[3]}: HTTP 404 while retrieving series {uids[3]}" in err, err
    assert PASSWORD not in err
    kept = [uids[0], uids[1], uids[2], uids[4]]
    with open(out / "screen.csv", newline="") as handle:
        assert sorted(row["id"] for row in csv.DictReader(handle)) == kept
    summary = json.loads((out / "summary.json").read_text())
    assert [item["case"] for item in summary["skipped"]] == [uids[3]]
    assert [uid for event, uid in events if event == "scored"] == kept


def _delete_series(session: requests.Session, rest: str, uid: str) -> None:
    """Remove the series ``uid`` from the Orthanc at ``rest`` (its REST API)."""
    found = session.post(
        f"{rest}/tools/find",
        json={"Level": "Series", "Query": {"SeriesInstanceUID": uid}},
        timeout=30,
    ).json()
    for orthanc_id in found:
        session.delete(f"{rest}/series/{orthanc_id}", timeout=30)
