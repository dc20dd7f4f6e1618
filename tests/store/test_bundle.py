from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from service.errors import BundleError, ChecksumMismatch, UnknownName
from service.store import ModelStore, load_bundle
from service.store.bundle import finalize
from service.store.manifest import Manifest


def test_tiny_bundle_loads_with_consistent_parts(tiny_store: Path) -> None:
    b = load_bundle(tiny_store / "tiny")
    m = b.manifest
    assert m.bits == 16 and len(m.class_names) == 10
    assert len(b.gallery) == 1000 and len(b.queries) == 100
    assert b.gallery.codes_packed.shape == (1000, 2)
    assert b.gallery.thumbnails.dtype == np.uint8
    assert set(np.unique(b.gallery.codes(16))) <= {-1, 1}
    assert not b.hasher.training
    assert {f["path"] for f in m.files} == {
        "hasher.safetensors", "gallery.safetensors", "thumbnails.png", "queries.safetensors",
        "splits.safetensors", "prototype.safetensors",
        "gen_untargeted_gan_m100.safetensors", "gen_untargeted_gan_plus_m100.safetensors",
        "gen_uaa_gan_m100.safetensors", "gen_targeted_gan_m100.safetensors",
        "gen_saliency_gan_m100.safetensors", "gen_universal_gan_m100.safetensors",
        "patterns.safetensors"}
    assert [g["attack"] for g in m.generators] == [
        "saliency_gan", "targeted_gan", "uaa_gan", "universal_gan", "untargeted_gan",
        "untargeted_gan_plus"]
    ug = next(g for g in m.generators if g["attack"] == "universal_gan")
    assert ug["base"] == "class_pattern" and "label_decoder" not in ug["arch"]
    uaa = next(g for g in m.generators if g["attack"] == "uaa_gan")
    assert "label_decoder" not in uaa["arch"]  # label-free: image-only generator
    assert uaa["arch"]["perturbation_generator"]["cond_channels"] == 0
    hasher_sha = next(f["sha256"] for f in m.files if f["path"] == "hasher.safetensors")
    assert all(g["target_hasher_sha"] == hasher_sha for g in m.generators)
    assert set(b.splits["train"]) <= set(b.splits["database"])
    np.testing.assert_array_equal(b.splits["database"], b.gallery.ids)
    rec = m.dataset["splits"]
    assert rec["seed"] == 0 and m.evaluation["figures"]["num_queries"] == 100
    assert len(b.sha) == 64


def test_sha256sum_accepts_the_sums_file(tiny_store: Path) -> None:
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum not installed")
    out = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tiny_store / "tiny",
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": OK") == 14


@pytest.mark.parametrize("fname", [
    "hasher.safetensors", "gallery.safetensors", "thumbnails.png", "queries.safetensors",
    "splits.safetensors", "manifest.json", "prototype.safetensors",
    "gen_untargeted_gan_plus_m100.safetensors", "patterns.safetensors"])
def test_a_flipped_byte_in_any_file_refuses_to_load(tiny_bundle_copy: Path, fname: str) -> None:
    p = tiny_bundle_copy / fname
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch) as err:
        load_bundle(tiny_bundle_copy)
    assert fname in err.value.message and "checksum mismatch" in err.value.message


def test_weights_of_another_shape_are_refused_even_with_fresh_checksums(
    tiny_bundle_copy: Path,
) -> None:
    w = load_file(str(tiny_bundle_copy / "hasher.safetensors"))
    w["hash_layer.weight"] = torch.zeros(8, w["hash_layer.weight"].shape[1])
    save_file(w, str(tiny_bundle_copy / "hasher.safetensors"))
    m = Manifest.from_json((tiny_bundle_copy / "manifest.json").read_text())
    finalize(tiny_bundle_copy, m, [f["path"] for f in m.files])
    with pytest.raises(BundleError, match="do not fit the architecture"):
        load_bundle(tiny_bundle_copy)


def test_thumbnail_atlas_round_trips_exactly(tiny_store: Path) -> None:
    from service.data import load_fashion_mnist

    b = load_bundle(tiny_store / "tiny")
    train = load_fashion_mnist(split="train")
    np.testing.assert_array_equal(b.gallery.thumbnails, train.images[b.gallery.ids])


@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (13, 3, 4, 4), (7, 1, 28, 28)])
def test_atlas_codec_exact_for_odd_counts(shape) -> None:
    from service.store.thumbs import decode_atlas, encode_atlas

    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    png, cols = encode_atlas(x)
    np.testing.assert_array_equal(decode_atlas(png, *shape, cols), x)


def test_other_format_version_is_refused(tiny_bundle_copy: Path) -> None:
    raw = json.loads((tiny_bundle_copy / "manifest.json").read_text())
    raw["format_version"] = 99
    m_text = json.dumps(raw)
    with pytest.raises(BundleError, match="format_version 99"):
        Manifest.from_json(m_text)


def test_missing_sums_file_is_a_clear_error(tiny_bundle_copy: Path) -> None:
    (tiny_bundle_copy / "SHA256SUMS").unlink()
    with pytest.raises(BundleError, match="no SHA256SUMS"):
        load_bundle(tiny_bundle_copy)


@pytest.mark.parametrize("bad", ["../tiny", "..", "a/b", "/etc", "", ".hidden", "x" * 80])
def test_model_store_rejects_unsafe_names(tiny_store: Path, bad: str) -> None:
    with pytest.raises(UnknownName):
        ModelStore(tiny_store).get(bad)


def test_model_store_lists_and_caches(tiny_store: Path) -> None:
    store = ModelStore(tiny_store)
    assert store.names() == ["tiny"]
    assert store.get("tiny") is store.get("tiny")
    with pytest.raises(UnknownName, match="available: tiny"):
        store.get("nope")
