"""Ray job: score an ECG archive (folder tree, PTB-XL root or manifest) into Parquet, resumably.

    python -m jobs.score_archive --input PATH --checkpoint DIR --out DIR [--maps] [--batch-size B]
        [--num-scorers N] [--use-gpu] [--mode full|fast]
    ray job submit --working-dir . -- python -m jobs.score_archive ...      # the same, on a cluster

For millions of records, give a manifest (a CSV or Parquet table with a ``path`` column, optionally ``record_id``):
it is streamed in record batches by one task, with no directory reads at all. A folder tree works at that scale too
(every folder read once, by Ray tasks; the driver never holds the listing: ``ecgad.ray.listing``), but reading
directories costs more than reading a table, above all on network file systems.

Rerunning the same command after a kill resumes where the last committed chunk left off (see ``ecgad.ray.archive``).
Every path may be a URI (``s3://bucket/archive``; a custom S3 endpoint comes from ``AWS_ENDPOINT_URL``): records
are read from object storage and each chunk is committed as one upload, which appears whole or not at all, so
resuming holds there too. On a cluster of several nodes a local path must be shared storage, checked from every
node before anything runs.
The last line on stdout is the run's summary as one JSON object (also written to ``OUT/summary.json``).
Exit codes: 0 every input has its output row (rejected records included); 1 the job failed or the output is
incomplete (rerun to resume); 2 bad usage, a bad checkpoint, or an output directory written with other settings.
Records are read within the input limits of this process's environment (``ECGAD_MAX_SECONDS``, ... : README, "Input
limits"); a record whose preparation kills its worker becomes an ``error`` row with reason ``worker_died``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ecgad.archive import DEFAULT_CHUNK_SIZE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.score_archive", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True,
                        help="a folder tree of ECG files (WFDB .hea+.dat/.mat, CSV, NPY, NPZ), a PTB-XL root, or a "
                             "manifest (.csv/.parquet with a 'path' column, optionally 'record_id')")
    parser.add_argument("--checkpoint", required=True, help="an ecgad checkpoint directory (RUNDIR/best is resolved once, at start, to its version)")
    parser.add_argument("--out", required=True, help="output directory (rerun with the same one to resume)")
    parser.add_argument("--maps", action="store_true", help="also write anomaly maps (OUT/maps, zstd Parquet)")
    parser.add_argument("--diagnose", action="store_true",
                        help="with a checkpoint from jobs.finetune: add each record's labels and probabilities")
    parser.add_argument("--batch-size", type=int, default=32, help="records per model forward pass")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="records per committed output file: the unit of resumption")
    parser.add_argument("--num-scorers", type=int, default=1, help="most model actors (the pool grows to it)")
    parser.add_argument("--min-scorers", type=int, default=1, help="fewest model actors")
    parser.add_argument("--scorer-cpus", type=float, default=1.0, help="CPUs Ray reserves per model actor")
    parser.add_argument("--scorer-threads", type=int, default=None,
                        help="torch threads per model actor on CPU (default: --scorer-cpus, rounded down, at least "
                             "1). Without a GPU, one single-thread actor per core scores fastest, with the actors "
                             "reserving together all but one CPU for preparation: on N cores, --num-scorers N "
                             "--scorer-cpus (N-1)/N")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per model actor")
    parser.add_argument("--mode", choices=["full", "fast"], default="full",
                        help="full: the published protocol's score; fast: the documented cheaper one")
    parser.add_argument("--fs", type=float, default=None,
                        help="sampling rate (Hz) of files that carry none (NPY, CSV without '# fs=')")
    parser.add_argument("--fail-after-chunks", type=int, default=None,
                        help="testing: fail the job after this many chunks are committed (to test resuming)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import ray

    from ecgad.archive import ArchiveError
    from ecgad.checkpoint import CheckpointError
    from ecgad.inputs import InputError
    from ecgad.ray.archive import ArchiveJobFailed, score_archive
    from ecgad.ray.paths import SharedPathError

    if not ray.is_initialized():
        ray.init()  # under `ray job submit` (RAY_ADDRESS set) this joins the cluster; otherwise starts a local one
    try:
        summary = score_archive(args.input, args.checkpoint, args.out, maps=args.maps, batch_size=args.batch_size,
                                chunk_size=args.chunk_size, num_scorers=args.num_scorers,
                                min_scorers=args.min_scorers, use_gpu=args.use_gpu, mode=args.mode,
                                scorer_cpus=args.scorer_cpus, scorer_threads=args.scorer_threads, default_fs=args.fs,
                                fail_after_chunks=args.fail_after_chunks, diagnose=args.diagnose)
    except (ArchiveError, CheckpointError, InputError, SharedPathError) as err:
        print(f"score_archive: error: {err}", file=sys.stderr)
        return 2
    except ArchiveJobFailed as err:
        print(f"score_archive: failed (rerun the same command to resume): {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
