"""The page's latency against sample.py's library call (issue #24): a DDIM-50 grid of 16 digits.

    python -m bench.app_latency                                   # checkpoints/digits/last.pt, 5 repeats
    python -m bench.app_latency --checkpoint PATH --repeats 9 --threads 1 --write

Three ways to do the same work (same checkpoint, seed, settings, torch threads), interleaved, medians:
  library   commands.run_request: what `python sample.py --sampler ddim --steps 50 --num-samples 16` runs after
            loading (the model loaded once, outside the timing), writing the same PNGs;
  handler   webapp.handlers.sample in this process (the page's work without Gradio);
  page      a real Gradio client (gradio_client) against `python app.py` started here on a free loopback port:
            the request, the queue, the live previews streamed, the grid sent back.
Wall seconds, and CPU seconds of the process that sampled (this one, or the server's), since on a shared machine
CPU time moves less than wall time. The target: page <= 1.2 x library. --write puts the table in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- app-latency:start -->", "<!-- app-latency:end -->"
FLAGS = ["--sampler", "ddim", "--steps", "50", "--num-samples", "16", "--seed", "0", "--class-label", "3"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/digits/last.pt")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(checkpoint: str, threads: int):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--checkpoint", checkpoint, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("ddpm-lab page:"):
            return proc, f"http://127.0.0.1:{port}/"
    raise SystemExit(f"app.py did not start (exit {proc.wait()})")


def timed(fn, pid: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds(pid)
    fn()
    return time.perf_counter() - wall, cpu_seconds(pid) - cpu


def measure(args) -> dict[str, list[tuple[float, float]]]:
    from commands import check_request, run_request
    from webapp import Models, handlers
    from webapp.models import parser
    from gradio_client import Client
    torch.set_num_threads(args.threads)
    loaded = Models(args.checkpoint).get(Path(args.checkpoint).parent.name)
    server, url = start_server(args.checkpoint, args.threads)
    try:
        client = Client(url, verbose=False)

        def library():
            request = parser().parse_args(loaded.argv + FLAGS)
            check_request(request)
            run_request(request, loaded.source)
        ways = {"library": (library, os.getpid()),
                "handler": (lambda: handlers.sample(loaded, "ddim", 50, 0.0, 2.0, "3", 0, 16), os.getpid()),
                "page": (lambda: client.predict(loaded.name, "ddim", 50, 0.0, 2.0, "3", 0, 16, api_name="/sample"),
                         server.pid)}
        for fn, _ in ways.values():  # warm-up: first-call allocations, the server's first request
            fn()
        times = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, (fn, pid) in ways.items():
                times[name].append(timed(fn, pid))
        return times
    finally:
        server.terminate()
        server.wait(timeout=30)


def table(times, args) -> str:
    base = statistics.median(w for w, _ in times["library"])
    base_cpu = statistics.median(c for _, c in times["library"])
    rows = ["| way | wall s (median) | wall min..max | x library (wall) | CPU s (median) | x library (CPU) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, runs in times.items():
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        rows.append(f"| {name} | {wall:.2f} | {min(w for w, _ in runs):.2f}..{max(w for w, _ in runs):.2f} | "
                    f"{wall / base:.2f} | {cpu:.2f} | {cpu / base_cpu:.2f} |")
    return "\n".join(rows)


def write(text: str) -> None:
    path = REPO / "bench" / "RESULTS.md"
    old = path.read_text()
    block = f"{START}\n{text}\n{END}"
    new = old[:old.index(START)] + block + old[old.index(END) + len(END):] if START in old else old.rstrip() + \
        "\n\n" + block + "\n"
    path.write_text(new)


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    times = measure(args)
    body = table(times, args)
    print(body)
    ratio = statistics.median(w for w, _ in times["page"]) / statistics.median(w for w, _ in times["library"])
    command = "python -m bench.app_latency " + " ".join(sys.argv[1:])
    text = (f"## The page's latency (bench/app_latency.py)\n\n- command: `{command}`; DDIM-50, 16 digits (class 3, "
            f"guidance 2), {args.repeats} repeats interleaved, {args.threads} torch thread(s) in both processes; "
            f"checkpoint `{args.checkpoint}`\n- machine: {os.cpu_count()} cores, torch {torch.__version__}; load "
            f"average (1 min) at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f}\n\n{body}\n\n"
            f"- Target \"page <= 1.2 x library\": {'holds' if ratio <= 1.2 else 'does NOT hold'} ({ratio:.2f}x wall)")
    if args.write:
        write(text)
    print(text.splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
