"""Peak memory of `rdjax serve` under a burst of large images, for one or more checkouts.

  python experiments/serve_memory.py                             # this checkout, the demo model
  python experiments/serve_memory.py --trees . /tmp/old34        # beside another (a git worktree)
  python experiments/serve_memory.py --workdir=runs/demo/disk --burst=16 --side=7000
  python experiments/serve_memory.py --burst=1 --map --mode=I;16     # one request's peak: its bytes per pixel

For each checkout (--trees) the server runs as a user runs it (`python -m rdjax serve`,
that checkout's code, its default limits) in its own process. After one small request
(everything compiled and allocated that a request needs), its resident memory is the
model's own. Then --burst clients post the same --side x --side PNG at once (a gradient:
compressible, so each body is small while its decoded pixels are not), and a --small px
image follows 0.5 s later, whose latency says whether small requests starve behind the
burst (--map: every request asks for ?map=1; --mode: RGB or I;16, 16-bit grayscale).
The server's peak resident memory is its VmHWM (Linux /proc/PID/status), reset before
the burst and read after it; with --burst=1, its growth over the pixels is what one request holds per pixel
(rdjax.serve.limits.BYTES_PER_PIXEL). Without --workdir it trains the demo (ResNet-18, random teacher,
1 epoch on 64 px generated images) in a temporary folder: the memory of a request does
not depend on the weights. The workdir is made by this checkout's code.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from performance import cpu_model  # noqa: E402  (experiments/ is on sys.path when run as a script)
from serve_load import throwaway_workdir  # noqa: E402

MiB = 2**20


def gradient_png(side: int, mode: str = "RGB") -> bytes:
    """A side x side PNG of ramps: compressible, a few hundred KB however many pixels."""
    from PIL import Image

    ramp = np.arange(side, dtype=np.uint32) % 256
    if mode == "I;16":
        image = Image.fromarray(((ramp[None, :] + ramp[:, None]) * 128).astype(np.uint16))
    else:
        channels = np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((1, 1), 128))
        image = Image.fromarray(np.stack(channels, -1).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def post(port: int, body: bytes, path: str = "/predict") -> tuple[int, float, str]:
    """(status, seconds, Retry-After or '') of one POST."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    try:
        conn.request("POST", path, body, {"Content-Type": "image/png"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - start, resp.getheader("Retry-After", "")
    except OSError as e:  # a connection the server closed: counted, not fatal
        return -1, time.perf_counter() - start, type(e).__name__
    finally:
        conn.close()


def measure(tree: Path, workdir: Path, large: bytes, small: bytes, burst: int, path: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdjax", "serve", f"--workdir={workdir}", "--port=0"],
        cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        found = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
        if not found:
            raise SystemExit(f"{tree}: the server did not start: {line}{proc.stderr.read()[-2000:]}")
        port = int(found[1])
        assert post(port, small, path)[0] == 200
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        conn.close()
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of what follows
        before = memory_kib(proc.pid)
        results: list[tuple[int, float, str]] = []
        lock = threading.Lock()

        def client(body: bytes) -> None:
            row = post(port, body, path)
            with lock:
                results.append(row)

        threads = [threading.Thread(target=client, args=(large,)) for _ in range(burst)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        small_status, small_s, _ = post(port, small)
        for t in threads:
            t.join()
        after = memory_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {
        "tree": str(tree),
        "max_memory": health.get("max_memory"),
        "rss_before_mib": before["VmRSS"] / 1024,
        "peak_mib": after["VmHWM"] / 1024,
        "statuses": dict(Counter(s for s, _, _ in results)),
        "retry_after": sorted({r for s, _, r in results if s == 503}),
        "burst_s": max(s for _, s, _ in results),
        "small": (small_status, small_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", default=["."], help="checkouts to measure, each with its own code")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--side", type=int, default=7000)
    parser.add_argument("--small", type=int, default=128)
    parser.add_argument("--map", action="store_true", help="ask for the anomaly map (?map=1)")
    parser.add_argument("--mode", default="RGB", choices=["RGB", "I;16"], help="the large images' PIL mode")
    args = parser.parse_args()

    large, small = gradient_png(args.side, args.mode), gradient_png(args.small)
    path = "/predict?map=1" if args.map else "/predict"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else throwaway_workdir(Path(tmp), 64)
        for tree in args.trees:
            rows.append(measure(Path(tree).resolve(), workdir.resolve(), large, small, args.burst, path))

    print(
        f"\n{args.burst} concurrent {args.side}x{args.side} {args.mode} PNGs ({len(large) / 1024:.0f} KB each) and "
        f"one {args.small} px PNG 0.5 s later, to {path}; {cpu_model()}, {os.cpu_count()} CPUs, "
        f"{datetime.date.today()}\n"
    )
    print("| checkout | --max_memory (MiB) | RSS before (MiB) | peak RSS (MiB) | peak - before (MiB) | answers "
          "| burst done (s) | small image |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    failed = False
    for r in rows:
        budget = r["max_memory"]
        grown = r["peak_mib"] - r["rss_before_mib"]
        within = budget is None or grown <= budget / MiB
        failed |= not within
        answers = ", ".join(f"{n} x {s}" for s, n in sorted(r["statuses"].items()))
        if r["retry_after"]:
            answers += f" (Retry-After: {', '.join(r['retry_after'])})"
        print(
            f"| {r['tree']} | {'none' if budget is None else f'{budget / MiB:.0f}'} | {r['rss_before_mib']:.0f} "
            f"| {r['peak_mib']:.0f} | {grown:.0f}{'' if within else ' (over the budget)'} | {answers} "
            f"| {r['burst_s']:.1f} | {r['small'][0]} in {r['small'][1]:.2f} s |"
        )
    if args.burst == 1:
        for r in rows:
            grown = (r["peak_mib"] - r["rss_before_mib"]) * MiB
            print(f"\n{r['tree']}: one request held {grown / args.side**2:.1f} bytes per pixel at its peak")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
