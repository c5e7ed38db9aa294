"""Ray job: prepare every record of a data root into Parquet training shards (layout and dtype: `ecgad.shards`).

    python -m jobs.preprocess --data ROOT --out SHARDS [--force]
    ray job submit --working-dir . -- python -m jobs.preprocess --data /mnt/efs/ptbxl --out /mnt/efs/shards

ROOT is a PTB-XL root (real, or synthetic from ``ecgad.synth_dataset``; folds and labels come from its index) or any
folder of ECG files (no folds or labels: preparable, not trainable). Records are listed on the driver, then read,
validated and prepared in parallel Ray tasks (`ecgad.ray.data.prepare_shard_rows`) and written by Ray Data; Ray Data's
progress bars show the stages. Rejected records are rows too, and are listed with their reasons in
``SHARDS/rejections.parquet``. Every record of a PTB-XL root keeps its ``scp_codes``, the root's
``scp_statements.csv`` is copied along and the manifest lists each label level's classes (``labels``), so
``jobs.finetune`` can derive the diagnosis targets (`ecgad.labels`) from the shards alone.

ROOT and SHARDS may be URIs (``s3://bucket/ptbxl``; `ecgad.storage`). On a cluster of several nodes, a local path must
be shared storage mounted at the same path on every node; it is checked from every node before anything runs.

Idempotent: the shards are built in a hidden sibling directory and swapped in whole when complete, with a manifest
holding a fingerprint of the inputs and settings. Object storage has no directory rename: there the old manifest
and shards are deleted first and the manifest is written last, so a reader that finds one finds complete shards.
Rerunning on an up-to-date output does nothing; rerunning after a kill or after the inputs changed rebuilds. One
job per output directory at a time.

The last line on stdout is the manifest as one JSON object. Exit codes: 0 done (or already up to date), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ecgad.atomic import replace_directory, temporary_directory, write_bytes, write_json, write_parquet
from ecgad.config import PrepConfig
from ecgad.inputs import list_inputs
from ecgad.log import get_logger
from ecgad.labels import STATEMENTS_FILE
from ecgad.shards import FORMAT_VERSION, STORAGE_DTYPE, ShardLayout, input_fingerprint, label_summary, summarize
from ecgad.storage import delete_contents, for_ray, is_dir, is_file, is_uri, join, location, read_bytes

log = get_logger("jobs.preprocess")  # not __name__, which is "__main__" under `python -m`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a PTB-XL root (real or synthetic) or a folder of ECG files")
    parser.add_argument("--out", required=True, help="the shards directory to create or bring up to date")
    parser.add_argument("--force", action="store_true", help="rebuild even when the shards are up to date")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root, out = location(args.data), location(args.out)
    if not is_dir(root):
        print(f"preprocess: error: {root} is not a directory", file=sys.stderr)
        return 2
    if str(out) == str(root) or str(out).startswith(str(join(str(root), ""))):
        print(f"preprocess: error: --out {out} lies inside --data {root}", file=sys.stderr)
        return 2

    import ray

    from ecgad.checkpoint import git_commit
    from ecgad.ray.data import RECORDS_PER_TASK, inputs_dataset, prepare_memory, prepare_shard_rows
    from ecgad.ray.listing import tree_digest
    from ecgad.ray.paths import SharedPathError, require_shared

    if not ray.is_initialized():
        ray.init()  # under `ray job submit` (RAY_ADDRESS set) this joins the cluster; otherwise starts a local one
    try:
        require_shared(inputs=[root], outputs=[out])
    except SharedPathError as err:
        print(f"preprocess: error: {err}", file=sys.stderr)
        return 2
    cfg = PrepConfig()
    layout = ShardLayout(out)
    fingerprint = input_fingerprint(tree_digest(str(root)), cfg)  # the files' stats are taken in folder tasks
    manifest = layout.read_manifest()
    if manifest is not None and manifest.get("fingerprint") == fingerprint and not args.force:
        log.info(f"{out} is up to date with {root}; nothing to do (--force rebuilds)")
        print(json.dumps(manifest))
        return 0

    inputs = list_inputs(root)
    if inputs.num_rows == 0:
        print(f"preprocess: error: no ECG records under {root}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    log.info(f"preparing {inputs.num_rows} records of {root} into {out}")

    def build(target: Path | str) -> dict:
        """Write the shards, the rejections and, last, the manifest (the completion marker) into ``target``."""
        records_path, records_fs = for_ray(ShardLayout(target).records)
        (inputs_dataset(inputs)
         .map_batches(prepare_shard_rows, batch_format="pyarrow", batch_size=None, fn_kwargs={"cfg": cfg},
                      num_cpus=1, memory=prepare_memory(RECORDS_PER_TASK))
         .write_parquet(records_path, filesystem=records_fs, compression="zstd"))
        counts, rejections = summarize(ShardLayout(target).records)
        write_parquet(ShardLayout(target).rejections, rejections)
        if is_file(join(root, STATEMENTS_FILE)):   # a PTB-XL root: the diagnosis targets' definitions travel along
            write_bytes(ShardLayout(target).statements, read_bytes(join(root, STATEMENTS_FILE)))
        manifest = {
            "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "data": str(root),
            "prep_config": cfg.to_dict(), "storage_dtype": STORAGE_DTYPE, "counts": counts,
            "labels": label_summary(ShardLayout(target)),
            "git_commit": git_commit(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - started, 3),
        }
        write_json(ShardLayout(target).manifest, manifest, sort_keys=False)
        return manifest

    if is_uri(out):   # no directory rename on object storage (module docstring)
        delete_contents(out)
        manifest = build(out)
    else:
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = temporary_directory(out)
        try:
            manifest = build(tmp)
            replace_directory(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    counts = manifest["counts"]
    log.info(f"done in {manifest['wall_s']:.1f} s: {counts['ok']} prepared, {counts['rejected']} rejected "
         f"{counts['rejected_by_reason']}; {counts['train_normals']} training normals (folds 1-8)")
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
