"""`rdjax serve` under load on loopback, beside Predictor.predict one image at a time in one
process, on one machine in one run.

  python experiments/serve_load.py                          # throwaway demo model, 1,000 requests
  python experiments/serve_load.py --workdir=runs/bottle --requests=2000

--clients threads each keep one HTTP connection open and send their share of --requests
PNG images (a pool of --images distinct random images of --image_px pixels), each waiting
for its answer before sending the next, as a camera would. Every answer is checked
against Predictor.predict on the same image alone with the server's batch size (the same
compiled program, so equal bit for bit). The server runs batching as asked (--batch_size,
--max_wait_ms) and without (batch size 1), each with --clients clients and with one
client (--single_requests requests: a single camera, where every call still costs a full
padded batch). The last row decodes each PNG and calls Predictor.predict(image,
batch_size=1) one at a time in this process. Latency is per request, from sending to the
parsed answer. Without --workdir it trains the demo (ResNet-18, random teacher, 1 epoch
on generated images) in a temporary folder: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import io
import json
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from performance import cpu_model  # noqa: E402  (experiments/ is on sys.path when run as a script)


def throwaway_workdir(base: Path, size: int) -> Path:
    from rdjax import train
    from rdjax.configs import synthetic as synthetic_config
    from rdjax.data import synthetic

    root = synthetic.generate(base / "data", categories=("disk",), size=size, num_train=16, num_test_good=4,
                              num_per_defect=2)  # fmt: skip
    config = synthetic_config.get_config()
    config.dataset.root, config.dataset.data_dir, config.dataset.category = str(root), str(root / "_tfds"), "disk"
    config.image_size, config.num_epochs, config.eval_every = size, 1, 1
    train.train_and_evaluate(config, base / "workdir")
    return base / "workdir"


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def load_test(url: str, bodies: list[bytes], order: list[int], clients: int) -> tuple[float, list[float], list]:
    """(seconds for all, per-request latencies, (index, status, answer) per request)."""
    parsed = urllib.parse.urlsplit(url)
    shares = [order[c::clients] for c in range(clients)]

    def client(share: list[int]) -> list[tuple[float, int, int, dict]]:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)
        out = []
        for i in share:
            start = time.perf_counter()
            conn.request("POST", "/predict", bodies[i], {"Content-Type": "image/png"})
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            out.append((time.perf_counter() - start, i, resp.status, answer))
        conn.close()
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rows in pool.map(client, shares) for r in rows]
    return time.perf_counter() - start, [r[0] for r in results], [r[1:] for r in results]


def row(label: str, seconds: float, latencies: list[float]) -> str:
    ms = np.percentile(np.array(latencies) * 1000, [50, 99])
    return f"| {label} | {len(latencies)} | {len(latencies) / seconds:.1f} | {ms[0]:.1f} | {ms[1]:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--size", type=int, default=128, help="image_size of the throwaway model")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--single_requests", type=int, default=100, help="requests of the one-client rows")
    parser.add_argument("--images", type=int, default=16, help="distinct images in the pool")
    parser.add_argument("--image_px", type=int, default=0, help="side of the sent images (default: image_size)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    args = parser.parse_args()

    import jax

    import rdjax
    from rdjax.serve import server as serve
    from rdjax.serve.limits import Settings, decode

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else throwaway_workdir(Path(tmp), args.size)
        model = rdjax.load(workdir)
        side = args.image_px or model.image_size
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(args.images)]
        bodies = [png(a) for a in images]
        order = [int(i) for i in rng.integers(0, len(images), args.requests)]

        rows, mismatches = [], 0
        for batch_size in (args.batch_size, 1):
            truth = [float(model.predict(a, batch_size=batch_size).scores[0]) for a in images]
            settings = Settings(batch_size=batch_size, max_wait_ms=args.max_wait_ms)
            with serve.running(model, settings=settings) as url:
                for clients, count in ((args.clients, args.requests), (1, args.single_requests)):
                    seconds, latencies, answers = load_test(url, bodies, order[:count], clients)
                    mismatches += sum(status != 200 or answer["score"] != truth[i] for i, status, answer in answers)
                    label = f"rdjax serve --batch_size={batch_size}, {clients} client{'s' * (clients > 1)}"
                    rows.append(row(label, seconds, latencies))

        model.predict(decode(bodies[0]), batch_size=1)  # compile outside the timing
        latencies = []
        start = time.perf_counter()
        for i in order:
            t = time.perf_counter()
            model.predict(decode(bodies[i]), batch_size=1)
            latencies.append(time.perf_counter() - t)
        label = "Predictor.predict(decoded PNG, batch_size=1), one at a time"
        rows.append(row(label, time.perf_counter() - start, latencies))

    print(
        f"\n{model.config.model.arch}, {model.image_size} px model, {side}x{side} PNG requests, "
        f"--max_wait_ms={args.max_wait_ms}; {cpu_model()}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"{datetime.date.today()}, jax {jax.__version__}\n"
    )
    print("| setting | requests | images/s | p50 latency (ms) | p99 latency (ms) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nanswers that differ from Predictor.predict on the same image alone (or not 200): {mismatches}")
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
