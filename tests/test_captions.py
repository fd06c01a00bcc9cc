import json
from pathlib import Path

import pytest

from imgcap.data.captions import (
    CaptionFormatError,
    detect_format,
    deterministic_split,
    read_captions,
    read_split_file,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_flickr8k_token_file(tmp_path):
    f = write(tmp_path / "Flickr8k.token.txt",
              "1000_abc.jpg#0\tA dog runs .\n1000_abc.jpg#1\tA brown dog, running .\n\n2000_def.jpg#0\tA cat .\n")
    corpus = read_captions(f)
    assert corpus.captions == {"1000_abc": ["A dog runs .", "A brown dog, running ."], "2000_def": ["A cat ."]}
    assert corpus.skipped == 0 and corpus.num_captions == 3


def test_kaggle_csv_with_quoted_commas(tmp_path):
    f = write(tmp_path / "captions.txt",
              'image,caption\n1000_abc.jpg,"A dog, brown, runs ."\n1000_abc.jpg,A dog runs\n2000_def.jpg,A cat\n')
    corpus = read_captions(f)
    assert detect_format(f) == "csv"
    assert corpus.captions["1000_abc"] == ["A dog, brown, runs .", "A dog runs"]


def test_coco_json(tmp_path):
    data = {"images": [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}, {"id": 9, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 7, "id": 1, "caption": "A man on a horse."},
                            {"image_id": 7, "id": 2, "caption": "Horse riding"},
                            {"image_id": 9, "id": 3, "caption": "A bus"}]}
    f = write(tmp_path / "captions_val2014.json", json.dumps(data))
    corpus = read_captions(f)
    assert detect_format(f) == "coco"
    assert corpus.captions == {"COCO_val2014_000000000007": ["A man on a horse.", "Horse riding"], "b": ["A bus"]}


def test_karpathy_json_carries_its_split(tmp_path):
    data = {"dataset": "flickr8k", "images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}]},
        {"filename": "b.jpg", "split": "restval", "sentences": [{"tokens": ["a", "cat"]}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "A bird."}]},
        {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "A fish."}]}]}
    f = write(tmp_path / "dataset_flickr8k.json", json.dumps(data))
    corpus = read_captions(f)
    assert detect_format(f) == "karpathy"
    assert corpus.captions["b"] == ["a cat"]
    assert corpus.splits == {"train": ["a", "b"], "dev": ["c"], "test": ["d"]}


@pytest.mark.parametrize("text, line, why", [
    ("1000_abc.jpg#0\tA dog\n1000_abc.jpg#1 no tab here\n", 2, "expected '<image>.jpg#<n><TAB><caption>'"),
    ("1000_abc.jpg#0\tA dog\n1000_abc.jpg\tmissing number\n", 2, "is not '<image>.jpg#<n>'"),
    ("1000_abc.jpg#0\t   \n", 1, "empty caption"),
    ("notes.txt#0\tA dog\n", 1, "is not an image file name"),
])
def test_malformed_flickr8k_lines_name_file_and_line(tmp_path, text, line, why):
    f = write(tmp_path / "tokens.txt", text)
    with pytest.raises(CaptionFormatError) as err:
        read_captions(f, "flickr8k")
    assert f"{f}:{line}:" in str(err.value) and why in str(err.value)


def test_malformed_lines_can_be_counted_and_skipped(tmp_path, caplog):
    f = write(tmp_path / "tokens.txt", "a.jpg#0\tA dog\nbroken line\na.jpg#1\t\nb.jpg#0\tA cat\n")
    corpus = read_captions(f, "flickr8k", skip_malformed=True)
    assert corpus.skipped == 2 and corpus.captions == {"a": ["A dog"], "b": ["A cat"]}
    assert "skipped 2 malformed" in caplog.text


def test_malformed_csv_row_and_header(tmp_path):
    f = write(tmp_path / "captions.txt", "image,caption\na.jpg,A dog\na.jpg,A dog,with,commas\n")
    with pytest.raises(CaptionFormatError, match=r"captions.txt:3: expected 2 fields"):
        read_captions(f, "csv")
    g = write(tmp_path / "other.txt", "img,text\na.jpg,A dog\n")
    with pytest.raises(CaptionFormatError, match=r"other.txt:1: expected the header 'image,caption'"):
        read_captions(g, "csv")


def test_malformed_json_records(tmp_path):
    coco = write(tmp_path / "captions_x.json", json.dumps(
        {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}))
    with pytest.raises(CaptionFormatError, match=r"annotations\[0\]: image_id 2 is not in 'images'"):
        read_captions(coco)
    broken = write(tmp_path / "bad.json", '{"images": [\n{"filename": "a.jpg",}]}')
    with pytest.raises(CaptionFormatError, match=r"bad.json:2: not valid JSON"):
        read_captions(broken)


def test_unrecognisable_format_and_missing_file(tmp_path):
    with pytest.raises(CaptionFormatError, match="set data.captions_format"):
        read_captions(write(tmp_path / "x.txt", "just some words\n"))
    with pytest.raises(FileNotFoundError, match="caption file not found"):
        read_captions(tmp_path / "nope.txt")


def test_split_file_and_its_errors(tmp_path):
    assert read_split_file(write(tmp_path / "s.txt", "a.jpg\n\nb.JPG\n")) == ["a", "b"]
    with pytest.raises(CaptionFormatError, match=r"bad.txt:2: 'b c.jpg' is not an image file name"):
        read_split_file(write(tmp_path / "bad.txt", "a.jpg\nb c.jpg\n"))


def test_deterministic_split_is_stable_and_disjoint():
    ids = [f"img{n}" for n in range(2000)]
    train, dev = deterministic_split(ids, 0.1)
    assert 150 <= len(dev) <= 250 and not set(train) & set(dev) and set(train) | set(dev) == set(ids)
    assert deterministic_split(reversed(ids), 0.1) == (train, dev)  # the order of the input does not matter
    # Each id's split depends on the id alone: a subset splits the same way, and so does a grown dataset.
    assert deterministic_split(ids[:700], 0.1)[1] == sorted(set(dev) & set(ids[:700]))
    grown_dev = deterministic_split(ids + [f"new{n}" for n in range(500)], 0.1)[1]
    assert set(dev) <= set(grown_dev)
    assert deterministic_split(["only"], 0.1) == ([], ["only"])


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/flickr8k is absent (the shared Flickr8k files)")
def test_official_flickr8k_files():
    corpus = read_captions(SHARED / "Flickr8k.token.txt")
    train, dev = read_split_file(SHARED / "Flickr_8k.trainImages.txt"), read_split_file(SHARED / "Flickr_8k.devImages.txt")
    assert (len(train), len(dev)) == (6000, 1000) and not set(train) & set(dev)
    assert corpus.num_captions == 35000 and corpus.skipped == 0
    assert all(len(corpus.captions[i]) == 5 for i in train + dev)
