"""Caption a features table with a model bundle on Ray Data; BLEU reports where references exist.

Local:        python jobs/caption.py --config configs/caption_flickr8k.toml
On a cluster: ray job submit --working-dir . -- python jobs/caption.py --config configs/caption_flickr8k.toml
Overrides:    --set decode.beam_width=5 --set actors=2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from imgcap.runtime.logs import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # before anything imports TensorFlow: no CUDA/oneDNN banners on CPU machines

from imgcap.batch.caption import run_caption_job  # noqa: E402
from imgcap.cli import run_config_job  # noqa: E402
from imgcap.config.jobs import CaptionJobConfig  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_config_job(CaptionJobConfig, run_caption_job, description=__doc__))
