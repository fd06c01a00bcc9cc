"""The main job: images -> CNN features -> trained caption decoder -> captions + BLEU (see imgcap.batch.pipeline).

Local:        python jobs/pipeline.py --config configs/demo.toml
On a cluster: ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo.toml
Overrides:    --set train.train.epochs=3 --set demo_images=200
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from imgcap.runtime.logs import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # before anything imports TensorFlow: no CUDA/oneDNN banners on CPU machines

from imgcap.batch.pipeline import load_pipeline_config, run_pipeline  # noqa: E402
from imgcap.cli import run_config_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_config_job(load_pipeline_config, run_pipeline, description=__doc__))
