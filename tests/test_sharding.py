"""Beyond one process and one chart: fsdp (PyTorch FSDP2 through the Trainer) on CPU processes, its memory plan per
process, a two-node launch simulated on this machine, the experiment trackers of report_to, and what is refused
before a run exists (DeepSpeed, a quantized base that cannot be sharded here, a tracker that is not installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_run_config

from denselora_app.config import ConfigError, RunConfig
from denselora_app.engine.launch import LaunchError, launch, resume_run
from denselora_app.engine.memory import plan_memory
from denselora_app.engine.methods import check_adapter
from denselora_app.engine.worker import execute
from denselora_app.runs import list_runs, mark_checkpoint_complete

REPO = Path(__file__).parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"


# ---- refused before anything exists ---------------------------------------------------------------------------------


def test_deepspeed_is_refused_by_name_with_fsdp_offered():
    with pytest.raises(ConfigError, match="deepspeed is not supported: .*fsdp: true"):
        RunConfig.from_dict({"deepspeed": "zero3.json"})
    with pytest.raises(ConfigError, match="deepspeed is not supported"):
        RunConfig().with_overrides(["deepspeed=zero3.json"])


def test_report_to_takes_tracker_names_and_none():
    assert RunConfig(report_to="tensorboard,wandb").report_to == ["tensorboard", "wandb"]
    assert RunConfig(report_to="none").report_to == [] and RunConfig().report_to == []
    assert RunConfig.from_dict(RunConfig(report_to=["mlflow"]).to_dict()).report_to == ["mlflow"]
    with pytest.raises(ConfigError, match="report_to takes names from tensorboard, wandb, mlflow, trackio"):
        RunConfig(report_to=["comet"])


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "trackio"])
def test_a_tracker_that_is_not_installed_is_refused_before_the_run_exists(app_model_dir, app_data_file, runs_root,
                                                                          tracker):
    import importlib.util

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(LaunchError, match=f"report_to names {tracker}, which is not installed here: pip install "
                                          f"{tracker}"):
        launch(tiny_run_config(app_model_dir, app_data_file, report_to=[tracker, "tensorboard"]), background=False)
    assert list_runs(runs_root) == []


@pytest.mark.parametrize(("quantization", "why"), [("4bit", "a 4bit base under fsdp needs CUDA"),
                                                   ("8bit", "an 8bit base cannot be sharded")])
def test_a_quantized_base_that_cannot_be_sharded_here_is_refused(app_model_dir, app_data_file, runs_root,
                                                                  quantization, why):
    with pytest.raises(LaunchError, match=why):
        launch(tiny_run_config(app_model_dir, app_data_file, fsdp=True, quantization=quantization),
               background=False)
    assert list_runs(runs_root) == []


# ---- the memory plan per process -------------------------------------------------------------------------------------


def _plan(fsdp: bool, processes: int, device: str = "cuda:0", free: int | None = None, **settings):
    from transformers import LlamaConfig

    model_config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                               num_attention_heads=32, num_key_value_heads=4)
    cfg = RunConfig(fsdp=fsdp, device=device.split(":")[0], batch_size=1, cutoff_len=512, **settings)
    return plan_memory(model_config, cfg, check_adapter(model_config, cfg), device, free, processes=processes)


def test_with_fsdp_each_process_plans_its_share_of_the_weights_plus_one_layer():
    whole, sharded = _plan(False, 4), _plan(True, 4)
    layer = whole.weights / 22
    assert sharded.weights == pytest.approx(whole.weights / 4 + layer, rel=1e-3)
    assert sharded.adapter == pytest.approx(whole.adapter / 4, rel=1e-3)
    assert sharded.activations == whole.activations  # each process computes its own rows
    assert _plan(False, 4).weights == _plan(False, 1).weights  # DDP: every process holds the whole base
    assert "per process (4 processes, fsdp)" in sharded.summary()


def test_processes_on_one_cpu_share_its_memory():
    one, two = _plan(False, 1, "cpu"), _plan(False, 2, "cpu")
    assert two.on_device == 2 * two.total and one.on_device == one.total
    assert "in all" in two.summary()


def test_a_run_too_large_for_one_gpu_is_told_how_many_it_fits_on_with_fsdp():
    alone = _plan(False, 1, free=_plan(True, 4).total + 2**28)  # room for a quarter of the weights, not half
    assert not alone.fits
    shard = next(s for s in alone.suggestions() if "fsdp" in s.settings)
    assert shard.settings == {"fsdp": True} and "on 4 GPUs: torchrun --nproc_per_node 4" in shard.note


# ---- training over processes -------------------------------------------------------------------------------------


def _same_rows(tmp_path: Path) -> Path:
    """Rows that are all alike: any split over processes and any order gives the same batches, so the losses of a
    sharded run over 2 processes and of one process with twice the batch must agree."""
    data = tmp_path / "same.jsonl"
    row = json.dumps({"instruction": "Say the code word.", "output": "The code word is blue."})
    data.write_text(f"{row}\n" * 32)
    return data


def _train(command: list[str], runs: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DENSELORA_RUNS": str(runs), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def _losses(run) -> list[float]:
    return [row["loss"] for row in run.metrics() if "loss" in row]


@pytest.mark.slow
def test_fsdp_over_two_cpu_processes_trains_one_run_with_the_losses_of_one_process(app_model_dir, tmp_path):
    data = _same_rows(tmp_path)
    sharded, single = tmp_path / "sharded.yaml", tmp_path / "single.yaml"
    tiny_run_config(app_model_dir, data, batch_size=2, fsdp=True, run_name="sharded").to_yaml(sharded)
    tiny_run_config(app_model_dir, data, batch_size=4, run_name="single").to_yaml(single)
    runs = tmp_path / "runs"
    result = _train([str(TORCHRUN), "--nproc_per_node", "2", "-m", "denselora_app", "train", str(sharded)], runs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _train([sys.executable, "-m", "denselora_app", "train", str(single)], runs).returncode == 0
    by_name = {run.config().run_name: run for run in list_runs(runs)}
    assert sorted(by_name) == ["sharded", "single"], "the two ranks must share one run folder"
    run = by_name["sharded"]
    assert run.status().state == "completed" and run.config().fsdp is True
    assert "trained sharded over 2 processes (FSDP2)" in run.log_path.read_text()
    assert _losses(run) == pytest.approx(_losses(by_name["single"]), abs=1e-5) and len(_losses(run)) == 4

    # The saved adapter is one whole PEFT adapter: it loads in one process and answers.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import denselora_app.denselora  # noqa: F401  (registers the method with PEFT)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(app_model_dir), run.adapter_dir)
    single_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(app_model_dir),
                                               by_name["single"].adapter_dir)
    ids = torch.tensor([[1, 5, 9, 12]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)
    torch.testing.assert_close(model(ids).logits, single_adapter(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_two_nodes_simulated_on_this_machine_train_one_run(app_model_dir, app_data_file, tmp_path):
    """Two torchrun launchers, one process each, meeting at a rendezvous on localhost, as two machines would."""
    config = tmp_path / "two-nodes.yaml"
    tiny_run_config(app_model_dir, app_data_file, fsdp=True, run_name="two-nodes").to_yaml(config)
    runs, port = tmp_path / "runs", free_port()
    env = {**os.environ, "DENSELORA_RUNS": str(runs), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([str(TORCHRUN), "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
                               "-m", "denselora_app", "train", str(config)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    (run,) = list_runs(runs)
    assert run.status().state == "completed" and run.has_adapter()


# ---- experiment trackers -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tensorboard_gets_the_losses_of_metrics_jsonl_inside_the_run_folder(app_model_dir, app_data_file, runs_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = launch(tiny_run_config(app_model_dir, app_data_file, report_to=["tensorboard"]), background=False)
    before = dict(os.environ)
    assert execute(run) == "completed"
    assert dict(os.environ) == before
    folder = run.trackers_dir / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*")), "no TensorBoard event file in the run folder"
    events = EventAccumulator(str(folder))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    expected = [(row["step"], row["loss"]) for row in run.metrics() if "loss" in row]
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_a_sharded_run_resumes_only_under_the_world_size_that_saved_it(app_model_dir, app_data_file, runs_root):
    run = launch(tiny_run_config(app_model_dir, app_data_file, fsdp=True), background=False)
    checkpoint = run.checkpoints_dir / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    for rank in (0, 1):  # what the Trainer leaves in a checkpoint of 2 processes, besides the adapter
        (checkpoint / f"rng_state_{rank}.pth").write_bytes(b"")
    (checkpoint / "adapter_config.json").write_text("{}")
    mark_checkpoint_complete(checkpoint)
    run.update_status(state="stopped", pid=None)
    with pytest.raises(LaunchError, match=r"saved by 2 training processes with fsdp, and this resume has 1: .*"
                                          r"torchrun --nproc_per_node 2"):
        resume_run(run, background=False)
    assert run.status().state == "stopped"
