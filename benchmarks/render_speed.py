"""Render speed of the built-in shapes benchmark on 2 CPU threads.

Usage: python benchmarks/render_speed.py [--size 64] [--batch 256] [--seconds 10] [--json]

Reports two numbers: RGB+depth+IR triples per second for scene sampling + rendering (no disk),
and triples per second including PNG encoding of all three images (in memory, no disk writes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from xkt.shared.render import ALL_CLASSES, TASK_CLASSES, Rendered, render, sample_scenes


def _encode(out: Rendered) -> int:
    """PNG-encode every image of a batch in memory; returns the total bytes (so nothing is optimised away)."""
    total = 0
    for arr in (out.rgb.numpy(), out.depth_mm.numpy().astype(np.uint16), out.thermal_ck.numpy().astype(np.uint16)):
        for img in arr:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            total += buf.tell()
    return total


def _run(size: int, batch: int, seconds: float, encode: bool, seed: int, threads: int | None) -> tuple[float, float]:
    """Triples per wall-clock second and per process CPU-second, over at least ``seconds`` of
    wall time after one warm-up batch.  CPU time is reported because the wall-clock rate drops
    when other processes share the cores; it shows how much of the drop is contention."""
    g = torch.Generator().manual_seed(seed)
    classes = [ALL_CLASSES.index(TASK_CLASSES[i % len(TASK_CLASSES)]) for i in range(batch)]
    out = render(sample_scenes(classes, g), size, g, threads=threads)  # warm-up
    if encode:
        _encode(out)
    done, start, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        out = render(sample_scenes(classes, g), size, g, threads=threads)
        if encode:
            _encode(out)
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed, done / max(time.process_time() - cpu0, 1e-9)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--render-threads", type=int, default=1, help="render()'s intra-op thread cap; 0 = use --threads as is"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    cap = args.render_threads or None
    render_rate, render_cpu = _run(args.size, args.batch, args.seconds, encode=False, seed=0, threads=cap)
    png_rate, _ = _run(args.size, args.batch, args.seconds / 2, encode=True, seed=1, threads=cap)
    result = {
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "render_threads": cap or args.threads,
        "triples_per_s": round(render_rate, 1),
        "triples_per_cpu_s": round(render_cpu, 1),
        "triples_per_s_with_png": round(png_rate, 1),
        "images_per_s_with_png": round(3 * png_rate, 1),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"render (sample + render, no disk): {render_rate:.0f} RGB+depth+IR triples/s at {args.size}x{args.size}")
        print(f"with PNG encoding of all 3 images: {png_rate:.0f} triples/s ({3 * png_rate:.0f} images/s)")
        print(f"({render_cpu:.0f} triples per CPU-second; 1-min load average {result['load_avg_1m']})")
    return result


if __name__ == "__main__":
    main()
