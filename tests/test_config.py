import pytest

from imgcap.cli import parse_overrides
from imgcap.config.loader import ConfigError, load_config
from imgcap.config.model import DecodeConfig
from imgcap.config.training import TrainJobConfig

MINIMAL = 'output_dir = "out"\n[data]\ncaptions = "caps.txt"\nfeatures = "f.npz"\n'


def write(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_relative_paths_resolve_against_the_config_file(tmp_path):
    config = load_config(TrainJobConfig, write(tmp_path, MINIMAL))
    assert config.data.captions == str(tmp_path / "caps.txt")
    assert config.output_dir == str(tmp_path / "out")
    assert config.model.architecture == "merge" and config.train.epochs == 10 and config.text.mode == "standard"


def test_overrides_are_applied_before_validation(tmp_path):
    config = load_config(TrainJobConfig, write(tmp_path, MINIMAL),
                         parse_overrides(["train.epochs=2", "model.architecture=inject", "train.learning_rate=5e-4"]))
    assert (config.train.epochs, config.model.architecture, config.train.learning_rate) == (2, "inject", 5e-4)


@pytest.mark.parametrize("extra, message", [
    ("[train]\nepochz = 3\n", "train: unknown key(s) epochz"),
    ("[train]\nepochs = \"ten\"\n", "train.epochs must be an integer, got 'ten'"),
    ("[train]\nepochs = 0\n", "train.epochs must be >= 1"),
    ("[model]\narchitecture = \"transformer\"\n", "model.architecture must be one of 'merge', 'inject', 'attention'"),
    ("[text]\nmode = \"fancy\"\n", "text.mode must be one of 'standard', 'seed'"),
    ("[model]\ndropout = 1.5\n", "model.dropout must be in [0, 1)"),
    ("[train]\nsampled_softmax = 512\nlabel_smoothing = 0.1\n",
     "train.sampled_softmax and label_smoothing cannot be combined"),
    ("[train]\nweight_ema = 1.0\n", "train.weight_ema must be in [0, 1), got 1.0"),
])
def test_bad_values_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        load_config(TrainJobConfig, write(tmp_path, MINIMAL + extra))
    assert message in str(err.value) and str(tmp_path / "job.toml") in str(err.value)


def test_missing_required_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="data.captions is required"):
        load_config(TrainJobConfig, write(tmp_path, '[data]\nfeatures = "f.npz"\n'))
    with pytest.raises(ConfigError, match="missing 1 required positional argument: 'data'"):
        load_config(TrainJobConfig, write(tmp_path, 'output_dir = "x"\n'))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainJobConfig, tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(TrainJobConfig, write(tmp_path, "[data\n"))
    with pytest.raises(ConfigError, match="data.train_split and dev_split go together"):
        load_config(TrainJobConfig, write(tmp_path, MINIMAL + 'train_split = "t.txt"\n'))


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides(["epochs"])
    assert parse_overrides(["a.b=resnet50", "c=[1, 2]", "d=true"]) == {"a.b": "resnet50", "c": [1, 2], "d": True}


def test_decode_label_says_how_captions_were_made():
    assert DecodeConfig(beam_width=1).label == "greedy"
    assert DecodeConfig(beam_width=3).label == "beam-3"
    assert DecodeConfig(beam_width=5, length_penalty=0.7).label == "beam-5 (length penalty 0.7)"


@pytest.mark.parametrize("text, message", [
    ('bundle = "b"\n', "sources or features is required"),
    ('bundle = "b"\nfeatures = "f"\n[[sources]]\npath = "imgs"\n', "give either sources .* or features"),
    ('bundle = "b"\nfeatures = "f"\nactors = 2\nmax_actors = 1\n', "max_actors must be 0 .* or >= actors = 2"),
    ('bundle = "b"\nfeatures = "f"\n[cnn]\ngpus = 1\n', r"cnn: unknown key\(s\) gpus; valid keys: actors"),
    ('bundle = "b"\nfeatures = "f"\n[cnn]\ngpus_per_actor = -1\n', "cnn.gpus_per_actor must be >= 0"),
    ('bundle = "b"\nfeatures = "f"\nid_from = "name"\n', "id_from must be one of 'stem', 'relpath', 'uri'"),
    ('bundle = "b"\nthumbnail_size = -5\n[[sources]]\npath = "imgs"\n', "thumbnail_size must be >= 0"),
])
def test_caption_job_config_errors_name_the_key(tmp_path, text, message):
    from imgcap.config.jobs import CaptionJobConfig

    with pytest.raises(ConfigError, match=message):
        load_config(CaptionJobConfig, write(tmp_path, text))


def test_caption_job_config_keeps_uris_and_resolves_paths(tmp_path):
    from imgcap.config.jobs import CaptionJobConfig

    config = load_config(CaptionJobConfig, write(tmp_path, 'bundle = "s3://b/bundle"\noutput_dir = "s3://b/out"\n'
                                                           '[[sources]]\npath = "imgs"\n[cnn]\nmax_actors = 4\n'))
    assert config.bundle == "s3://b/bundle" and config.output_dir == "s3://b/out"
    assert config.sources[0].path == str(tmp_path / "imgs") and config.cnn.pool.max_actors == 4
    assert config.pool.gpus_per_actor == 0 and config.cnn.weights == "imagenet"


def test_caption_job_config_defaults_to_the_packaged_model_and_keeps_model_names(tmp_path):
    from imgcap.config.jobs import CaptionJobConfig

    default = load_config(CaptionJobConfig, write(tmp_path, '[[sources]]\npath = "imgs"\n'))
    assert default.bundle == "imgcap:flickr8k"
    named = load_config(CaptionJobConfig, write(tmp_path, '[[sources]]\npath = "imgs"\n'),
                        {"bundle": "imgcap:flickr8k"})
    assert named.bundle == "imgcap:flickr8k"  # a name, not resolved against the config's directory
    local = load_config(CaptionJobConfig, write(tmp_path, 'bundle = "runs/b"\n[[sources]]\npath = "imgs"\n'))
    assert local.bundle == str(tmp_path / "runs" / "b")
    with pytest.raises(ConfigError, match="bundle is empty: leave it out for the default model"):
        load_config(CaptionJobConfig, write(tmp_path, 'bundle = ""\n[[sources]]\npath = "imgs"\n'))


# --- every key of every job: a wrong type, an unknown key, each named in the error

import copy  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
import types  # noqa: E402
import typing  # noqa: E402

from imgcap.config.jobs import CaptionJobConfig, ExtractConfig  # noqa: E402
from imgcap.config.loader import config_from_dict  # noqa: E402

JOB_MINIMA = {
    TrainJobConfig: {"data": {"captions": "caps.txt", "features": "f.npz"}},
    ExtractConfig: {"sources": [{"path": "images"}]},
    CaptionJobConfig: {"bundle": "bundle", "sources": [{"path": "images"}]},
}


def wrong_value(annotation):
    """A value of the wrong type for a key of type `annotation` (None: no wrong value is possible)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation) or origin is list:
        return 7
    if origin is typing.Literal:
        return "no-such-choice"
    return {int: "seven", float: "seven", str: 7, bool: "yes"}.get(annotation)


def leaf_keys(cls, prefix=""):
    """(dotted key, annotation) of every key under `cls`, tables included (not lists of tables)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, annotation = f"{prefix}{f.name}", hints[f.name]
        yield key, annotation
        inner = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)] or (
            [annotation] if dataclasses.is_dataclass(annotation) else [])
        if inner and typing.get_origin(annotation) is not list:
            yield from leaf_keys(inner[0], f"{key}.")


def with_value(table, dotted, value):
    table = copy.deepcopy(table)
    node = table
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return table


@pytest.mark.parametrize("cls", list(JOB_MINIMA), ids=lambda c: c.__name__)
def test_every_key_of_every_job_is_type_checked_and_named(cls, tmp_path):
    minimal = JOB_MINIMA[cls]
    config_from_dict(cls, minimal, tmp_path)  # the minimum is valid
    checked = 0
    for key, annotation in leaf_keys(cls):
        value = wrong_value(annotation)
        if value is None:
            continue
        with pytest.raises(ConfigError, match="^" + re.escape(key) + r"\b") as raised:
            config_from_dict(cls, with_value(minimal, key, value), tmp_path)
        assert repr(value) in str(raised.value) or "must be" in str(raised.value), (key, raised.value)
        checked += 1
    assert checked >= len([f for f in dataclasses.fields(cls)])  # every top-level key, and the nested ones

    tables = [""] + [k + "." for k, a in leaf_keys(cls) if dataclasses.is_dataclass(a)]
    for table in tables:  # a typo in any table is named, with the valid keys
        with pytest.raises(ConfigError, match=rf"{table.rstrip('.') or ''}.*unknown key\(s\) colour"):
            config_from_dict(cls, with_value(minimal, f"{table}colour", 1), tmp_path)


@pytest.mark.parametrize("cls, key, value, message", [
    (ExtractConfig, "s3.max_attempts", 0, "s3.max_attempts must be >= 1"),
    (CaptionJobConfig, "s3.max_attempts", 0, "s3.max_attempts must be >= 1"),
    (ExtractConfig, "batch_size", 0, "batch_size must be >= 1"),
    (ExtractConfig, "max_actors", -1, "max_actors must be 0"),
    (CaptionJobConfig, "cnn.batch_size", 0, "cnn.batch_size must be >= 1"),
    (CaptionJobConfig, "thumbnail_size", -1, "thumbnail_size must be >= 0"),
    (CaptionJobConfig, "decode.beam_width", 0, "decode.beam_width"),
    (TrainJobConfig, "ray.num_workers", 0, "ray.num_workers"),
    (TrainJobConfig, "scst.samples", 1, "scst.samples"),
    (TrainJobConfig, "train.patience", -1, "train.patience must be >= 0"),
])
def test_out_of_range_values_name_the_key(cls, key, value, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_from_dict(cls, with_value(JOB_MINIMA[cls], key, value), tmp_path)


def test_scst_config_is_checked_at_load():
    from imgcap.config.training import ScstConfig

    with pytest.raises(ConfigError, match=r"samples = 1 with baseline = \"mean\""):
        ScstConfig(samples=1)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        ScstConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="scst.select_by"):
        config_from_dict(TrainJobConfig, {"data": {"captions": "c", "features": "f"}, "scst": {"select_by": "loss"}})
