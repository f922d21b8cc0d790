"""Peak memory of ``export --to merged`` against the size of the base: the merge streams the base shard by shard, so it
should need about one shard plus the LoRA factors, not the model (``--to gguf`` streams through the same
``merged_tensors``; this random base has no tokenizer to write, so it is not run here).

A LLaMA-shaped model with random bfloat16 weights (``--layers``, ``--hidden``, ``--intermediate``; the default is a
1.2B-parameter shape, 2.4 GB) is saved in shards of ``--shard-mb``, a random identity-activation DenseLoRA adapter
(r 16 on q/k/v/up/down) is made for it as a finished run, and each export runs in a fresh process whose peak
resident memory (VmHWM; ru_maxrss keeps the parent's across exec) is read at its end, next to that of a process that only
imports the studio's export
code (the interpreter, torch and transformers).

    python benchmarks/export_memory.py                       # ~2.4 GB of weights, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

_PEAK = "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')))"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
_EXPORT = ("import resource, sys; from denselora_app.export import export_run; from denselora_app.runs import "
           "resolve_run; export_run(resolve_run(sys.argv[1], outside_root=True), sys.argv[2], sys.argv[3]); "
           + _PEAK)
_IMPORT_ONLY = ("import resource; import denselora_app.export.build, denselora_app.export.merged, "
                "denselora_app.export.gguf; " + _PEAK)


def make_run(work: Path, args: argparse.Namespace):
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import denselora_app.denselora  # noqa: F401
    from denselora_app.config import RunConfig
    from denselora_app.denselora import DenseLoraConfig
    from denselora_app.runs import create_run

    base = work / "base"
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=max(args.hidden // 512, 1), max_position_embeddings=4096)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(base, max_shard_size=f"{args.shard_mb}MB")
    count = sum(p.numel() for p in model.parameters())
    run = create_run(RunConfig(model=str(base), data="data.jsonl", r=16, alpha=32, target_modules=TARGETS,
                               activation="identity", run_name="memory"), work / "runs")
    adapted = get_peft_model(model, DenseLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                    activation="identity", init_weights=False,
                                                    task_type="CAUSAL_LM"))
    adapted.save_pretrained(run.adapter_dir)
    run.update_status(state="completed")
    del model, adapted
    return run, base, count


def peak_mb(code: str, *argv: str) -> float:
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--shard-mb", type=int, default=500)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="export-memory-"))
    run, base, count = make_run(work, args)
    shards = sorted(base.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards) / 2**20
    largest = max(p.stat().st_size for p in shards) / 2**20
    baseline = peak_mb(_IMPORT_ONLY)
    print(f"base: {count / 1e9:.2f}B parameters, bfloat16, {size:.0f} MB in {len(shards)} shards (largest "
          f"{largest:.0f} MB); a process importing the export code peaks at {baseline:.0f} MB")
    print("| export | peak RSS (MB) | above the import-only process (MB) | as a share of the weights |")
    print("|---|---|---|---|")
    peak = peak_mb(_EXPORT, str(run.path), "merged", str(work / "merged"))
    print(f"| merged | {peak:.0f} | {peak - baseline:.0f} | {(peak - baseline) / size:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
