"""shoptune plan: the arithmetic on the paper's numbers and the demo's measured bytes, and the
command as a user runs it (exit status, one line per reason, a missing config.json)."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from shoptune import UserError, host_needs, model_shape, params, plan
from tests.conftest import ROOT, shoptune

GIB = 2**30

# Qwen2-72B-Instruct's public config.json (the values the plan reads).
QWEN2_72B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "model_type": "qwen2",
}
# What the demo's stages wrote (runs/demo/*/metrics.json and the safetensors files of a `make demo`):
# the merged 16-bit tiny model and its AWQ model, safetensors headers included.
DEMO_MERGED_BYTES = 39_625_728
DEMO_AWQ_BYTES = 39_158_960


@pytest.fixture
def qwen2_72b(tmp_path):
    path = tmp_path / "Qwen2-72B-Instruct" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(QWEN2_72B))
    return path


def shape(**changes):
    return dataclasses.replace(model_shape.shape_from_config(QWEN2_72B, "test"), **changes)


def profile(name="paper"):
    return params.load_profile(name, ROOT / "params.yaml")


def test_qwen2_72b_has_72_7b_parameters_and_145_gb_in_16_bits():
    assert model_shape.parameter_count(shape()) == 72_706_203_648  # "72.7B" on the model card
    assert model_shape.dense_bytes(shape()) / 1e9 == pytest.approx(145.4, abs=0.1)


def test_29568_does_not_split_into_awq_groups_at_tp_4_and_29696_does():
    before = {c.name: c for c in plan.shard_checks(shape(), 4, 128)}
    assert not before["intermediate_size"].ok
    assert "7392 per GPU: not whole AWQ groups (7392 % 128 = 96)" in before["intermediate_size"].detail
    padded = model_shape.padded_size(29568, 128, 4)
    assert padded == 29696
    after = plan.shard_checks(shape(intermediate_size=padded), 4, 128)
    assert all(c.ok for c in after), [c.detail for c in after if not c.ok]
    assert "7424 per GPU = 58 x 128" in {c.name: c for c in after}["intermediate_size"].detail


def test_heads_that_do_not_divide_fail():
    checks = {c.name: c for c in plan.shard_checks(shape(), 3, 128)}
    assert not checks["attention heads"].ok and "64 % 3 = 1" in checks["attention heads"].detail
    assert not checks["KV heads"].ok
    replicated = {c.name: c for c in plan.shard_checks(shape(), 16, 128)}["KV heads"]
    assert replicated.ok and "each on 2 GPUs" in replicated.detail


def test_awq_size_is_the_teams_38_74():
    """The team's file, 38.74: that is GiB (du, Kaggle), our 41.6e9 bytes. Tolerance 0.5 %: the
    file adds only safetensors headers (well under 1 MB) to the tensors counted here."""
    size = model_shape.awq_bytes(shape(intermediate_size=29696), w_bit=4, group_size=128)
    assert size / GIB == pytest.approx(38.74, rel=0.005)
    assert size / 1e9 == pytest.approx(41.6, abs=0.1)


def test_awq_per_t4_at_tp_4_is_about_9_8_gib():
    """vLLM reports about 9.8 GiB of weights per T4; ours is 9.69. Tolerance 3 %: vLLM's figure
    also holds its own buffers (rotary cos/sin cache and the like) and is quoted to 0.1."""
    per_gpu = model_shape.per_gpu_bytes(shape(intermediate_size=29696), 4, awq=(4, 128))
    assert per_gpu / GIB == pytest.approx(9.8, rel=0.03)
    assert per_gpu < 14.75 * GIB * 0.9  # leaves room for a KV cache on a T4


def test_the_arithmetic_matches_the_bytes_the_demo_wrote():
    tiny = model_shape.shape_from_config(
        model_shape.tiny_model_config(params.read_params(ROOT / "params.yaml")["tiny_model"]), "tiny"
    )
    assert model_shape.dense_bytes(tiny) == pytest.approx(DEMO_MERGED_BYTES, rel=1e-3)
    padded = tiny.padded(model_shape.padded_size(tiny.intermediate_size, 128, 2))
    assert padded.intermediate_size == 512
    assert model_shape.awq_bytes(padded, 4, 128) == pytest.approx(DEMO_AWQ_BYTES, rel=1e-3)


def test_kv_cache_bytes_per_token():
    assert model_shape.kv_bytes_per_token(shape(), 2) == 2 * 80 * 8 * 128 * 2 == 327_680


def test_the_paper_profile_fits_4_t4s_and_one_48_gb_gpu(qwen2_72b):
    result = plan.make_plan("paper", profile(), model_shape.read_config(qwen2_72b), str(qwen2_72b))
    checks = {c.name: c for c in result.checks}
    assert checks["KV cache"].ok and "8 sequences of 4096" in checks["KV cache"].detail
    assert result.data["kv_cache"]["bytes_per_token_per_gpu"] == 81_920
    training = result.data["training"]
    assert checks["training memory"].ok
    assert training["total_bytes"] <= 47.5 * GIB  # a 48 GB card reports 47.99 GiB
    assert 0.5 <= training["parts"]["base_weights"] / result.data["parameters"] <= 0.6  # NF4 + 16-bit embeddings
    assert training["lora_parameters"] == 80 * 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 29568))
    assert all(c.ok for c in result.checks if c.name.startswith("TP ")) and checks["disk"].ok


def test_quantize_fits_the_paper_host_with_its_layer_by_layer_check(qwen2_72b):
    """stages/quantize.py holds the 16-bit model in host RAM for AutoAWQ (about 141 GiB for 72B);
    its check runs one layer at a time, so the whole paper plan fits (a whole-model float32 check
    would have needed about 900 GiB)."""
    result = plan.make_plan("paper", profile(), model_shape.read_config(qwen2_72b), str(qwen2_72b))
    assert result.failures == []
    assert 135 * GIB < result.stages["quantize"].ram_bytes < 160 * GIB


def training_plan(qwen2_72b, gpu_gib, **finetune):
    paper = profile()
    changed = dataclasses.replace(
        paper,
        finetune=dataclasses.replace(paper.finetune, **finetune),
        hardware=dataclasses.replace(paper.hardware, train_gpu_memory_gib=gpu_gib),
    )
    return plan.make_plan("paper", changed, model_shape.read_config(qwen2_72b), str(qwen2_72b))


def test_fsdp_shards_72b_qlora_over_24_gb_gpus_where_one_process_and_ddp_do_not_fit(qwen2_72b):
    """trl's QLoRA of Qwen2-72B: one 24 GB card cannot hold the 38 GiB NF4 base, nor can DDP (a
    whole model per GPU); FSDP over 8 divides the base and the LoRA state by 8 and gathers two
    layers and the embeddings whole, which fits at batch 1."""
    fsdp = "configs/accelerate/fsdp_qlora.yaml"
    one = training_plan(qwen2_72b, 23.5, backend="trl", per_device_train_batch_size=1)
    ddp = training_plan(qwen2_72b, 23.5, backend="trl", per_device_train_batch_size=1, num_processes=8)
    sharded = training_plan(
        qwen2_72b, 23.5, backend="trl", per_device_train_batch_size=1, num_processes=8, accelerate_config=fsdp
    )
    memory = {name: {c.name: c for c in p.checks}["training memory"] for name, p in (("one", one), ("ddp", ddp))}
    assert not memory["one"].ok
    assert "or shard the model over GPUs (configs/accelerate/fsdp_qlora.yaml)" in memory["one"].detail
    assert not memory["ddp"].ok and "on each GPU of 23.5 GiB" in memory["ddp"].detail
    assert sharded.failures == [], sharded.failures
    parts = {name: p.data["training"]["parts"] for name, p in (("one", one), ("ddp", ddp), ("fsdp", sharded))}
    assert parts["fsdp"]["base_weights"] == pytest.approx(parts["one"]["base_weights"] / 8, abs=1)
    assert parts["ddp"]["base_weights"] == parts["one"]["base_weights"] and parts["ddp"]["gathered_weights"] == 0
    assert parts["ddp"]["lora"] > parts["one"]["lora"] > parts["fsdp"]["lora"]  # DDP's buckets; a shard each
    assert sharded.data["training"]["layout"] == "FSDP" and ddp.data["training"]["layout"] == "DDP"
    text = plan.render(sharded)
    assert "training (finetune: QLoRA, NF4 base, each of 8 GPUs):" in text
    assert "trl, 8 processes, FSDP: weights, LoRA and optimizer state divided by 8" in text
    assert "1 x max_seq_length 2048 = 2,048 tokens per forward; 32 rows per optimizer step" in text
    assert "train: 8 GPUs x 23.5 GiB" in text


def test_offloading_the_sharded_weights_moves_them_to_host_ram(qwen2_72b, tmp_path, monkeypatch):
    """fsdp_offload_params: true, even on one GPU: the NF4 base waits in host RAM, the GPU holds what is
    gathered; 72B QLoRA then fits one 24 GB card, and the host holds the 38 GiB base."""
    fsdp = yaml.safe_load((ROOT / "configs/accelerate/fsdp_qlora.yaml").read_text())
    fsdp["fsdp_config"]["fsdp_offload_params"] = True
    (tmp_path / "configs/accelerate").mkdir(parents=True)
    (tmp_path / "configs/accelerate/offload.yaml").write_text(yaml.safe_dump(fsdp))
    monkeypatch.chdir(tmp_path)
    one = training_plan(
        qwen2_72b,
        23.5,
        backend="trl",
        per_device_train_batch_size=1,
        accelerate_config="configs/accelerate/offload.yaml",
    )
    assert one.failures == [], one.failures
    training = one.data["training"]
    assert training["parts"]["base_weights"] == 0 and training["layout"] == "FSDP"
    assert 38 * GIB < training["offloaded_weights_bytes"] < 39 * GIB
    assert "trl, 1 process, FSDP: the weights in host RAM (38.4 GiB) between uses" in plan.render(one)


def test_unsloth_offloads_its_checkpoints_to_host_ram_and_trl_merges_there(qwen2_72b):
    """unsloth keeps each layer's input in host RAM (per process), trl on the GPU; trl's merge
    reloads the base in 16 bits in host RAM, which is finetune's peak for a 72B model."""
    unsloth = training_plan(qwen2_72b, 47.5, num_processes=2)
    trl = training_plan(qwen2_72b, 47.5, backend="trl")
    offloaded = unsloth.data["training"]["offloaded_checkpoints_bytes"]
    assert offloaded == 80 * 2 * 2048 * 8192 * 2 and trl.data["training"]["offloaded_checkpoints_bytes"] == 0
    runtime, shard = host_needs.RUNTIME_BYTES, host_needs.SHARD_BYTES
    assert unsloth.stages["finetune"].ram_bytes == 2 * (runtime + offloaded) + 2 * shard
    assert trl.stages["finetune"].ram_bytes == host_needs.RUNTIME_BYTES + model_shape.dense_bytes(shape())
    assert "trl's backend reloads the base in 16 bits" in trl.stages["finetune"].ram_why
    assert trl.data["training"]["parts"]["logits"] > 3 * unsloth.data["training"]["parts"]["logits"]


def test_bfloat16_on_a_t4_fails(qwen2_72b):
    paper = profile()
    paper = dataclasses.replace(paper, infer=dataclasses.replace(paper.infer, dtype="bfloat16"))
    result = plan.make_plan("paper", paper, model_shape.read_config(qwen2_72b), str(qwen2_72b))
    assert any("bfloat16 needs compute capability >= 8" in c.detail for c in result.failures)


def test_pipeline_parallel_over_two_nodes_of_4_t4s(qwen2_72b):
    """TP 4 x PP 2 over Ray: 8 GPUs wanted; each holds half the layers, so the KV cache per GPU
    halves per token and twice the tokens fit; 4 GPUs in all is one node short."""
    paper = profile()
    infer = dataclasses.replace(paper.infer, pipeline_parallel_size=2, distributed_executor_backend="ray")
    two_nodes = dataclasses.replace(paper.hardware, infer_gpus=8)
    config = model_shape.read_config(qwen2_72b)
    one = plan.make_plan("paper", paper, config, str(qwen2_72b))
    two = plan.make_plan("paper", dataclasses.replace(paper, infer=infer, hardware=two_nodes), config, str(qwen2_72b))
    assert two.data["kv_cache"]["bytes_per_token_per_gpu"] == 81_920 // 2
    assert two.data["inference"]["pipeline_parallel_size"] == 2
    assert two.data["inference"]["kv_tokens"] > 2 * one.data["inference"]["kv_tokens"]  # and the weights halve
    assert "the 80 layers in 2 stages of 4 GPUs (8 GPUs in all, ray executor" in plan.render(two)
    short = plan.make_plan("paper", dataclasses.replace(paper, infer=infer), config, str(qwen2_72b))
    assert any("tensor parallel 4 x pipeline parallel 2 needs 8 GPUs" in c.detail for c in short.failures)


def test_the_multi_node_params_reach_the_engine_unchanged(stage_python):
    """infer's pipeline_parallel_size and distributed_executor_backend become vLLM's LLM(...) arguments
    of the same names, which vLLM 0.32's EngineArgs (the infer environment's) has."""
    import subprocess

    from shoptune.inference import engine_arguments

    infer = dataclasses.replace(profile().infer, pipeline_parallel_size=2, distributed_executor_backend="ray")
    arguments = engine_arguments(Path("runs/paper/quantize/model"), True, infer, 4)
    assert arguments["pipeline_parallel_size"] == 2 and arguments["distributed_executor_backend"] == "ray"
    assert arguments["tensor_parallel_size"] == 4 and arguments["quantization"] == "awq"
    assert "pipeline_parallel_size" not in engine_arguments(Path("m"), False, profile("demo").infer, 1)
    code = "import dataclasses, json; from vllm.engine.arg_utils import EngineArgs; " + (
        "print(json.dumps([f.name for f in dataclasses.fields(EngineArgs)]))"
    )
    fields = json.loads(subprocess.run([stage_python("infer"), "-c", code], capture_output=True, check=True).stdout)
    assert set(arguments) <= set(fields)


def test_ray_pipeline_gets_one_stage_of_gpus_here_and_no_container(monkeypatch):
    from shoptune import runner

    paper = profile()
    on_one_node = dataclasses.replace(paper, infer=dataclasses.replace(paper.infer, pipeline_parallel_size=2))
    over_ray = dataclasses.replace(
        on_one_node, infer=dataclasses.replace(on_one_node.infer, distributed_executor_backend="ray")
    )
    assert runner.gpus_for("infer", on_one_node) == 8 and runner.gpus_for("infer", over_ray) == 4
    with pytest.raises(UserError, match="a container cannot join the nodes' Ray cluster"):
        runner.run("infer", ["--profile", "paper"], "docker", "paper", over_ray)


def test_dvc_cache_copies_unless_it_can_link():
    assert host_needs.cache_copies(None) and host_needs.cache_copies("reflink,copy")  # DVC's default, on ext4
    assert not host_needs.cache_copies("reflink,hardlink,symlink")
    assert not host_needs.cache_copies("reflink,hardlink,copy")
    assert host_needs.cache_copies("reflink,hardlink,copy", same_filesystem=False)  # no hardlink across filesystems
    assert not host_needs.cache_copies("hardlink,symlink", same_filesystem=False)


def test_the_dvc_cache_counts_in_the_disk_needed(qwen2_72b):
    config = model_shape.read_config(qwen2_72b)
    copies = plan.make_plan("paper", profile(), config, "c", cache_type=None)
    links = plan.make_plan("paper", profile(), config, "c", cache_type="reflink,hardlink,symlink")
    assert links.needs()["cache_bytes"] == 0
    models = (
        model_shape.dense_bytes(config)
        + model_shape.dense_bytes(config.padded(29696))
        + copies.data["weights"]["awq_bytes"]
    )
    assert copies.needs()["cache_bytes"] == models  # a copy of finetune's, pad's and quantize's models
    # the workspace: the base model, the three models, LoRA checkpoints while training
    workspace = model_shape.dense_bytes(config) + models + copies.stages["finetune"].scratch_bytes
    assert copies.needs()["workspace_bytes"] == links.needs()["workspace_bytes"] == workspace


def test_a_config_without_a_key_names_it(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**QWEN2_72B, "hidden_size": None}))
    with pytest.raises(UserError, match=r"config.json: hidden_size: expected a positive integer"):
        model_shape.read_config(path)


# ---------------------------------------------------------------- the command


def project(tmp_path, old=None, new=None):
    """A folder with the repository's params.yaml (one line changed) and no models."""
    text = (ROOT / "params.yaml").read_text()
    if old is not None:
        start = text.index("  paper:")
        assert old in text[start:], old
        text = text[:start] + text[start:].replace(old, new, 1)
    folder = tmp_path / "project"
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(text)
    return folder


def test_plan_paper_prints_the_figures(qwen2_72b, tmp_path):
    result = shoptune("plan", "--profile", "paper", "--config", str(qwen2_72b), cwd=project(tmp_path), check=False)
    out = result.stdout
    assert "the pad stage makes it 29696" in out and "7424 per GPU = 58 x 128" in out
    assert "41.6 GB (38.7 GiB); 9.7 GiB per GPU at TP 4" in out
    assert "327,680 bytes per token (float16), 81,920 per GPU" in out
    assert "Traceback" not in result.stderr
    assert result.returncode == 0 and result.stderr == ""  # the paper's recipe fits its hardware
    data = json.loads(
        shoptune(
            "plan", "--profile", "paper", "--config", str(qwen2_72b), "--json", cwd=project(tmp_path / "j"), check=False
        ).stdout
    )
    assert data["kv_cache"]["bytes_per_token"] == 327_680 and data["weights"]["padded_intermediate_size"] == 29696
    assert data["fits"] is True


@pytest.mark.parametrize(
    ("args", "old", "new", "reason"),
    [
        (["--tensor-parallel-size", "3"], None, None, "num_attention_heads 64 does not split over 3 GPUs (64 % 3 = 1)"),
        (["--tensor-parallel-size", "8"], None, None, "tensor parallel 8 needs 8 GPUs; "),
        ([], "max_model_len: 4096", "max_model_len: 40000", "infer.max_model_len 40000 is longer than the model's"),
        ([], "max_model_len: 4096", "max_model_len: 32768", None),  # fits, one sequence
        ([], "per_device_train_batch_size: 2 ", "per_device_train_batch_size: 8 ", "finetune needs"),
        ([], "dtype: float16 ", "dtype: bfloat16 ", "infer.dtype bfloat16 needs compute capability >= 8"),
    ],
)
def test_what_does_not_fit_is_one_line_and_exit_1(qwen2_72b, tmp_path, args, old, new, reason):
    folder = project(tmp_path, old, new)
    result = shoptune("plan", "--profile", "paper", "--config", str(qwen2_72b), *args, cwd=folder, check=False)
    lines = result.stderr.splitlines()
    if reason is None:  # fits
        assert result.returncode == 0 and lines == []
        return
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert all(line.startswith("shoptune: plan: paper: ") for line in lines)
    assert any(reason in line for line in lines), lines


def test_max_model_len_beyond_the_kv_cache_does_not_fit_one_sequence(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**QWEN2_72B, "max_position_embeddings": 131072}))
    folder = project(tmp_path, "max_model_len: 4096", "max_model_len: 65536")
    result = shoptune("plan", "--profile", "paper", "--config", str(config), cwd=folder, check=False)
    assert result.returncode == 1
    assert "infer.max_model_len 65536 does not fit one sequence: the KV cache holds 33,920 tokens" in result.stderr


def test_a_missing_config_is_one_line_naming_the_path_and_the_option(tmp_path):
    result = shoptune("plan", "--profile", "paper", cwd=project(tmp_path), check=False)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "models/Qwen2-72B-Instruct/config.json: no such file" in line and "--config" in line


def test_the_demo_plans_from_params_before_the_tiny_model_exists(tmp_path):
    result = shoptune("plan", "--profile", "demo", cwd=project(tmp_path), check=False)
    assert result.returncode == 0, result.stderr
    assert "not built yet: read from params.yaml tiny_model" in result.stdout
    assert "the pad stage makes it 512" in result.stdout and "fits its hardware" in result.stdout


def test_the_demo_plan_passes_in_the_repository():
    result = shoptune("plan", "--profile", "demo")
    assert "plan: the demo profile fits its hardware" in result.stdout


def test_a_typo_in_the_hardware_section_names_the_key(tmp_path):
    folder = project(tmp_path, "      infer_gpus: 4", "      infer_gpu: 4")
    with pytest.raises(UserError, match=r"profiles.paper.hardware.infer_gpu: unknown key"):
        params.load_profile("paper", folder / "params.yaml")
    result = shoptune("plan", "--profile", "paper", cwd=folder, check=False)
    assert result.returncode == 2 and "hardware.infer_gpu: unknown key" in result.stderr


def test_negative_hardware_is_named(qwen2_72b, tmp_path):
    folder = project(tmp_path, "      infer_gpus: 4", "      infer_gpus: -1")
    result = shoptune("plan", "--profile", "paper", "--config", str(qwen2_72b), cwd=folder, check=False)
    assert result.returncode == 2
    assert "profiles.paper.hardware.infer_gpus: expected 0 or more, got -1" in result.stderr
