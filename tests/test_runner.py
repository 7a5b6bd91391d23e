"""The runner's image definitions and build context (the builds themselves: test_docker.py)."""

import io
import tarfile

import pytest

from shoptune import UserError, runner


def test_every_stage_has_an_environment():
    for stage, image in runner.IMAGES.items():
        names = [p.name for p in runner.definition_files(image)]
        assert names[0] == "install-requirements.sh" and "requirements.txt" in names and "Dockerfile" in names, stage


def test_the_build_context_carries_the_ca_bundle(tmp_path, monkeypatch):
    extra = tmp_path / "proxy-ca.pem"
    extra.write_bytes(b"-----BEGIN CERTIFICATE-----\nproxy\n-----END CERTIFICATE-----\n")
    monkeypatch.setenv("SHOPTUNE_EXTRA_CA_BUNDLE", str(extra))
    with tarfile.open(fileobj=io.BytesIO(runner.build_context("data"))) as tar:
        names = tar.getnames()
        bundle = tar.extractfile("ca-bundle.pem").read()
    assert sorted(names) == ["Dockerfile", "ca-bundle.pem", "install-requirements.sh", "requirements.txt"]
    assert bundle.endswith(extra.read_bytes())
    monkeypatch.setenv("SHOPTUNE_EXTRA_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(UserError, match="SHOPTUNE_EXTRA_CA_BUNDLE=.*missing.pem: no such file"):
        runner.build_context("data")


def test_image_tags_follow_the_definition_and_the_base(monkeypatch):
    files = runner.definition_files("data")
    assert runner.digest(files, "base-a") != runner.digest(files, "base-b")
    assert runner.digest(files, "base-a") == runner.digest(files, "base-a")


def test_unknown_stage_and_runner_are_user_errors():
    with pytest.raises(UserError, match="unknown stage 'train'"):
        runner.image_of("train")
    with pytest.raises(UserError, match="unknown runner 'ssh'"):
        runner.run("clean", [], "ssh")
