"""The benchmark scripts in their smallest settings: they run and write complete tables and JSON (timings unchecked)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import save_tiny_model
from numerics import causal_lm_terms, tolerance_for

from denselora_app.engine import methods

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import accuracy_smollm2  # noqa: E402
import benchlib  # noqa: E402
import convergence  # noqa: E402
import fidelity  # noqa: E402
import gpu_8b  # noqa: E402
import gpu_throughput  # noqa: E402
import packing  # noqa: E402
import speed_memory  # noqa: E402

SPEED_ARGS = ["--device", "cpu", "--model", "tiny", "--rank", "4", "--batch", "2", "--seq", "16", "--steps", "1",
              "--warmup", "1", "--repeats", "2", "--gen-batch", "2", "--prompt-len", "8", "--new-tokens", "3",
              "--gen-repeats", "1"]
PACKING_ARGS = ["--device", "cpu", "--model", "tiny", "--rank", "4", "--rows", "40", "--min-len", "4",
                "--max-len", "48", "--median-len", "12", "--batch", "3", "--steps", "2", "--warmup", "1",
                "--threads", "0"]  # 0: leave this process's torch threads as they are
FIDELITY_ARGS = ["--people", "24", "--val-people", "4", "--test-people", "4", "--hidden", "32", "--intermediate", "64",
                 "--layers", "2", "--pretrain-steps", "6", "--pretrain-batch", "4", "--adapter-steps", "2",
                 "--adapter-batch", "4", "--seeds", "2", "--lrs", "1e-3", "3e-3",
                 "--threads", "0"]  # 0: leave this process's torch threads as they are


def test_speed_memory_writes_every_arm_ratio_and_target(tmp_path, capsys):
    speed_memory.main([*SPEED_ARGS, "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "speed_memory_cpu.json").read_text())
    markdown = (tmp_path / "speed_memory_cpu.md").read_text()
    assert markdown.strip() in capsys.readouterr().out

    assert set(results["arms"]) == {"base", "lora", "denselora"}
    for arm in results["arms"].values():
        assert arm["step_time_ms"] > 0 and arm["generate_tokens_per_s"] > 0
        assert arm["step_times_measured"] == 2
        assert arm["peak_memory_bytes"] == arm["static_memory_bytes"] + arm["transient_memory_bytes"]
        assert arm["transient_memory_bytes"] > 0
        assert arm["label"] in markdown
    assert results["arms"]["base"]["trainable_params"] == 0 and results["arms"]["base"]["adapter_file_bytes"] is None
    dense, lora = results["arms"]["denselora"], results["arms"]["lora"]
    assert 0 < dense["trainable_params"] < lora["trainable_params"]
    assert 0 < dense["adapter_file_bytes"] < lora["adapter_file_bytes"]

    assert set(results["ratios"]) == {"denselora/lora", "denselora/base"}
    assert all(v is not None for v in results["ratios"]["denselora/lora"].values())
    for metric in ("step_time_ms", "peak_memory_bytes", "generate_tokens_per_s"):
        assert results["ratios"]["denselora/base"][metric] > 0
    assert "ratio denselora/lora" in markdown and "ratio denselora/base" in markdown

    assert list(results["generation"]) == ["base", "lora", "denselora", "lora_merged"]
    assert results["generation"]["base"]["ms_per_token_over_base"] == 0
    for row in results["generation"].values():
        assert row["tokens_per_s"] > 0 and f"{row['tokens_per_s']:,.1f}" in markdown
    assert len(results["targets"]) == 4
    for target in results["targets"]:
        assert isinstance(target["met"], bool)
        assert target["target"] in markdown
    assert results["command"].startswith("python ") and "--model tiny" in results["command"]
    for key in ("cpu", "logical_cores", "torch", "gpu"):
        assert key in results["machine"]


def test_packing_writes_every_arm_its_loss_curves_and_the_targets(tmp_path, capsys):
    packing.main([*PACKING_ARGS, "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "packing_cpu.json").read_text())
    markdown = (tmp_path / "packing_cpu.md").read_text()
    assert markdown.strip() in capsys.readouterr().out

    kinds, modes = ("denselora", "lora", "base"), ("padded", "grouped", "packed")
    assert set(results["arms"]) == {f"{kind}/{mode}" for kind in kinds for mode in modes}
    for key, arm in results["arms"].items():
        assert arm["real_tokens_per_s"] > 0 and arm["steps_timed"] == 2 and len(arm["losses"]) == 3
        assert arm["processed_tokens_per_s"] >= arm["real_tokens_per_s"]
        assert arm["label"] in markdown
        assert (arm["padding_share"] == 0) == key.endswith("/packed")  # packed batches carry no padding
    # Float32: step s's loss carries the rounding of s forward and backward passes over a batch of rows.
    shape = SimpleNamespace(**benchlib.MODEL_SHAPES["tiny"])
    steps, longest = len(results["arms"]["base/padded"]["losses"]), results["data"]["max"]
    batch = int(PACKING_ARGS[PACKING_ARGS.index("--batch") + 1])
    rounding = tolerance_for(1.0, terms=steps * (causal_lm_terms(shape, longest, backward=True) + batch * longest),
                             dtype=torch.float32)["rtol"]
    for kind in kinds:
        assert results["ratios"][kind]["padded/padded"] == 1
        # Same adapter initialisation, same batches: the curves agree up to float32 rounding, far inside the
        # benchmark's own tolerance.
        check = results["loss_curves"][kind]
        assert check["max_relative_difference"] < rounding < check["tolerance"] / 5
    assert 0 < results["data"]["padding_per_step"]["padding_fraction"] < 1
    assert results["data"]["min"] >= 4 and results["data"]["max"] <= 48
    assert results["flops_padded_over_packed"] > 1 and "Arithmetic: over the timed batches" in markdown
    assert len(results["targets"]) == 6
    for target in results["targets"]:
        assert isinstance(target["met"], bool) and target["target"] in markdown
    assert "| step | DenseLoRA, padded | DenseLoRA, packed | LoRA, padded |" in markdown
    assert "\n| 3 | " in markdown and "\n| 4 | " not in markdown  # one line per step, warm-up included
    assert results["command"].startswith("python ") and "--model tiny" in results["command"]


def test_fidelity_writes_every_arm_with_its_seeds(tmp_path, capsys):
    fidelity.main([*FIDELITY_ARGS, "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "fidelity_cpu.json").read_text())
    markdown = (tmp_path / "fidelity_cpu.md").read_text()
    assert markdown.strip() in capsys.readouterr().out

    labels = list(results["arms"])
    assert labels[:4] == ["DenseLoRA r8", "DenseLoRA r16", "LoRA r8", "LoRA r16"]
    assert len(labels) == 5 and labels[4].startswith("LoRA r") and "params of DenseLoRA r16" in labels[4]
    for label, arm in results["arms"].items():
        assert label in markdown
        assert [r["seed"] for r in arm["runs"]] == [0, 1]
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in arm["runs"])
        assert arm["accuracy_min"] <= arm["accuracy_mean"] <= arm["accuracy_max"]
        assert arm["trainable_params"] > 0 and arm["lr"] in (1e-3, 3e-3)
    assert results["arms"]["DenseLoRA r16"]["trainable_params"] < results["arms"]["LoRA r16"]["trainable_params"]
    swept = [(e["arm"], e["lr"]) for e in results["lr_sweep"]]
    assert swept == [(label, lr) for label in labels for lr in (1e-3, 3e-3)]
    assert "pretrained base, no adapter" in markdown
    assert 0.0 <= results["pretraining"]["fact_recall"] <= 1.0


def test_live_tensor_bytes_counts_new_storage_while_it_lives():
    weight = torch.zeros(100, 100)
    with speed_memory.LiveTensorBytes() as counter:
        view = weight.t()  # a view of existing memory: nothing new
        assert counter.live == 0
        made = torch.ones(50, 50) + 1  # a temporary of 10,000 bytes, then the result of 10,000 bytes
        assert counter.live == 10_000 and counter.peak == 20_000
        del made
        assert counter.live == 0
    assert view.shape == (100, 100)


def test_answers_are_read_as_the_first_option_named():
    options = ["cat", "dog", "owl", "goat"]
    assert fidelity.extract_answer("the correct answer is dog", options) == "dog"
    assert fidelity.extract_answer("the correct answer is catdog owl", options) == "owl"
    assert fidelity.extract_answer("the correct answer is", options) is None


@pytest.mark.parametrize("mode", ["cpu", "gpu"])
def test_modes_fill_every_setting(mode):
    args = fidelity.parse_args(["--gpu"] if mode == "gpu" else [])
    assert all(getattr(args, name) is not None for name in fidelity.PRESETS[mode])
    assert args.device == fidelity.PRESETS[mode]["device"]


def test_gpu_8b_dry_run_trains_both_stages_through_the_cli_path_and_writes_the_table(tmp_path, capsys):
    """The GPU check's --dry-run: the same code on the CPU with a tiny model; every stage trained and measured."""
    gpu_8b.main(["--dry-run", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    results = json.loads((tmp_path / "gpu_8b_dry_run.json").read_text())
    markdown = (tmp_path / "gpu_8b_dry_run.md").read_text()
    assert markdown.strip() in capsys.readouterr().out
    assert list(results["stages"]) == ["4bit", "bf16"] and results["mode"] == "dry-run"
    for label, stage in results["stages"].items():
        assert "error" not in stage, stage.get("traceback")
        assert stage["state"] == "completed" and len(stage["losses"]) == results["settings"]["steps"]
        assert stage["peak_allocated"] > 0 and stage["step_seconds"] > 0
        planner = stage["planner"]
        assert planner["total"] > planner["training"] > planner["weights"] > 0 and planner["fits"]
        assert f"| {label} | {stage['quantization']}, float32 |" in markdown
    assert results["stages"]["4bit"]["planner"]["weights"] < results["stages"]["bf16"]["planner"]["weights"]
    assert results["command"].startswith("python ") and "--dry-run" in results["command"]



@pytest.mark.slow
def test_speed_memory_times_compiled_decoding_and_reports_mfu(tmp_path):
    speed_memory.main([*SPEED_ARGS, "--compile", "--peak-tflops", "1", "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "speed_memory_cpu.json").read_text())
    markdown = (tmp_path / "speed_memory_cpu.md").read_text()
    assert list(results["generation"]) == ["base", "lora", "denselora", "lora_merged", "base_compiled",
                                           "denselora_compiled"]
    for key in ("base_compiled", "denselora_compiled"):
        assert results["generation"][key]["compile_seconds"] > 0 and results["generation"][key]["tokens_per_s"] > 0
    assert all(0 < arm["mfu"] for arm in results["arms"].values())
    assert "Training MFU: frozen base" in markdown and "DenseLoRA r4, compiled" in markdown


@pytest.mark.slow
def test_the_gpu_throughput_check_runs_its_parts_in_one_call(tmp_path):
    assert gpu_throughput.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"speed_memory_cpu.json", "packing_cpu.json"}


@pytest.mark.slow
def test_accuracy_benchmark_writes_a_complete_table_and_reuses_finished_trials(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "model", max_position_embeddings=512)  # room for the questions
    monkeypatch.setenv("DENSELORA_RUNS", str(tmp_path / "runs"))
    argv = ["--mode", "smoke", "--model", str(model), "--device", "cpu", "--work-dir", str(tmp_path / "work"),
            "--trials-dir", str(tmp_path / "trials"), "--out-dir", str(tmp_path), "--seeds", "2"]
    accuracy_smollm2.main(argv)
    results = json.loads((tmp_path / "accuracy_smollm2_smoke.json").read_text())
    markdown = (tmp_path / "accuracy_smollm2_smoke.md").read_text()
    assert set(results["arms"]) == {"denselora", "lora", "lora-matched"}  # the three arms by default
    for name, arm in results["arms"].items():
        assert len(arm["seeds"]) == 2 and len(arm["sweep"]) == 1
        assert 0.0 <= arm["mean"] <= 1.0 and arm["trainable"] > 0
        assert set(arm["seeds"][0]["test"]["per_family"]) == set(accuracy_smollm2.FAMILIES)
        assert f"| {arm['label']} |" in markdown
    assert results["arms"]["lora-matched"]["r"] < 16  # the rank with DenseLoRA r16's parameter count
    assert results["base"]["accuracy"] is not None

    # The headline the Train tab shows next to Method is the table's.
    headline = tmp_path / "headline.json"
    accuracy_smollm2.main([*argv, "--write-headline", str(headline)])
    monkeypatch.setattr(methods, "MEASURED_ACCURACY", headline)
    counts = methods.ParameterCount(total=1000, method="denselora", by_method={"denselora": 10, "lora": 40})
    shown = methods.method_comparison(counts, {"denselora": "1.0 GB", "lora": "1.2 GB"}, rank=16)
    for arm in results["arms"].values():
        assert (f"{arm['label']} ({arm['trainable']:,} parameters) **{100 * arm['mean']:.1f}%** ± "
                f"{100 * arm['std']:.1f}") in shown
    assert "**DenseLoRA r16**: 10 trainable (1%), about 1.0 GB to train" in shown and "docs/benchmarks.md" in shown

    # Every arm's sweep (seed 0) ran before any arm's second seed, so a table left unfinished shows every arm.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "trials").iterdir()}
    sweep_done = max(t for name, t in stamps.items() if name.endswith("seed0.json"))
    assert all(t > sweep_done for name, t in stamps.items() if name.endswith("seed1.json"))

    # A second sitting trains nothing: every trial is read back from its file.
    trials = sorted(stamps)
    accuracy_smollm2.main(argv)
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == trials
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "trials").iterdir()} == stamps
    assert json.loads((tmp_path / "accuracy_smollm2_smoke.json").read_text())["arms"] == results["arms"]


def test_a_trial_kept_under_other_settings_is_never_run_over(tmp_path):
    args = accuracy_smollm2.parse_args(["--mode", "smoke", "--trials-dir", str(tmp_path)])
    key = accuracy_smollm2.settings_key(args)
    accuracy_smollm2.store(args, "lora-r16-lr0.001-seed0", key, {"accuracy": 0.9})
    kept = (tmp_path / "lora-r16-lr0.001-seed0.json").read_text()
    assert accuracy_smollm2.stored(args, "lora-r16-lr0.001-seed0", key) == {"accuracy": 0.9}
    assert accuracy_smollm2.stored(args, "lora-r16-lr0.001-seed1", key) is None  # not run yet

    longer = accuracy_smollm2.parse_args(["--mode", "smoke", "--trials-dir", str(tmp_path), "--steps", "400"])
    with pytest.raises(SystemExit, match="--trials-dir"):  # before training, not after 20 minutes of it
        accuracy_smollm2.stored(longer, "lora-r16-lr0.001-seed0", accuracy_smollm2.settings_key(longer))
    assert (tmp_path / "lora-r16-lr0.001-seed0.json").read_text() == kept


def test_a_sweep_goes_on_past_its_listed_rates_while_its_best_is_at_an_end():
    peaks = {"high": 3e-2, "inside": 3e-3, "low": 1e-4}  # where each arm's validation accuracy is best
    order = []

    def trial(name: str, lr: float) -> dict:
        order.append((name, lr))
        return {"lr": lr, "val": {"accuracy": 1 / (1 + abs(math.log10(lr / peaks[name])))}, "final_loss": 0.1}

    listed = {"high": [3e-3, 1e-3, 1e-2], "inside": [3e-3, 1e-3, 1e-2], "low": [1e-3, 3e-4]}
    sweeps = accuracy_smollm2.sweep_rates(listed, trial, extend=2)
    assert [t["lr"] for t in sweeps["high"]] == [3e-3, 1e-3, 1e-2, 3e-2, 1e-1]  # 1e-1 is worse: the peak is seen
    assert [t["lr"] for t in sweeps["inside"]] == [3e-3, 1e-3, 1e-2]
    assert [t["lr"] for t in sweeps["low"]] == [1e-3, 3e-4, 1e-4, 3e-5]
    assert {accuracy_smollm2.best_trial(sweeps[name])["lr"] for name in peaks} == set(peaks.values())
    assert set(order[:8]) == {(n, lr) for n, rates in listed.items() for lr in rates}  # listed rates first
    assert accuracy_smollm2.sweep_rates(listed, trial, extend=0)["high"][-1]["lr"] == 1e-2
    assert accuracy_smollm2.grid_neighbour(1e-2, up=True) == 3e-2 and accuracy_smollm2.grid_neighbour(
        3e-4, up=False) == 1e-4


def test_accuracy_task_holds_out_test_words_and_questions(tmp_path):
    accuracy_smollm2.make_task(tmp_path, train_rows=300, val_per_family=10, test_per_family=20)
    train = [json.loads(line)["messages"][0]["content"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    train_words, held_out = accuracy_smollm2.split_words(0)
    for row in test:
        if row["family"] in ("category", "odd-one-out"):
            assert not any(c in words for c in row["choices"] for words in train_words.values())
        assert not any(row["question"] in prompt and all(c in prompt for c in row["choices"]) for prompt in train)

    # Replies name the right option's text by default ("largest" shows it is the right one), or its label.
    rows = [json.loads(line)["messages"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    largest = [(re.findall(r"^Answer\d: (\d+)$", user["content"], re.M), reply["content"]) for user, reply in rows
               if "largest" in user["content"]]
    assert largest and all(reply == f"the correct answer is {max(options, key=int)}" for options, reply in largest)
    accuracy_smollm2.make_task(tmp_path / "label", train_rows=10, val_per_family=1, test_per_family=1, replies="label")
    replies = [json.loads(line)["messages"][1]["content"] for line in (tmp_path / "label" / "train.jsonl").open()]
    assert all(re.fullmatch(r"the correct answer is answer[1-4]", reply) for reply in replies)


def test_convergence_study_writes_every_variant_and_reuses_finished_trials(tmp_path):
    argv = ["--seeds", "2", "--steps", "3", "--variants", "baseline", "lr 6e-3", "shared E, D at 4x the rate",
            "--trials-dir", str(tmp_path / "trials"), "--cache-dir", str(tmp_path / "cache"), "--out-dir",
            str(tmp_path), "--fidelity-args", *FIDELITY_ARGS[:-3], "--threads", "0"]
    convergence.main(argv)
    results = json.loads((tmp_path / "convergence_cpu.json").read_text())
    assert list(results["variants"]) == ["baseline", "lr 6e-3", "shared E, D at 4x the rate"]
    for variant in results["variants"].values():
        assert len(variant["runs"]) == 2 and all(len(r["loss_every_50"]) == 1 for r in variant["runs"])
    assert "| shared E, D at 4x the rate | " in (tmp_path / "convergence_cpu.md").read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "trials").iterdir()}
    convergence.main(argv)  # a second sitting trains nothing
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "trials").iterdir()} == stamps


@pytest.mark.slow
def test_the_multi_process_benchmark_runs_each_arm_through_torchrun_and_writes_its_tables(tmp_path, capsys):
    import gpu_multi

    args = ["--device", "cpu", "--shape", "tiny", "--processes", "1", "--batch", "1", "--cutoff", "32", "--steps",
            "2", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]
    gpu_multi.main_for(gpu_multi.__file__, "gpu_multi", gpu_multi.parse_args, gpu_multi.run, gpu_multi.render, args)
    results = json.loads((tmp_path / "out" / "gpu_multi_cpu.json").read_text())
    assert [arm["arm"] for arm in results["arms"]] == ["ddp", "fsdp"]
    for arm in results["arms"]:
        assert arm["returncode"] == 0 and len(arm["losses"]) == 2 and arm["peak_rss_per_process"][0] > 0
        assert arm["planner_per_process"] > 0 and arm["planner_error_percent"] is not None
    assert {(row["arm"], row["gpus"]) for row in results["largest_fitting"]} == {
        (arm, gpus) for arm in ("ddp", "fsdp", "fsdp-4bit") for gpus in (2, 4, 8)}
    assert "| fsdp |" in capsys.readouterr().out


@pytest.mark.slow
def test_the_serving_benchmark_writes_every_row_and_where_evaluation_time_goes(tmp_path):
    import serving

    serving.main(["--model", "tiny", "--clients", "1", "2", "--requests", "1", "--new-tokens", "3",
                  "--eval-questions", "2", "--no-transformers-cb", "--out-dir", str(tmp_path)])
    (written,) = tmp_path.glob("serving_*.json")
    results = json.loads(written.read_text())
    assert {(row["model"], row["clients"]) for row in results["throughput"]} == {
        (model, clients) for model in ("base", "adapter") for clients in (1, 2)}
    evaluation = results["evaluation"]
    assert evaluation["questions"] == 2 and evaluation["prefill_batched_seconds"] > 0
    assert evaluation["prompt_tokens_mean"] > 0 and "The prompts alone" in written.with_suffix(".md").read_text()
