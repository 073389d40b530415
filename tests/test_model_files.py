"""Model files are found by content in a models folder or in hub snapshots; names do not matter."""

from __future__ import annotations

import shutil

import pytest

from infinite_talk.errors import CheckpointError
from infinite_talk.loading import resolve_model_files
from infinite_talk.model_files import classify
from infinite_talk.options import LoadOptions
from infinite_talk.presets.tiny import ensure_tiny_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_models(tmp_path_factory.mktemp("tiny"))


def _scrambled_copy(files, dest):
    """The tiny files under meaningless names, as a user's download folder might hold them."""
    dest.mkdir(parents=True)
    shutil.copytree(files.transformer[0], dest / "a")
    shutil.copy(files.adapter, dest / "b.safetensors")
    shutil.copy(files.vae, dest / "c.pth")
    shutil.copy(files.t5, dest / "d.pth")
    shutil.copytree(files.t5_tokenizer, dest / "e")
    shutil.copy(files.clip, dest / "f.pth")
    shutil.copy(files.wav2vec, dest / "g.safetensors")
    return dest


def test_classify_by_content(tiny):
    assert classify(__import__("pathlib").Path(tiny.adapter)) == "adapter"
    assert classify(__import__("pathlib").Path(tiny.vae)) == "vae"
    assert classify(__import__("pathlib").Path(tiny.t5)) == "t5"
    assert classify(__import__("pathlib").Path(tiny.clip)) == "clip"
    assert classify(__import__("pathlib").Path(tiny.wav2vec)) == "wav2vec"


def test_models_dir_found_by_content(tiny, tmp_path):
    root = _scrambled_copy(tiny, tmp_path / "models")
    files, _ = resolve_model_files(LoadOptions(models_dir=str(root)), print)
    assert files.adapter.endswith("b.safetensors") and files.vae.endswith("c.pth")
    assert files.t5.endswith("d.pth") and files.t5_tokenizer.endswith("/e") and files.clip.endswith("f.pth")
    assert len(files.transformer) == 7 and all("/a/" in p for p in files.transformer)


def test_ambiguous_or_missing_files_are_named(tiny, tmp_path):
    root = _scrambled_copy(tiny, tmp_path / "models")
    shutil.copy(tiny.vae, root / "another_vae.pth")
    with pytest.raises(CheckpointError, match="several Wan VAE files found .* choose one with --vae PATH"):
        resolve_model_files(LoadOptions(models_dir=str(root)), print)
    files, _ = resolve_model_files(LoadOptions(models_dir=str(root), vae=str(root / "c.pth")), print)
    assert files.vae.endswith("c.pth")
    (root / "f.pth").unlink()
    with pytest.raises(CheckpointError, match="no CLIP ViT-H/14 found in the models folder; add it or pass --clip"):
        resolve_model_files(LoadOptions(models_dir=str(root), vae=str(root / "c.pth")), print)


def test_hub_snapshots_are_searched_by_content(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    wan = _scrambled_copy(tiny, tmp_path / "wan")
    shutil.move(wan / "b.safetensors", tmp_path / "b.safetensors")
    shutil.move(wan / "g.safetensors", tmp_path / "g.safetensors")
    talk, w2v = tmp_path / "it", tmp_path / "w2v"
    (talk / "single").mkdir(parents=True)
    w2v.mkdir()
    shutil.move(tmp_path / "b.safetensors", talk / "single" / "infinitetalk.safetensors")
    shutil.move(tmp_path / "g.safetensors", w2v / "model.safetensors")
    snapshots = {"Wan-AI/Wan2.1-I2V-14B-480P": wan, "MeiGen-AI/InfiniteTalk": talk,
                 "TencentGameMate/chinese-wav2vec2-base": w2v}
    asked = []

    def fake_snapshot_download(repo, allow_patterns=None):
        asked.append((repo, allow_patterns))
        return str(snapshots[repo])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    files, _ = resolve_model_files(LoadOptions(), lambda msg: None)
    assert files.adapter == str(talk / "single" / "infinitetalk.safetensors")
    assert files.wav2vec.endswith("model.safetensors")
    assert ("MeiGen-AI/InfiniteTalk", ["single/infinitetalk.safetensors"]) in asked

    def offline(repo, allow_patterns=None):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"cannot be downloaded \(Wan-AI/Wan2.1-I2V-14B-480P: OSError: no network\).* pass --models-dir DIR"):
        resolve_model_files(LoadOptions(), lambda msg: None)
