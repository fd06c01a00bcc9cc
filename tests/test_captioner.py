"""The Python API (imgcap/captioner.py): paths, bytes and pixel arrays captioned as the bundle's decoder
captions their features, one result per photo in order, errors in place of exceptions."""

from __future__ import annotations

import numpy as np
from _imaging import jpeg_bytes, thumbnail
from PIL import Image

import imgcap
from imgcap.model.bundle import load_bundle
from imgcap.testing.fixtures import untrained_bundle


def test_paths_bytes_and_arrays_get_the_captions_of_their_features(tmp_path):
    bundle_path = untrained_bundle(tmp_path / "bundle")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes(seed=3, width=120, height=90))
    pixels = np.asarray(Image.open(photo).convert("RGB"))

    captioner = imgcap.Captioner.load(bundle_path, weights=None)
    results = captioner.caption([str(photo), photo.read_bytes(), pixels])

    bundle = load_bundle(bundle_path)
    decoded = bundle.decoder().decode(thumbnail(photo.read_bytes())[None, :].astype(np.float32))
    expected = " ".join(bundle.vocab.decode(decoded.tokens[0]))
    assert [r.source for r in results] == [str(photo), "bytes[1]", "array[2]"]
    assert [r.caption for r in results] == [expected] * 3 and all(r.error is None for r in results)
    np.testing.assert_allclose([r.score for r in results], decoded.scores[0], rtol=1e-4)


def test_unreadable_photos_get_their_error_and_the_others_their_caption(tmp_path):
    captioner = imgcap.Captioner.load(untrained_bundle(tmp_path / "bundle"), weights=None)
    good = jpeg_bytes(seed=1)
    results = captioner.caption([str(tmp_path / "missing.jpg"), b"not an image", np.zeros((4, 4)), good],
                                batch_size=2)
    assert [r.caption is None for r in results] == [True, True, True, False]
    assert "No such file" in results[0].error and "not an image" in results[1].error
    assert "RGB pixels [height, width, 3]" in results[2].error
    assert results[3].caption == captioner.caption([good])[0].caption


def test_imgcap_caption_beam_width_keeps_the_rest_of_the_bundles_decoding(tmp_path, capsys):
    from imgcap.cli import main
    from imgcap.config.model import DecodeConfig

    bundle = load_bundle(untrained_bundle(tmp_path / "untrained"))
    bundle.decode = DecodeConfig(beam_width=2, max_length=6, no_repeat_ngram_size=2)
    bundle_path = str(bundle.save(tmp_path / "bundle"))
    photos = [tmp_path / f"p{i}.jpg" for i in range(6)]
    for i, photo in enumerate(photos):
        photo.write_bytes(jpeg_bytes(seed=i, width=120, height=90))
    features = np.stack([thumbnail(p.read_bytes()) for p in photos]).astype(np.float32)

    def captions(decode: DecodeConfig) -> list[str]:
        return [" ".join(bundle.vocab.decode(ids)) for ids in bundle.decoder(decode).decode(features).tokens]

    wanted = captions(DecodeConfig(beam_width=3, max_length=6, no_repeat_ngram_size=2))
    assert wanted != captions(DecodeConfig(beam_width=3))  # the width alone, with default settings, differs

    assert main(["caption", "--bundle", bundle_path, "--weights", "none", "--beam-width", "3",
                 *map(str, photos)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] for line in lines] == wanted
