"""The `imgcap` command and the shared entrypoint of the jobs in jobs/.

    imgcap pipeline --config configs/demo.toml       # the main job: data -> features -> train -> captions
    imgcap extract  --config configs/extract_flickr8k.toml
    imgcap train    --config configs/train_flickr8k.toml [--local]
    imgcap caption-job --config configs/caption_flickr8k.toml
    imgcap caption  --bundle runs/demo/train/bundle photo1.jpg photo2.jpg

Every config-driven command takes ``--set key=value`` overrides (dotted keys for tables, values as TOML
literals: ``--set train.epochs=2 --set model.architecture=inject``). A config error exits with status 2 and a
message naming the key, before Ray or TensorFlow start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from imgcap.config import ConfigError, load_config

T = TypeVar("T")


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


def _setup_logging() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ banner out of job logs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init_ray() -> None:
    """Connect to the cluster of `ray job submit` (RAY_ADDRESS), or start a local Ray for development."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


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
    _setup_logging()
    if uses_ray:
        init_ray()
    print(run(loaded).format())  # every job returns a result with a human-readable format()
    return 0
