"""The throughput check for one CUDA GPU, in one call: a LLaMA-3-8B-shaped model (random bf16 weights made on the
device; nothing is downloaded) trained with DenseLoRA r16, LoRA r16 and no adapter,

* at a fixed length, with step time, peak memory and MFU, and greedy decoding with and without compilation
  (``speed_memory.py --device cuda --compile``);
* on instruction-like rows of spread lengths, padded against length-grouped against packed (``packing.py --device
  cuda --model llama3-8b``).

Each part runs in its own process (so one that fails or runs out of memory leaves the other's results) with a
time limit, and writes its JSON and Markdown to benchmarks/results/ as when run alone.

    python benchmarks/gpu_throughput.py            # about 8 minutes on an H100/H200
    python benchmarks/gpu_throughput.py --dry-run  # the same commands on the CPU with a tiny model, in seconds
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent

# (name, script, arguments on a GPU, arguments for the dry run)
PARTS = [
    ("training and decoding", "speed_memory.py", ["--device", "cuda", "--compile"],
     ["--device", "cpu", "--model", "tiny", "--rank", "4", "--batch", "2", "--seq", "16", "--steps", "1",
      "--warmup", "1", "--repeats", "1", "--gen-batch", "2", "--prompt-len", "8", "--new-tokens", "3",
      "--gen-repeats", "1"]),
    ("padded, grouped and packed batches", "packing.py",
     ["--device", "cuda", "--model", "llama3-8b", "--batch", "4", "--rows", "1000", "--steps", "6"],
     ["--device", "cpu", "--model", "tiny", "--rank", "4", "--rows", "40", "--min-len", "4", "--max-len", "48",
      "--median-len", "12", "--batch", "3", "--steps", "2", "--warmup", "1"]),
]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run the same parts on the CPU with a tiny model")
    parser.add_argument("--timeout", type=float, default=290.0, help="seconds each part may run")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    failed = []
    for name, script, gpu_args, dry_args in PARTS:
        command = [sys.executable, str(HERE / script), *(dry_args if args.dry_run else gpu_args),
                   "--out-dir", str(args.out_dir)]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        try:
            code = subprocess.run(command, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timed out"
        print(f"== {name}: {'done' if code == 0 else f'failed ({code})'} in {time.perf_counter() - started:.0f} s",
              flush=True)
        if code != 0:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
