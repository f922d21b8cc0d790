"""Hostile inputs against their bounds: peak memory and time of the studio's own commands fed a single huge line,
a huge CSV cell, a 2 GB dataset and a 5 MB chat message, against the baseline run of the CPU quickstart.

Each case runs ``python -m denselora_app train presets/quickstart-cpu.yaml --set max_steps=2 ...`` (the embedded
model, as a user would) in a fresh process tree, in its own runs folder; the peak is the largest resident memory of
the whole tree (the CLI, and a worker if one is started), polled every 0.1 s. A case passes when it ends with a
completed run or a clear refusal (exit status 2, one paragraph) within 2x the baseline's peak.

The 2 GB dataset is checked as a background launch (the launch check reads only its first rows), then its worker
is watched for ``--first-step-budget`` seconds: if it has not reached its first step by then (it tokenizes every row
before training), Stop is asked for and the time the worker takes to end is recorded. The chat message goes to
``serve`` with the baseline run's adapter, its body limit raised so that the message reaches the engine.

    python benchmarks/hostile.py                  # every case, ~15 minutes on 2 cores, ~3 GB of disk in --work-dir
    python benchmarks/hostile.py --cases chat-5mb --variant cpu-chat   # needs the baseline case run first

Results go to ``benchmarks/results/hostile_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchlib import machine_description, machine_line, main_for, markdown_table  # noqa: E402

GB = 1024**3
MB = 1024**2
PRESET = REPO / "presets" / "quickstart-cpu.yaml"
ROW = {"instruction": "What is the capital of the studio's sample country?", "output": "Its capital is Lumen."}
CASES = ("baseline", "line-200mb", "csv-cell-50mb", "file-2gb", "chat-5mb")


def make_data(case: str, folder: Path) -> Optional[Path]:
    """The case's data file (written once, reused), or None for the shipped sample."""
    folder.mkdir(parents=True, exist_ok=True)
    if case == "baseline":
        return None
    if case == "line-200mb":
        path = folder / "one-huge-line.jsonl"
        if not path.exists():
            with path.open("w") as out:
                for _ in range(32):
                    out.write(json.dumps(ROW) + "\n")
                out.write(json.dumps({"instruction": "word " * (40 * MB), "output": "short"}) + "\n")
        return path
    if case == "csv-cell-50mb":
        path = folder / "one-huge-cell.csv"
        if not path.exists():
            with path.open("w", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(["instruction", "output"])
                for _ in range(32):
                    writer.writerow([ROW["instruction"], ROW["output"]])
                writer.writerow(["word " * (10 * MB), "short"])
        return path
    path = folder / "two-gb.jsonl"
    if not path.exists() or path.stat().st_size < 2 * GB:
        line = (json.dumps(ROW) + "\n").encode()
        with path.open("wb") as out:
            block = line * (8 * MB // len(line))
            for _ in range(2 * GB // len(block) + 1):
                out.write(block)
    return path


class Watched:
    """A command's process tree, with the peak of its total resident memory."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.peak = 0

    def sample(self, extra: Sequence[int] = ()) -> None:
        procs = []
        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            pass
        for pid in extra:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        total = 0
        for proc in {p.pid: p for p in procs}.values():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def wait(self, timeout: float) -> tuple[int | None, str]:
        while self.process.poll() is None and time.perf_counter() - self.started < timeout:
            self.sample()
            time.sleep(0.1)
        if self.process.poll() is None:
            self.process.kill()
        output = self.process.stdout.read() if self.process.stdout else ""
        return self.process.returncode, output

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    from denselora_app.runs import list_runs, request_stop

    data = make_data(case, args.work_dir / "data")
    runs = args.work_dir / "runs" / case
    env = {**os.environ, "DENSELORA_RUNS": str(runs)}
    command = [sys.executable, "-m", "denselora_app", "train", str(PRESET), "--set", "max_steps=2", "--set",
               "save_steps=2", "--set", f"run_name=hostile-{case}"]
    if data is not None:
        command += ["--set", f"data={data}"]
    result: dict[str, Any] = {"case": case, "input_bytes": data.stat().st_size if data else 0}
    if case == "chat-5mb":
        return chat_case(args, result)
    if case != "file-2gb":
        watched = Watched(command, env)
        code, output = watched.wait(args.timeout)
        result.update(returncode=code, seconds=watched.seconds, peak_rss=watched.peak, message=_message(output))
        ran = list_runs(runs)
        result["state"] = str(ran[0].status().state) if ran else "no run"
        return result
    # The 2 GB file: the launch check, then the worker until its first step or the budget.
    watched = Watched(command + ["--background"], env)
    code, output = watched.wait(args.timeout)
    result.update(launch_returncode=code, launch_seconds=watched.seconds, launch_peak_rss=watched.peak,
                  message=_message(output))
    ran = list_runs(runs)
    if code != 0 or not ran:
        result["state"] = "refused" if code == 2 else "no run"
        return result
    run = ran[0]
    worker, started, peak = run.raw_status().pid, time.perf_counter(), 0
    watched.peak = 0  # from here on, the worker's own
    while time.perf_counter() - started < args.first_step_budget and run.status().active:
        watched.sample([worker] if worker else [])
        peak = max(peak, watched.peak)
        if run.raw_status().step >= 1:
            break
        time.sleep(0.5)
    result.update(worker_peak_rss=peak, watched_seconds=round(time.perf_counter() - started, 1),
                  first_step=run.raw_status().step >= 1)
    if run.status().active:
        asked = time.perf_counter()
        request_stop(run)
        while run.status().active and time.perf_counter() - asked < 300:
            time.sleep(0.2)
        result["stop_seconds"] = round(time.perf_counter() - asked, 1)
    result["state"] = str(run.status().state)
    return result


def chat_case(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """A 5 MB chat message to ``serve`` (the baseline case's adapter on the embedded model), with a request body limit
    that lets it through to the engine (the default, 4 MB, refuses it at the body already)."""
    import httpx

    from denselora_app.runs import list_runs

    (run,) = list_runs(args.work_dir / "runs" / "baseline") or [None]
    if run is None:
        raise SystemExit("chat-5mb needs the baseline case's run: run --cases baseline first")
    port = _free_port()
    env = {**os.environ, "DENSELORA_RUNS": str(run.path.parent)}
    server = Watched([sys.executable, "-m", "denselora_app", "serve", run.id, "--port", str(port),
                      "--max-body-mb", "16"], env)
    url = f"http://127.0.0.1:{port}/v1"
    while time.perf_counter() - server.started < args.timeout:
        server.sample()
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    ready, base = server.peak, server.peak
    message = "word " * 1_000_000
    body = {"model": run.id, "messages": [{"role": "user", "content": message}], "max_tokens": 8}
    started = time.perf_counter()
    answer = httpx.post(f"{url}/chat/completions", json=body, timeout=120)
    seconds = round(time.perf_counter() - started, 2)
    server.sample()
    ok = httpx.post(f"{url}/chat/completions", json={**body, "messages": [{"role": "user", "content": "Hi"}]},
                    timeout=120)
    server.sample()
    server.process.terminate()
    server.wait(30)
    result.update(input_bytes=len(message), seconds=seconds, peak_rss=server.peak, rss_when_ready=ready,
                  growth=server.peak - base, status_code=answer.status_code,
                  message=answer.json().get("error", {}).get("message", "")[:300] if answer.content else "",
                  state=f"refused ({answer.status_code}); next request {ok.status_code}")
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _message(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    results = [run_case(case, args) for case in args.cases]
    baseline = next((r["peak_rss"] for r in results if r["case"] == "baseline"), None)
    for result in results:
        peak = result.get("peak_rss") or max(result.get("launch_peak_rss", 0), result.get("worker_peak_rss", 0))
        result["peak_vs_baseline"] = round(peak / baseline, 2) if baseline else None
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine_description(torch.device("cpu")),
            "cases": results}


def render(results: dict[str, Any]) -> str:
    rows = []
    for r in results["cases"]:
        peak = r.get("peak_rss") or max(r.get("launch_peak_rss", 0), r.get("worker_peak_rss", 0))
        seconds = r.get("seconds", r.get("launch_seconds"))
        extra = ""
        if r["case"] == "file-2gb":
            extra = (f"launch check {r.get('launch_seconds')} s; first step within {r.get('watched_seconds')} s: "
                     f"{'yes' if r.get('first_step') else 'no'}; Stop took {r.get('stop_seconds', '-')} s")
        rows.append([r["case"], f"{r['input_bytes'] / MB:,.0f} MB", f"{peak / GB:.2f} GB",
                     f"{r['peak_vs_baseline']}x" if r["peak_vs_baseline"] else "-", seconds, r["state"],
                     extra or r.get("message", "")])
    return (machine_line(results["machine"]) + "\n\n"
            + markdown_table(["case", "input", "peak RSS (tree)", "vs baseline", "seconds", "ended", "note"], rows))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a case may take")
    parser.add_argument("--first-step-budget", type=float, default=300.0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/denselora-hostile"))
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--variant", default="cpu")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main_for(__file__, "hostile", parse_args, run, render, None, variant="variant")
