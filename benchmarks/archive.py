"""Archive: screen synthetic CT series straight from a local Orthanc, against local files.

For each N of ``--sizes`` (default 50 and 200) the benchmark writes N synthetic CT series
(``--slices`` axial slices of ``--matrix``² int16 pixels, HU phantoms) as DICOM files, loads
them into a running Orthanc over its REST API (``POST /instances``), and measures, each step
in a process of its own (wall time, peak RSS of the process tree sampled every 0.1 s):

* ``retrieve_1_worker`` / ``retrieve_2_workers``: QIDO-RS listing, then WADO-RS retrieval of
  every series into an empty folder (:func:`medanomaly.io.dicomweb.fetch_series`) in 1 and in
  2 worker processes: series/s;
* ``screen_archive``: ``medanomaly screen --data dicomweb+http://...?PatientID=BENCH-N
  --dicom --store`` with an empty cache: QIDO-RS, WADO-RS by the first pass's workers, the
  screen, and every Parametric Map sent back by STOW-RS;
* ``screen_local``: the same screen (``--maps --dicom``, nothing stored) of the same series
  as local folders, with an empty cache.

The run is the no-model ``intensity`` baseline (HU window, resized to 32³), fitted on 12 of
the series: the screen's cost is reading, preprocessing and writing, which is what the
archive changes. Without ``--orthanc`` the benchmark starts an Orthanc of its own (``Orthanc``
with its DICOMweb plugin, ``apt-get install orthanc orthanc-dicomweb``) on a free loopback
port, with its storage under ``OUT/orthanc`` and a user and password of its own, and stops it
at the end. With ``--orthanc`` it uses a running one (started as ``docs/archive.md`` does),
whose credentials are in ``MEDANOMALY_DICOMWEB_USER`` / ``MEDANOMALY_DICOMWEB_PASSWORD``:

    .venv/bin/python benchmarks/archive.py --out OUT [--orthanc http://127.0.0.1:8042] \
        [--sizes 50 200] [--slices 64] [--matrix 128] [--batch 16]
    -> OUT/results.json (rows: archive_N and local_N), OUT/results.md

Each N's series are deleted from Orthanc (``DELETE /patients/...``) and from disk after it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import results_row  # noqa: E402  (benchmarks/common.py)
from scale import run_step  # noqa: E402  (benchmarks/scale.py: RSS of a process tree)

DEFAULT_SIZES = (50, 200)
STUDY_ROOT = "1.2.826.0.1.3680043.10.543.77"
FIT_SERIES = 12
TRANSFORMS = [{"hu_window": {"center": 40, "width": 400}}, {"resize": {"shape": [32, 32, 32]}}]
TARGET_RATIO = 0.7


def series_uid(n: int, index: int) -> str:
    return f"{STUDY_ROOT}.{n}.{index}"


def write_series(folder: Path, n: int, slices: int, matrix: int) -> list[Path]:
    """N synthetic CT series (one study each), one folder per series."""
    from medanomaly.data.phantoms import make_phantoms, write_dicom_series

    folders = []
    for index in range(n):
        volume = make_phantoms(1, 0, (slices, matrix, matrix), seed=1000 + index).images[0, 0]
        uid = series_uid(n, index)
        target = folder / uid
        write_dicom_series(
            target,
            2000.0 * volume - 1000.0,
            series_uid=uid,
            study_uid=f"{uid}.0",
            patient_id=f"BENCH-{n}",
        )
        folders.append(target)
    return folders


class LocalOrthanc:
    """An Orthanc of the benchmark's own on a free loopback port (stopped on exit).

    Its credentials go into the environment (``MEDANOMALY_DICOMWEB_USER`` / ``_PASSWORD``)
    for the steps' processes; they are random and die with it.
    """

    def __init__(self, folder: Path) -> None:
        import secrets
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.folder = folder
        self.user, self.password = "bench", secrets.token_urlsafe(16)
        plugins = [
            p
            for folder in ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
            for p in sorted(Path(folder).glob("libOrthancDicomWeb.so*"))
        ]
        if shutil.which("Orthanc") is None or not plugins:
            sys.exit("Orthanc with its DICOMweb plugin is not installed (apt-get install "
                     "orthanc orthanc-dicomweb); or name a running one with --orthanc")  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medanomaly-benchmark",
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [str(plugins[0])],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "OverwriteInstances": True,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.process: subprocess.Popen | None = None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalOrthanc:
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 (lives with the process)
        self.process = subprocess.Popen(
            ["Orthanc", str(self.folder / "orthanc.json")], stdout=log, stderr=log
        )
        os.environ["MEDANOMALY_DICOMWEB_USER"] = self.user
        os.environ["MEDANOMALY_DICOMWEB_PASSWORD"] = self.password
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.rest}/system", auth=(self.user, self.password), timeout=5)
                (self.folder / "orthanc.json").unlink()  # read at start; it holds the password
                return self
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within 60 s: see {self.folder}/orthanc.log")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
        shutil.rmtree(self.folder / "storage", ignore_errors=True)


def rest_session() -> requests.Session:
    session = requests.Session()
    session.auth = (
        os.environ["MEDANOMALY_DICOMWEB_USER"],
        os.environ["MEDANOMALY_DICOMWEB_PASSWORD"],
    )
    return session


def upload(rest: str, folders: list[Path]) -> float:
    """POST every file to Orthanc; return the seconds it took."""
    start = time.perf_counter()
    with rest_session() as session:
        for folder in folders:
            for file in sorted(folder.iterdir()):
                session.post(
                    f"{rest}/instances", data=file.read_bytes(), timeout=60
                ).raise_for_status()
    return time.perf_counter() - start


def delete_patient(rest: str, patient: str) -> None:
    with rest_session() as session:
        found = session.post(
            f"{rest}/tools/find",
            json={"Level": "Patient", "Query": {"PatientID": patient}},
            timeout=60,
        ).json()
        for orthanc_id in found:
            session.delete(f"{rest}/patients/{orthanc_id}", timeout=60)


def fit_intensity_run(out: Path, folders: list[Path]) -> Path:
    """The no-model intensity baseline fitted on a few of the series (``OUT/run``)."""
    from medanomaly.data.listing import Case
    from medanomaly.data.loading import load_cases
    from medanomaly.jobs.fit import fit_run

    train, _ = load_cases([Case(f) for f in folders[:FIT_SERIES]], out, transforms=TRANSFORMS)
    config = {"model": {"name": "intensity", "spatial_dims": 3}, "data": {"transforms": TRANSFORMS}}
    return fit_run(config, train, out / "run").out


# -- the steps (each in its own process) ------------------------------------------------------
def retrieve_step(data: str, folder: str, workers: int) -> dict[str, Any]:
    """QIDO-RS listing, then WADO-RS retrieval of every series by ``workers`` processes.

    The processes are started (and have imported the readers, as the first pass's workers
    do) before the clock starts: the rate is the retrieval's, not the start-up's.
    """
    from concurrent.futures import ProcessPoolExecutor

    from medanomaly.data.listing import list_cases
    from medanomaly.data.workers import worker_context

    with ProcessPoolExecutor(workers, mp_context=worker_context()) as pool:
        list(pool.map(_warm, range(workers)))
        start = time.perf_counter()
        series = [case.path for case in list_cases(data)]
        tasks = [(s, str(Path(folder) / str(s))) for s in series]
        list(pool.map(_fetch, tasks))
        seconds = time.perf_counter() - start
    return {"series": len(series), "seconds": seconds, "series_per_s": len(series) / seconds}


def _warm(_: int) -> None:
    import medanomaly.io.dicomweb  # noqa: F401


def _fetch(task: tuple[Any, str]) -> str:
    from medanomaly.io.dicomweb import fetch_series

    return str(fetch_series(*task))


def screen_command(
    run: Path, data: str, out: Path, extra: list[str], batch: int | None = None
) -> list[str]:
    chunks = [] if batch is None else ["--batch", str(batch)]
    return [
        sys.executable, "-m", "medanomaly.cli", "screen", "--run", str(run), "--data", data,
        "--out", str(out), "--num-workers", "2", *chunks, *extra,
    ]  # fmt: skip


def measure(args: argparse.Namespace, n: int, out: Path, logs: Path) -> dict[str, Any]:
    work = out / f"n{n}"
    folders = write_series(work / "series", n, args.slices, args.matrix)
    uploaded = upload(args.orthanc, folders)
    run = None if args.retrieve_only else fit_intensity_run(work, folders)
    archive = f"dicomweb+{args.orthanc}/dicom-web/?PatientID=BENCH-{n}"
    steps: dict[str, dict[str, Any]] = {}
    for workers in (1, 2):
        target = work / f"retrieved{workers}"
        command = [
            sys.executable,
            __file__,
            "--step",
            "retrieve",
            archive,
            str(target),
            str(workers),
        ]
        steps[f"retrieve_{workers}"] = run_step(command, logs / f"n{n}_retrieve{workers}.log")
        shutil.rmtree(target, ignore_errors=True)
    env_cache = os.environ.get("MEDANOMALY_CACHE")
    screens = (
        ()
        if args.retrieve_only
        else (
            ("screen_archive", archive, ["--dicom", "--store", archive.split("?")[0]]),
            ("screen_local", str(work / "series"), ["--maps", str(work / "local_maps"), "--dicom"]),
        )
    )
    for name, data, extra in screens:
        os.environ["MEDANOMALY_CACHE"] = str(work / f"cache_{name}")
        command = screen_command(run, data, work / name, extra, args.batch)
        steps[name] = run_step(command, logs / f"n{n}_{name}.log")
        steps[name]["series_per_s"] = n / steps[name]["wall_seconds"]
    if env_cache is None:
        os.environ.pop("MEDANOMALY_CACHE", None)
    delete_patient(args.orthanc, f"BENCH-{n}")
    shutil.rmtree(work, ignore_errors=True)
    return {"n": n, "upload_seconds": uploaded, "steps": steps}


def write_results(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    table: dict[str, Any] = {}
    for row in rows:
        steps, n = row["steps"], row["n"]
        archive, local = steps["screen_archive"], steps["screen_local"]
        table[f"archive_{n}"] = results_row(
            {
                "n": n,
                "retrieve_1_worker_series_per_s": steps["retrieve_1"]["series_per_s"],
                "retrieve_2_workers_series_per_s": steps["retrieve_2"]["series_per_s"],
                "screen_series_per_s": archive["series_per_s"],
                "peak_rss_mb": archive["peak_rss_mb"],
                "ratio_to_local": archive["series_per_s"] / local["series_per_s"],
            },
            baseline=True,  # the run is the no-model intensity baseline
        )
        table[f"local_{n}"] = results_row(
            {
                "n": n,
                "screen_series_per_s": local["series_per_s"],
                "peak_rss_mb": local["peak_rss_mb"],
            },
            baseline=True,
        )
    ratios = [table[f"archive_{r['n']}"]["ratio_to_local"] for r in rows]
    rss = [table[f"archive_{r['n']}"]["peak_rss_mb"] for r in rows]
    found = {
        "min_ratio_to_local": min(ratios),
        "ratio_target": TARGET_RATIO,
        "ratio_met": min(ratios) >= TARGET_RATIO,
        "rss_growth_smallest_to_largest_n": rss[-1] / rss[0],
    }
    settings = {
        "slices": args.slices,
        "matrix": args.matrix,
        "sizes": args.sizes,
        "batch": args.batch or 16,
    }
    results = {"rows": table, "targets": found, "settings": settings, "raw": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# Archive benchmark ({args.slices} slices of {args.matrix}², intensity baseline, "
        f"screened {args.batch or 16} at a time)",
        "",
        "| N | retrieve 1 worker | retrieve 2 workers | screen from archive | screen from files "
        "| ratio | peak RSS archive | peak RSS files |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        a, loc = table[f"archive_{row['n']}"], table[f"local_{row['n']}"]
        lines.append(
            f"| {row['n']} | {a['retrieve_1_worker_series_per_s']:.2f}/s "
            f"| {a['retrieve_2_workers_series_per_s']:.2f}/s | {a['screen_series_per_s']:.2f}/s "
            f"| {loc['screen_series_per_s']:.2f}/s | {a['ratio_to_local']:.2f} "
            f"| {a['peak_rss_mb']:.0f} MB | {loc['peak_rss_mb']:.0f} MB |"
        )
    lines += [
        "",
        f"Archive over files, lowest: {found['min_ratio_to_local']:.2f} (target >= {TARGET_RATIO}: "
        f"{'met' if found['ratio_met'] else 'missed'}); peak RSS of the archive screen grows "
        f"x{found['rss_growth_smallest_to_largest_n']:.2f} from the smallest to the largest N.",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--step":
        data, folder, workers = sys.argv[3], sys.argv[4], int(sys.argv[5])
        print(json.dumps(retrieve_step(data, folder, workers)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--orthanc",
        help="a running Orthanc's REST root, http://HOST:PORT (default: start one on loopback)",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument(
        "--retrieve-only", action="store_true", help="measure retrieval only (no screens)"
    )
    parser.add_argument(
        "--batch", type=int, help="the screens' --batch: cases scored at a time (default: 16)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if args.orthanc is None:
        with LocalOrthanc(out / "orthanc") as server:
            args.orthanc = server.rest
            run_sizes(args, out, logs)
    else:
        run_sizes(args, out, logs)


def run_sizes(args: argparse.Namespace, out: Path, logs: Path) -> None:
    """Measure every N of ``--sizes``, writing the results after each."""
    rows = []
    for n in args.sizes:
        rows.append(measure(args, n, out, logs))
        steps = rows[-1]["steps"]
        if args.retrieve_only:
            print(
                f"N={n}: retrieve {steps['retrieve_1']['series_per_s']:.2f}/s (1 worker), "
                f"{steps['retrieve_2']['series_per_s']:.2f}/s (2 workers)",
                flush=True,
            )
            (out / "retrieve.json").write_text(json.dumps(rows, indent=2))
            continue
        print(
            f"N={n}: retrieve {steps['retrieve_1']['series_per_s']:.2f}/s (1 worker), "
            f"{steps['retrieve_2']['series_per_s']:.2f}/s (2); screen archive "
            f"{steps['screen_archive']['series_per_s']:.2f}/s, files "
            f"{steps['screen_local']['series_per_s']:.2f}/s; peak RSS "
            f"{steps['screen_archive']['peak_rss_mb']:.0f} / "
            f"{steps['screen_local']['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        write_results(out, rows, args)  # after each N, so that a long run leaves its results
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
