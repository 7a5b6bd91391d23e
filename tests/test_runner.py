"""The runner's pieces that need no engine (the builds and containers themselves: test_docker.py)."""

from pathlib import Path

import pytest

from shoptune import UserError, cli, containers, environments, runner


def test_every_stage_has_an_environment_with_both_locks():
    for stage, image in runner.IMAGES.items():
        for accelerator in environments.ACCELERATORS:
            assert environments.lock_path(image, accelerator).is_file(), stage


def test_image_tags_follow_the_lock_the_base_and_the_accelerator(monkeypatch):
    tag = containers.image_tag("data", "cpu")
    assert tag.startswith("shoptune/data:") and containers.image_tag("data", "cpu") == tag
    assert containers.image_tag("data", "cuda").startswith("shoptune/data-cuda:")
    monkeypatch.setenv("SHOPTUNE_BASE_IMAGE", "some/cuda-base:1")
    assert containers.image_tag("data", "cpu") != tag


def test_unknown_stage_runner_and_accelerator_are_user_errors():
    with pytest.raises(UserError, match="unknown stage 'train'"):
        runner.image_of("train")
    with pytest.raises(UserError, match="unknown runner 'ssh'"):
        runner.run("clean", [], "ssh")
    with pytest.raises(UserError, match="unknown accelerator 'rocm'"):
        environments.lock_path("data", "rocm")


def test_a_stage_writes_only_its_own_folders():
    own = [Path("runs/demo/finetune"), Path("runs/demo/.checkpoints/finetune")]
    assert runner.writable_dirs("finetune", "demo") == own
    assert Path("models") in runner.writable_dirs("tiny_model", "demo")
    assert runner.NETWORK_STAGES == {"synthesize"}


@pytest.mark.parametrize(
    ("argv", "position"),
    [
        (["evaluate", "--help"], 0),
        (["--runner", "docker", "pad", "a", "b"], 2),
        (["--runner=local", "run", "evaluate", "--profile", "demo"], 1),
        (["--help"], None),
    ],
)
def test_the_command_is_found_after_the_global_options(argv, position):
    assert cli.command_position(argv) == position
