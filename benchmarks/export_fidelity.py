"""How faithful the exports of a trained run are, outside the studio: the LoRA and merged folders in plain
transformers + PEFT, the GGUF file in transformers (``gguf_file=``) and, where llama-cpp-python is importable, in
llama.cpp itself.

For a finished run (``--run``, e.g. the CPU quickstart trained with ``--set activation=identity``) the script
exports it with ``export_run`` and compares every export with the studio adapter on a few prompts rendered with the
run's chat template: the largest logit difference at every position, and whether greedy decoding gives the same
answer. A GELU run needs ``--calibration`` (its fitted export's own report is printed too). The peak RSS of each
export is measured in a fresh process (VmHWM; ru_maxrss keeps the parent's across exec), next to the size of
the base model's weights.

llama-cpp-python has no wheel on the package index and compiles llama.cpp from source (about 5-10 minutes on 2
cores); install it outside the project's environment and put it on the path:

    pip install --target /tmp/llamacpp llama-cpp-python
    PYTHONPATH=/tmp/llamacpp python benchmarks/export_fidelity.py --run RUN [--calibration DATA]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_PEAK = "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')))"
PROMPTS = ("What is DenseLoRA Studio?", "Name a colour of the sky.", "Which planet do we live on?",
           "Write one word that rhymes with cat.")
GREEDY_TOKENS = 24


def studio_answers(run, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """The studio adapter's logits and greedy answers: the reference."""
    import denselora_app.denselora  # noqa: F401
    from peft import PeftModel

    from denselora_app.engine.models import load_model

    model = PeftModel.from_pretrained(load_model(run.config().model, device="cpu", dtype="float32"),
                                      str(run.adapter_dir)).eval()
    return answers(model, prompts)


def answers(model, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]]:
    logits, replies = [], []
    with torch.no_grad():
        for ids in prompts:
            tensor = torch.tensor([ids])
            logits.append(model(input_ids=tensor).logits[0].float())
            out = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), do_sample=False,
                                 max_new_tokens=GREEDY_TOKENS, pad_token_id=model.config.eos_token_id)
            replies.append(out[0, len(ids):].tolist())
    return logits, replies


def llama_cpp_answers(gguf: Path, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]] | str:
    try:
        from llama_cpp import Llama
    except ImportError as err:
        return f"llama-cpp-python is not importable ({err})"
    llm = Llama(model_path=str(gguf), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    logits, replies = [], []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        logits.append(torch.tensor(llm.scores[:len(ids)]).float())
        reply = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token == llm.token_eos() or len(reply) == GREEDY_TOKENS:
                break
            reply.append(token)
        replies.append(reply)
    return logits, replies


def compare(name: str, got, reference) -> dict:
    logits, replies = got
    ref_logits, ref_replies = reference
    diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits))
    # An answer counts as the same when it agrees token for token up to where the shorter one stops.
    same = sum(a[:min(len(a), len(b))] == b[:min(len(a), len(b))] for a, b in zip(replies, ref_replies))
    return {"export": name, "max_logit_diff": diff, "same_greedy_answers": f"{same}/{len(replies)}"}


def metadata_against_embedded(gguf: Path) -> str:
    """How the file's metadata keys differ from the embedded model's own GGUF (llama.cpp's converter wrote it)."""
    from gguf import GGUFReader

    from denselora_app.engine.models import embedded_gguf_path

    reference, ours = GGUFReader(embedded_gguf_path()).fields, GGUFReader(gguf).fields
    same = [k for k in reference if k in ours and k.startswith(("llama.", "tokenizer."))
            and str(reference[k].contents())[:200] == str(ours[k].contents())[:200]]
    return (f"metadata keys only in the embedded GGUF: {sorted(set(reference) - set(ours))}; only in the export: "
            f"{sorted(set(ours) - set(reference))}; llama.* and tokenizer.* values equal: {len(same)} of "
            f"{sum(k.startswith(('llama.', 'tokenizer.')) for k in reference)}")


def peak_rss_mb(run_path: Path, to: str, out: Path, calibration: str | None, gguf_type: str) -> float:
    """Peak resident memory of one export, in a fresh process."""
    code = ("import resource, sys; from denselora_app.export import export_run; from denselora_app.runs import "
            "resolve_run; export_run(resolve_run(sys.argv[1], outside_root=True), sys.argv[2], sys.argv[3], "
            "calibration=sys.argv[4] or None, gguf_type=sys.argv[5]); "
            + _PEAK)
    done = subprocess.run([sys.executable, "-c", code, str(run_path), to, str(out), calibration or "", gguf_type],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished run (id or folder)")
    parser.add_argument("--calibration", help="calibration rows, required for a GELU or SiLU run")
    args = parser.parse_args(argv)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from denselora_app.config import EMBEDDED_MODEL
    from denselora_app.rules import EXACT_EXPORT_ACTIVATION
    from denselora_app.engine.formats import render_chat
    from denselora_app.engine.models import load_tokenizer
    from denselora_app.export.source import base_folder
    from denselora_app.runs import resolve_run

    run = resolve_run(args.run, outside_root=True)
    tokenizer = load_tokenizer(run.config().model)
    prompts = [tokenizer(render_chat(tokenizer, [{"role": "user", "content": p}], generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for p in PROMPTS]
    reference = studio_answers(run, prompts)
    rows, work = [], Path(tempfile.mkdtemp(prefix="export-fidelity-"))
    base = base_folder(run.config().model)
    exact = run.config().activation == EXACT_EXPORT_ACTIVATION
    print("| export | max logit diff vs adapter | same greedy answers | peak RSS of the export (MB) |", flush=True)
    print("|---|---|---|---|", flush=True)
    for to, gguf_type in (("gguf", "q8_0"), ("gguf", "f16"), ("merged", "f16"), ("lora", "f16")):
        out = work / f"{to}-{gguf_type}"
        # An exact export needs no calibration; the lora export still measures itself with it, for its report.
        calibration = args.calibration if not exact or to == "lora" else None
        rss = peak_rss_mb(run.path, to, out, calibration, gguf_type)
        name = to if to != "gguf" else f"gguf {gguf_type}"
        if to == "lora":
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                              str(out)).eval()
        elif to == "merged":
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        else:
            gguf = next(out.glob("*.gguf"))
            model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf.name, dtype=torch.float32).eval()
        rows.append({**compare(f"{name} (transformers)", answers(model, prompts), reference),
                     "peak_rss_mb": round(rss)})
        print(_row(rows[-1]), flush=True)
        if to == "gguf" and gguf_type == "q8_0" and run.config().model == EMBEDDED_MODEL:
            print(metadata_against_embedded(next(out.glob("*.gguf"))))
        if to == "gguf":
            got = llama_cpp_answers(next(out.glob("*.gguf")), prompts)
            rows.append({"export": f"{name} (llama.cpp)", "error": got} if isinstance(got, str)
                        else compare(f"{name} (llama.cpp)", got, reference))
            print(_row(rows[-1]), flush=True)
        report = out / "export_report.json"
        if to == "lora" and report.is_file():
            print(json.dumps({k: v for k, v in json.loads(report.read_text()).items() if k != "layers"}, indent=1))
    weights = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"base weights: {weights:.0f} MB; this process (all the models above) peak RSS {peak} MB")
    return 0


def _row(row: dict) -> str:
    if "error" in row:
        return f"| {row['export']} | {row['error']} | | |"
    return (f"| {row['export']} | {row['max_logit_diff']:.2e} | {row['same_greedy_answers']} | "
            f"{row.get('peak_rss_mb', '')} |")


if __name__ == "__main__":
    sys.exit(main())
