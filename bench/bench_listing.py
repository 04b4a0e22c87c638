"""Listing one flat prefix of Cloud Storage serially (page after page) and in parallel
ranges (``batch.listing``), on the tests' ranged GCS emulator (``tests/gcs_ranges.py``).
Prints a table: objects, pages, requests, seconds, pages/s, and the ratio. It starts
the tests' emulator, so tests/ is on its import path (``./dev bench`` puts it there):

    ./dev bench listing --objects 8000 --page 100
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=8000)
    parser.add_argument("--page", type=int, default=100, help="names per page (Cloud Storage: 1,000)")
    args = parser.parse_args()
    import test_batch_listing as helpers

    from batch import listing

    proc, url = helpers.start_ranged_emulator(Path(tempfile.mkdtemp()) / "emulator.log")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    listing.PAGE_SIZE = args.page
    calls = [0]
    real = listing._gcs_page

    def counted(*a):
        calls[0] += 1
        return real(*a)

    listing._gcs_page = counted
    try:
        bucket = helpers.new_bucket("bench")
        helpers.upload(bucket, [f"in/img_{i:07d}.jpg" for i in range(args.objects)])
        print(f"uploaded {args.objects} objects", file=sys.stderr, flush=True)
        rows = []
        for label, whole in (("serial", True), ("parallel ranges", False)):
            calls[0] = 0
            start = time.perf_counter()
            n = sum(len(c.names) for c in listing.walk(f"gs://{bucket}/in", whole_folders=whole))
            seconds = time.perf_counter() - start
            assert n == args.objects, (label, n)
            pages = -(-args.objects // args.page)
            rows.append((label, n, pages, calls[0], seconds, pages / seconds))
        print(f"| listing | objects | pages of {args.page} | requests | s | pages/s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for label, n, pages, requests, seconds, rate in rows:
            print(f"| {label} | {n:,} | {pages} | {requests} | {seconds:.2f} | {rate:.0f} |")
        print(f"parallel / serial pages/s: {rows[1][5] / rows[0][5]:.2f}x ({listing.NUM_LIST_THREADS} threads)")
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
