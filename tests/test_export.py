"""Exporting bundles (imgcap/model/export.py, `imgcap export`): weights compressed losslessly or as float16
(loaded back into the float32 model), and the caption-by-caption check recorded in the copy; on toy decoders
trained once per session (tests/conftest.py `trained_toy`)."""

import json

import h5py
import numpy as np
import pytest

from imgcap.config.loader import ConfigError
from imgcap.config.model import DecodeConfig, TextConfig
from imgcap.model.bundle import CaptionBundle, load_bundle
from imgcap.model.export import export_bundle


def _saved(trained_toy, directory) -> str:
    bundle = CaptionBundle(trained_toy.model, trained_toy.vocab, TextConfig(), DecodeConfig(beam_width=3,
                                                                                             max_length=20))
    return str(bundle.save(directory))


def _arrays(weights_file) -> list[np.ndarray]:
    found: list[np.ndarray] = []
    with h5py.File(weights_file, "r") as store:
        store.visititems(lambda _, item: found.append(item[()]) if isinstance(item, h5py.Dataset) else None)
    return found


def test_float16_export_halves_the_weights_and_records_its_check(trained_toy, toy, tmp_path):
    source = _saved(trained_toy, tmp_path / "float32")
    np.savez(tmp_path / "dev.npz", ids=np.array(toy.table.ids[320:]), features=toy.dev_features)

    check = export_bundle(source, tmp_path / "float16", "float16", str(tmp_path / "dev.npz"))

    before, after = (tmp_path / d / "model-0.weights.h5" for d in ("float32", "float16"))
    stored = _arrays(after)
    assert all(a.dtype == np.float16 for a in stored if a.dtype.kind == "f")  # half the bytes of each array
    assert after.stat().st_size < before.stat().st_size
    original, exported = load_bundle(source), load_bundle(tmp_path / "float16")
    for a, b in zip(original.model.get_weights(), exported.model.get_weights()):
        assert b.dtype == np.float32  # cast back on load: the model computes as it was trained
        np.testing.assert_allclose(b, a, rtol=2 ** -10, atol=1e-7)
    # The check captioned every image with both and counted the differences it reports.
    old, new = original.caption(toy.dev_features), exported.caption(toy.dev_features)
    changed = [i for i, a, b in zip(toy.table.ids[320:], old, new) if a != b]
    assert check.images == 80 and check.changed == len(changed) and list(check.changed_ids) == changed
    assert check.changed <= 8, check.format()  # rounding to 11 bits moves few beams on this model
    meta = json.loads((tmp_path / "float16" / "bundle.json").read_text())
    assert meta["weights_dtype"] == "float16"
    export = meta["provenance"]["export"]
    assert export["from"] == source and export["fingerprint"] == original.fingerprint
    assert (export["check"]["images"], export["check"]["changed"]) == (80, check.changed)
    # A float32 export (no check asked) is the same model, compressed without loss.
    assert export_bundle(source, tmp_path / "copy") is None
    lossless = tmp_path / "copy" / "model-0.weights.h5"
    for a, b in zip(_arrays(before), _arrays(lossless)):
        np.testing.assert_array_equal(a, b)
    assert load_bundle(tmp_path / "copy").caption(toy.dev_features) == old


def test_the_check_split_limits_the_check_to_its_images(trained_toy, toy, tmp_path):
    source = _saved(trained_toy, tmp_path / "float32")
    np.savez(tmp_path / "all.npz", ids=np.array(toy.table.ids), features=toy.table.features)
    listed = toy.table.ids[320:330]
    (tmp_path / "split.txt").write_text("".join(f"{i}.jpg\n" for i in listed), encoding="utf-8")

    check = export_bundle(source, tmp_path / "out", "float16", str(tmp_path / "all.npz"), str(tmp_path / "split.txt"))

    assert check.images == len(listed)
    assert all(image_id in listed for image_id, _, _ in check.examples)


def test_a_check_that_cannot_run_fails_before_anything_is_written(trained_toy, tmp_path):
    source = _saved(trained_toy, tmp_path / "float32")

    with pytest.raises(FileNotFoundError):
        export_bundle(source, tmp_path / "out", "float16", str(tmp_path / "missing.npz"))

    assert not (tmp_path / "out").exists()  # no bundle without the check that was asked for


def test_an_export_can_change_the_decoding_and_checks_with_it(trained_toy, toy, tmp_path):
    source = _saved(trained_toy, tmp_path / "float32")
    np.savez(tmp_path / "dev.npz", ids=np.array(toy.table.ids[320:]), features=toy.dev_features)

    check = export_bundle(source, tmp_path / "copy", "float32", str(tmp_path / "dev.npz"),
                          decode={"no_repeat_ngram_size": 2, "beam_width": 2})

    exported = load_bundle(tmp_path / "copy")
    assert exported.decode == DecodeConfig(beam_width=2, max_length=20, no_repeat_ngram_size=2)  # the rest kept
    assert exported.provenance["export"]["decode"] == {"no_repeat_ngram_size": 2, "beam_width": 2}
    # lossless weights, the same decoding on both sides: nothing changes, though the decoding did
    assert check.changed == 0
    assert exported.caption(toy.dev_features) != load_bundle(source).caption(toy.dev_features)


def test_a_bad_decoding_key_fails_the_export_before_anything_is_written(trained_toy, tmp_path):
    source = _saved(trained_toy, tmp_path / "float32")

    with pytest.raises(ConfigError, match="no_repeat_ngram"):
        export_bundle(source, tmp_path / "out", decode={"no_repeat_ngram": 2})
    with pytest.raises(ConfigError, match="no_repeat_ngram_size must be 0"):
        export_bundle(source, tmp_path / "out", decode={"no_repeat_ngram_size": 1})

    assert not (tmp_path / "out").exists()


def test_imgcap_export_takes_decode_settings_and_refuses_other_keys(trained_toy, tmp_path, capsys):
    from imgcap.cli import main

    source = _saved(trained_toy, tmp_path / "float32")
    assert main(["export", "--out", str(tmp_path / "copy"), source, "--set", "decode.no_repeat_ngram_size=3"]) == 0
    assert load_bundle(tmp_path / "copy").decode.no_repeat_ngram_size == 3

    assert main(["export", "--out", str(tmp_path / "bad"), source, "--set", "model.units=8"]) == 2
    assert "decode.* keys only, got model.units" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
