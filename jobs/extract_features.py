"""Extract CNN features of images into Parquet (see imgcap.batch.extract).

Local:          python jobs/extract_features.py --config configs/extract_flickr8k.toml
On a cluster:   ray job submit --working-dir . -- python jobs/extract_features.py --config configs/extract_s3_example.toml
Overrides:      --set backbone=resnet50 --set actors=4   (values are TOML literals; bare words are strings)

Rerunning with the same output_dir resumes: images already written are skipped. Exit status: 0 on success,
2 on a configuration error (nothing was extracted).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from imgcap.runtime.logs import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # before anything imports TensorFlow: no CUDA/oneDNN banners on CPU machines

from imgcap.batch.extract import extract_features  # noqa: E402
from imgcap.cli import run_config_job  # noqa: E402
from imgcap.config.jobs import ExtractConfig  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_config_job(ExtractConfig, extract_features, description=__doc__))
