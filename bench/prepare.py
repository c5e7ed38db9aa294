"""Throughput of read + validate + prepare over the real sample data, and our R-peak/beat step against HeartPy.

The R-peak comparison runs on the same normalized windows in the same process: ours is ``find_r_peaks`` plus
``extract_beats`` (and ``find_r_peaks`` alone); the baseline is what the reference does per record, a plain
``heartpy.process(lead II, 500.0)``, which yields only the peak list (its beat cutting would come on top).
``rpeak_ratio_vs_heartpy`` is HeartPy's time over ours: above 1, ours is faster. ``read_records_per_s`` is
`read_record` alone per source format: WFDB over the sample records, and each hospital format over its files in
``formats/`` (a format's first read also imports its library; the best of the repeats leaves that out). Each figure
is the best of several repeats, the usual way to read a timing on a shared machine. The last line is one JSON
object.

    python bench/prepare.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from ecgad.formats import sniff_format
from ecgad.io import read_record
from ecgad.preprocess import extract_beats, find_r_peaks, prepare
from ecgad.settings import sample_data_dir
from ecgad.types import LEADS, MODEL_FS, Prepared, Rejection
from ecgad.validate import validate
from _timing import best_seconds

with warnings.catch_warnings():  # heartpy imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import heartpy as hp

LEAD_II = LEADS.index("II")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    root = sample_data_dir()
    headers = sorted([*root.glob("ptbxl/records*/**/*.hea"), *root.glob("other_12lead/**/*.hea")])
    if not headers:
        raise SystemExit(f"no records under {root} (set ECGAD_SAMPLE_DATA)")

    prepared: dict[Path, Prepared] = {}
    rejected: dict[str, str] = {}

    def pipeline() -> None:
        for header in headers:
            try:
                prepared[header] = prepare(validate(read_record(header)))
            except Rejection as rejection:
                rejected[header.stem] = rejection.reason

    pipeline_s = best_seconds(pipeline, args.repeats)
    read_s = best_seconds(lambda: [read_record(h) for h in headers], args.repeats)
    read_rates = {"wfdb": round(len(headers) / read_s, 1), **_hospital_read_rates(root, args.repeats)}
    records = [read_record(h) for h in prepared]  # the ones that pass validate and prepare
    prepare_s = best_seconds(lambda: [prepare(r) for r in records], args.repeats)

    # prepare runs its chain in float64 and stores float32 windows; time both detectors on float64, as prepare does.
    windows = [w.signal.astype(np.float64) for p in prepared.values() for w in p.windows]

    def peaks_only() -> None:
        for window in windows:
            find_r_peaks(window[LEAD_II])

    def ours() -> None:
        for window in windows:
            extract_beats(window, find_r_peaks(window[LEAD_II]))

    def heartpy() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # HRV measures on short records warn; the reference ignores them
            for window in windows:
                try:
                    hp.process(window[LEAD_II], float(MODEL_FS))
                except hp.exceptions.BadSignalWarning:
                    pass

    peaks_s = best_seconds(peaks_only, args.repeats)
    ours_s = best_seconds(ours, args.repeats)
    heartpy_s = best_seconds(heartpy, args.repeats)

    n = len(headers)
    print(f"records: {n} ({len(windows)} windows of 10 s); rejected: {rejected or 'none'}")
    print(f"read + validate + prepare: {n / pipeline_s:8.1f} records/s ({1e3 * pipeline_s / n:.2f} ms/record)")
    print(f"  read only:               {n / read_s:8.1f} records/s")
    for fmt, rate in list(read_rates.items())[1:]:
        print(f"  read {fmt + ':':<20} {rate:8.1f} records/s")
    print(f"  prepare only:            {len(records) / prepare_s:8.1f} records/s "
          f"({1e3 * prepare_s / len(records):.2f} ms/record)")
    print(f"R-peaks, ours:             {1e3 * peaks_s / len(windows):8.3f} ms/window")
    print(f"R-peaks + beats, ours:     {1e3 * ours_s / len(windows):8.3f} ms/window")
    print(f"heartpy.process:           {1e3 * heartpy_s / len(windows):8.3f} ms/window")
    print(json.dumps({"records_per_s": round(n / pipeline_s, 1),
                      "prepare_records_per_s": round(len(records) / prepare_s, 1),
                      "rpeak_ms_per_window": round(1e3 * ours_s / len(windows), 3),
                      "heartpy_ms_per_window": round(1e3 * heartpy_s / len(windows), 3),
                      "rpeak_ratio_vs_heartpy": round(heartpy_s / ours_s, 2),
                      "rpeak_only_ratio_vs_heartpy": round(heartpy_s / peaks_s, 2),
                      "read_records_per_s": read_rates}))


def _hospital_read_rates(root: Path, repeats: int) -> dict[str, float]:
    """``read_record`` throughput (records/s) per hospital format over the files of ``root/formats``."""
    by_format: dict[str, list[Path]] = {}
    for path in sorted((root / "formats").rglob("*")):
        fmt = sniff_format(path) if path.is_file() else None
        if fmt:
            by_format.setdefault(fmt, []).append(path)
    return {fmt: round(len(paths) / best_seconds(lambda: [read_record(p) for p in paths], repeats), 1)
            for fmt, paths in by_format.items()}


if __name__ == "__main__":
    main()
