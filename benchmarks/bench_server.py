"""Edge server: concurrent devices versus throughput and latency, full and delta syncs, and the
size of a delta when 1% of the images change (devices verify with TUF: tuf.ngclient).

    python benchmarks/bench_server.py [--images 2000] [--devices 1,4,16] [--k 1024] [--dim 64]

Starts `d2r serve` (waitress, 16 threads) in a subprocess on loopback, publishes a synthetic
collection (R-ASMK* index of random descriptors, no models), then for each number of devices N
runs N device clients (threads of this process, d2r.sync.SyncClient) at once:
  full  - N fresh devices refresh the TUF metadata, download, verify and install the whole bundle;
  delta - N devices on version 1 move to version 2 (1% of the images removed, 1% added).
Prints markdown tables (latency per device sync, p50 and max, syncs per second, MB/s, target and
TUF metadata bytes per sync). The numbers before TUF come from this script at commit 6cb612e.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from d2r.sync import Destination, SyncClient, generate_keypair
from d2r_server.client import AdminClient
from d2r_server.testing import Collection, free_port


def _run_devices(n, make_client):
    latencies, sizes, meta, errors = [0.0] * n, [0] * n, [0] * n, []
    barrier = threading.Barrier(n)

    def one(i):
        client = make_client(i)
        barrier.wait()
        t0 = time.perf_counter()
        try:
            r = client.sync()
            sizes[i] = r.downloaded
            meta[i] = r.metadata_bytes
        except Exception as exc:  # noqa: BLE001 - counted and printed
            errors.append(repr(exc))
        latencies[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return latencies, sizes, meta, wall, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--devices", default="1,4,16")
    ap.add_argument("--k", type=int, default=1024, help="codebook size")
    ap.add_argument("--dim", type=int, default=64, help="descriptor dimension")
    ap.add_argument("--features", type=int, default=300, help="local features per region (2 regions per image)")
    ap.add_argument("--change", type=float, default=0.01, help="fraction of images removed and added in version 2")
    args = ap.parse_args()
    counts = [int(x) for x in args.devices.split(",")]
    root = Path(tempfile.mkdtemp(prefix="d2r-bench-server-"))
    try:
        t0 = time.perf_counter()
        c = Collection(k=args.k, dim=args.dim, n_features=args.features, regions=2)
        c.add([f"img{i:06d}" for i in range(args.images)])
        v1 = c.save(root / "v1.d2r")
        n_change = max(1, int(round(args.images * args.change)))
        c.remove([f"img{i:06d}" for i in range(0, args.images, args.images // n_change)][:n_change])
        c.add([f"new{i:06d}" for i in range(n_change)])
        v2 = c.save(root / "v2.d2r")
        build_s = time.perf_counter() - t0
        key, _ = generate_keypair(root / "targets.key")
        root_key, _ = generate_keypair(root / "root.key")
        pub = root / "bench.root.json"
        token_file = root / "admin.token"
        token_file.write_text("bench-admin-token-0123456789abcdef")
        port = free_port()
        log = open(root / "server.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "d2r.cli", "serve", "--data", str(root / "data"), "--host", "127.0.0.1",
                                   "--port", str(port), "--admin-token-file", str(token_file), "--threads", "16"],
                                  stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            admin = AdminClient(url, token_file.read_text())
            admin.create_collection("bench", [root_key], key, out=pub)
            t0 = time.perf_counter()
            rec1 = admin.publish(v1, "bench", key)
            publish1_s = time.perf_counter() - t0
            tokens = [admin.add_device(["bench"], f"bench-{i}")["token"] for i in range(max(counts))]

            def seeded(i, tag):
                """A device folder with version 1 active (as after a first sync)."""
                dest = root / f"{tag}-{i}"
                d = Destination(dest)
                d.prepare()
                staged = d.staging / "seed"
                shutil.copytree(v1, staged)
                d.install(staged, 1)
                return dest

            # Warm-up: one full sync of v1; its trusted metadata seeds the delta devices below.
            SyncClient(url, "bench", tokens[0], root / "warm", pub).sync()
            shutil.copytree(root / "warm" / "tuf", root / "seed-tuf")
            t0 = time.perf_counter()
            rec2 = admin.publish(v2, "bench", key)  # the server builds and checks the delta here
            publish2_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm = SyncClient(url, "bench", tokens[0], root / "warm", pub).sync()
            delta_first_s = time.perf_counter() - t0
            assert warm.method == "delta", warm
            delta_size = warm.downloaded

            print(f"# Edge server benchmark: {args.images} images, K={args.k}, D={args.dim}, "
                  f"{args.features} features x 2 regions per image; {n_change} images removed and {n_change} added "
                  f"({args.change:.0%} each) in version 2")
            print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
                  f"synthetic bundles built in {build_s:.1f} s\n")
            print("| archive | bytes | vs full |")
            print("|---|---:|---:|")
            print(f"| full bundle v1 | {rec1['archive_size']:,} | 100% |")
            print(f"| full bundle v2 | {rec2['archive_size']:,} | 100% |")
            print(f"| delta v1 -> v2 | {delta_size:,} | {100 * delta_size / rec2['archive_size']:.2f}% |")
            print(f"\npublish v1 (upload, verify, sign metadata): {publish1_s:.2f} s; publish v2 (also builds and checks the "
                  f"delta): {publish2_s:.2f} s; first delta sync: {delta_first_s:.2f} s\n")
            print("| sync | devices | p50 latency (s) | max latency (s) | wall (s) | syncs/s | MB/s received | "
                  "target bytes/sync | TUF metadata bytes/sync | errors |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for n in counts:
                for kind in ("full", "delta"):
                    if kind == "full":
                        make = lambda i, n=n: SyncClient(url, "bench", tokens[i], root / f"full-{n}-{i}", pub)  # noqa: E731
                    else:
                        dests = [seeded(i, f"delta-{n}") for i in range(n)]
                        for d in dests:  # devices that trusted the metadata of version 1 (as after their first sync)
                            shutil.copytree(root / "seed-tuf", d / "tuf")
                        make = lambda i, dests=dests: SyncClient(url, "bench", tokens[i], dests[i], pub)  # noqa: E731
                    lat, sizes, meta, wall, errors = _run_devices(n, make)
                    mb = (sum(sizes) + sum(meta)) / 1e6
                    print(f"| {kind} | {n} | {statistics.median(lat):.3f} | {max(lat):.3f} | {wall:.2f} | {n / wall:.2f} | "
                          f"{mb / wall:.1f} | {statistics.median(sizes):,.0f} | {statistics.median(meta):,.0f} | {len(errors)} |",
                          flush=True)
                    for e in errors[:3]:
                        print(f"  error: {e}", file=sys.stderr)
                    for i in range(n):
                        shutil.rmtree(root / f"{kind}-{n}-{i}", ignore_errors=True)
        finally:
            server.terminate()
            server.wait(timeout=10)
            log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
