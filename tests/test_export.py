"""Export of a DenseLoRA adapter: a standard LoRA adapter and a merged model that load without this project, a GGUF
file that transformers reads back, the refusals, and the calibrated fit of a GELU adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from denselora_app.config import RunConfig
from denselora_app.denselora import DenseLoraConfig
from denselora_app.export import EXPORT_REPORT, ExportError, export_run
from denselora_app.export.fit import HELD_OUT_EVERY, calibration_examples
from denselora_app.export.source import export_source
from denselora_app.runs import ADAPTER_WEIGHTS, create_run, resolve_run

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
PROMPTS = [[5, 17, 42, 99, 3, 250], [1, 2, 3], [300, 12, 77, 8, 8, 150, 61, 19, 4]]


def make_run(root: Path, model_dir: Path, activation: str, name: str, data: str = "data.jsonl", **cfg_extra):
    """A finished run whose adapter is random (init_weights=False: not a no-op), as training would leave it."""
    cfg = RunConfig(model=str(model_dir), data=data, r=4, alpha=8, target_modules=TARGETS, activation=activation,
                    max_steps=2, run_name=name, **cfg_extra)
    run = create_run(cfg, root)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    adapter = DenseLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, activation=activation, init_weights=False,
                              task_type="CAUSAL_LM")
    model = get_peft_model(base, adapter)
    with torch.no_grad():  # a decoder as large as training makes it, so the update is far above float rounding
        for name_, param in model.named_parameters():
            if "denselora_decoder" in name_:
                param.mul_(4)
    model.save_pretrained(run.adapter_dir)
    run.update_status(state="completed")
    return resolve_run(str(run.path), outside_root=True)


def adapter_logits(run, prompts=PROMPTS) -> list[torch.Tensor]:
    """The studio adapter's logits: the reference every export is held to."""
    base = AutoModelForCausalLM.from_pretrained(run.config().model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).logits[0] for p in prompts]


# Run in a fresh interpreter: only transformers and peft, never this project (checked at the end).
FRESH_CHECK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
job = json.loads(sys.argv[1])
if job["adapter"]:
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32),
                                      job["adapter"])
else:
    model = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32, **job.get("load", {}))
model.eval()
with torch.no_grad():
    logits = [model(input_ids=torch.tensor([p])).logits[0].tolist() for p in job["prompts"]]
assert not any(m.startswith("denselora") for m in sys.modules), "the project was imported"
import peft
assert "DENSELORA" not in peft.PeftType.__members__, "DenseLoRA is registered with PEFT"
print(json.dumps(logits))
"""


def fresh_logits(base: Path, adapter: Path | None = None, prompts=PROMPTS, cwd: Path | None = None, **load):
    job = json.dumps({"base": str(base), "adapter": str(adapter) if adapter else None, "prompts": prompts,
                      "load": load})
    done = subprocess.run([sys.executable, "-c", FRESH_CHECK, job], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.tensor(rows) for rows in json.loads(done.stdout.strip().splitlines()[-1])]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("export-model"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-runs")


@pytest.fixture(scope="module")
def identity_run(runs, model_dir):
    return make_run(runs, model_dir, "identity", "identity")


@pytest.fixture(scope="module")
def gelu_run(runs, model_dir):
    return make_run(runs, model_dir, "gelu", "gelu")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, app_data_file) -> Path:
    return app_data_file


# ---- the exact export of an identity adapter ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_lora_export_loads_in_plain_peft_with_the_adapters_logits(identity_run, model_dir, tmp_path):
    result = export_run(identity_run, "lora", tmp_path / "lora")
    reference = adapter_logits(identity_run)
    base_only = [AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=torch.tensor([p])).logits[0].detach()
                 for p in PROMPTS]
    assert max_difference(reference, base_only) > 1e-2  # the adapter really changes the logits
    assert max_difference(fresh_logits(model_dir, result.folder, cwd=tmp_path), reference) < 1e-4


def test_the_lora_export_holds_peft_names_only(identity_run, tmp_path):
    folder = export_run(identity_run, "lora", tmp_path / "lora").folder
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    assert config["base_model_name_or_path"] == str(identity_run.config().model)
    with safe_open(str(folder / ADAPTER_WEIGHTS[0]), "pt") as file:
        keys = list(file.keys())
    assert len(keys) == 2 * 5 * 2  # A and B, five modules, two layers: nothing else
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in keys)
    report = json.loads((folder / EXPORT_REPORT).read_text())
    assert report["exact"] is True and report["rank"] == 4


@pytest.mark.slow
def test_the_merged_export_loads_with_transformers_alone(identity_run, model_dir, tmp_path):
    folder = export_run(identity_run, "merged", tmp_path / "merged").folder
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert max_difference(fresh_logits(folder, cwd=tmp_path), adapter_logits(identity_run)) < 1e-4
    with safe_open(str(folder / "model.safetensors"), "pt") as file:
        assert {file.get_tensor(k).dtype for k in file.keys()} == {torch.float32}  # the base's dtype


# ---- refusals: nothing written, the fix named ------------------------------------------------------------------------


def test_a_gelu_adapter_without_calibration_is_refused_and_nothing_written(gelu_run, tmp_path):
    for kind in ("lora", "merged", "gguf"):
        with pytest.raises(ExportError, match="--calibration FILE.*activation: identity"):
            export_run(gelu_run, kind, tmp_path / kind)
        assert not (tmp_path / kind).exists()


def test_a_non_llama_base_is_refused_for_gguf_by_name(runs, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import tiny_tokenizer

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    cfg = RunConfig(model=str(folder), data="data.jsonl", r=4, alpha=8, target_modules=["c_attn"],
                    activation="identity", run_name="gpt2")
    run = create_run(cfg, runs)
    base = AutoModelForCausalLM.from_pretrained(folder)
    get_peft_model(base, DenseLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], activation="identity",
                                         task_type="CAUSAL_LM")).save_pretrained(run.adapter_dir)
    run.update_status(state="completed")
    with pytest.raises(ExportError, match="'gpt2'.*--to merged.*convert_hf_to_gguf"):
        export_run(run, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_empty_is_refused(identity_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_run(identity_run, "lora", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_rank_is_refused_for_an_exact_export(identity_run, tmp_path):
    with pytest.raises(ExportError, match="exports exactly at its own rank 4"):
        export_run(identity_run, "lora", tmp_path / "out", rank=8)


# ---- GGUF, read back by transformers -----------------------------------------------------------------------------


def rounded_like_gguf(folder: Path, gguf_type: str) -> list[torch.Tensor]:
    """The merged model's logits with every matrix rounded as the GGUF type stores it (gguf's own quantizer)."""
    import gguf

    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "f32": gguf.GGMLQuantizationType.F32}[gguf_type]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                data = param.numpy()
                stored = data.astype({"f16": "float16", "f32": "float32"}[gguf_type]) if gguf_type != "q8_0" \
                    else gguf.quants.quantize(data, qtype)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(stored, qtype).astype("float32")
                                             .reshape(data.shape)))
        return [model(input_ids=torch.tensor([p])).logits[0] for p in PROMPTS]


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_the_gguf_export_reads_back_through_transformers(identity_run, gguf_type, tmp_path):
    result = export_run(identity_run, "gguf", tmp_path / "gguf", gguf_type=gguf_type)
    gguf_file = f"{identity_run.id}.{gguf_type}.gguf"
    assert {gguf_file, "Modelfile", EXPORT_REPORT, "README.md"} == set(result.files)
    assert (result.folder / "Modelfile").read_text() == f'FROM ./{gguf_file}\nPARAMETER stop "<|im_end|>"\n'
    logits = fresh_logits(result.folder, cwd=tmp_path, gguf_file=gguf_file)
    # The file is the merged model, as exactly as its type stores it: names, q/k layout, shapes, tokenizer.
    merged = export_run(identity_run, "merged", tmp_path / "merged").folder
    assert max_difference(logits, rounded_like_gguf(merged, gguf_type)) < 1e-4
    # And close to the adapter itself: f16 rounding, or q8_0's 8-bit blocks, is all that differs.
    assert max_difference(logits, adapter_logits(identity_run)) < {"f32": 1e-4, "f16": 2e-3, "q8_0": 0.2}[gguf_type]


# ---- a GELU adapter: the calibrated fit ---------------------------------------------------------------------------


def calibration_rows(path: Path, count: int = 32) -> Path:
    """Chat rows in words the tiny tokenizer knows (the format the run trained in)."""
    words = "the quick brown fox jumps over lazy dog what is capital of a country answer yes no".split()
    rows = [{"messages": [{"role": "user", "content": " ".join(words[i % 17:(i % 17) + 4])},
                          {"role": "assistant", "content": " ".join(words[(3 * i) % 13:(3 * i) % 13 + 3])}]}
            for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_a_gelu_adapter_is_fitted_on_calibration_data_and_its_error_reported(gelu_run, model_dir, tmp_path):
    data = calibration_rows(tmp_path / "calibration.jsonl", 16)
    result = export_run(gelu_run, "lora", tmp_path / "lora", calibration=str(data))
    report = json.loads((result.folder / EXPORT_REPORT).read_text())
    assert report["exact"] is False and report["calibration"]["rows_held_out"] == 4
    curve = {point["rank"]: point["relative_error"] for point in report["curve"]}
    assert list(curve) == [4, 8, 16, 32] and curve[32] < curve[4] < 1  # more rank fits better; any fit beats none
    assert report["rank"] in curve and report["relative_error"] == curve[report["rank"]]
    assert len(report["layers"]) == 10 and all(0 <= layer["relative_error"] for layer in report["layers"])
    end_to_end = report["end_to_end"]
    assert 0 <= end_to_end["greedy_identical_share"] <= 1 and end_to_end["greedy_rows"] == 4
    assert 0 < end_to_end["mean_logit_diff"] <= end_to_end["max_logit_diff"]
    # The written adapter is what was measured: on the held-out rows plain PEFT gives the reported difference, far
    # below the base's own.
    held = [e.ids for e in calibration_examples(export_source(gelu_run), str(data))][HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(result.folder)).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ours = [exported(input_ids=torch.tensor([p])).logits[0] for p in held]
        bare = [base(input_ids=torch.tensor([p])).logits[0] for p in held]
    reference = adapter_logits(gelu_run, held)
    assert max_difference(ours, reference) == pytest.approx(end_to_end["max_logit_diff"], rel=1e-3)
    assert max_difference(ours, reference) < 0.5 * max_difference(bare, reference)
    card = (result.folder / "README.md").read_text()
    assert "activation: gelu" in card and "held-out relative error" in card


# ---- the command line: export, and publish --as ---------------------------------------------------------------------


def test_export_on_the_command_line_refuses_a_gelu_run_in_one_message(gelu_run, tmp_path, capsys):
    from denselora_app import cli

    assert cli.main(["export", str(gelu_run.path), "--to", "merged", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Run ") and "--calibration" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("form", ["lora", "merged"])
def test_publish_as_an_export_builds_a_hub_folder_with_its_fidelity(identity_run, form, tmp_path, capsys):
    from denselora_app import cli

    out = tmp_path / "repo"
    # Calibration data measures an exact export end to end too (for the lora form; the merged one is exact alone).
    measured = ["--calibration", str(calibration_rows(tmp_path / "calibration.jsonl", 16))] if form == "lora" else []
    assert cli.main(["publish", str(identity_run.path), "--repo-id", "alice/tiny-export", "--as", form,
                     "--dry-run", str(out), "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct", *measured]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"README.md", EXPORT_REPORT} <= names
    assert ({"adapter_config.json", ADAPTER_WEIGHTS[0]} if form == "lora" else {"config.json", "model.safetensors",
                                                                                 "tokenizer.json"}) <= names
    card = (out / "README.md").read_text()
    assert "# tiny-export" in card and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "exactly a rank-4 LoRA" in card
    assert ("| max logit difference |" if measured else "Exact by construction") in card
    if form == "lora":
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---- the Publish tab ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_publish_tab_builds_an_export_and_explains_a_refusal(runs_root, model_dir):
    from denselora_app.ui.publish_tab import build_model

    identity = make_run(runs_root, model_dir, "identity", "tab-identity")
    gelu = make_run(runs_root, model_dir, "gelu", "tab-gelu")
    message, card, files, _curve, _download = build_model(identity.id, "alice/tab-lora", "", None, "lora", "")
    assert "Built the repository" in message and "adapter_config.json" in files and "exactly a rank-4 LoRA" in card
    refused, *_ = build_model(gelu.id, "alice/tab-lora", "", None, "merged", "")
    assert "--calibration" in refused and "activation: identity" in refused


@pytest.mark.slow
def test_a_sharded_base_is_merged_shard_by_shard_into_the_same_layout(runs, tmp_path):
    from conftest import tiny_llama, tiny_tokenizer

    folder = tmp_path / "sharded"
    tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2).save_pretrained(folder,
                                                                                            max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(folder)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2
    run = make_run(runs, folder, "identity", "sharded")
    merged = export_run(run, "merged", tmp_path / "merged").folder
    assert sorted(p.name for p in merged.glob("*.safetensors")) == shards
    assert json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"] == \
        json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([p])).logits[0] for p in PROMPTS]
    assert max_difference(logits, adapter_logits(run)) < 1e-4


# The metadata keys of the embedded model's GGUF (written by llama.cpp's own converter), less its provenance
# (general.organization, .basename, ...) and the unknown token the tiny tokenizer lacks; reading that 100 MB file
# takes seconds, so benchmarks/export_fidelity.py compares with the file itself.
REFERENCE_KEYS = {
    "general.architecture", "general.type", "general.name", "general.file_type", "general.quantization_version",
    "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count",
    "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.model", "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
}


@pytest.mark.slow
def test_the_gguf_metadata_has_the_reference_keys(identity_run, tmp_path):
    from gguf import GGUFReader

    folder = export_run(identity_run, "gguf", tmp_path / "gguf", gguf_type="q8_0").folder
    fields = GGUFReader(next(folder.glob("*.gguf"))).fields
    assert REFERENCE_KEYS - set(fields) == set()
    assert fields["general.architecture"].contents() == "llama" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2  # <|im_end|> in the tiny tokenizer
    assert fields["tokenizer.chat_template"].contents().startswith("{% for message in messages %}")
