"""The main job: caption image collections and archives (or a features table) with a model bundle on Ray
Data; Parquet captions, an HTML contact sheet, and BLEU reports where references exist (imgcap.batch.caption).
Without a `bundle` key it captions with the packaged model, imgcap:flickr8k (docs/model-card.md).

Local:        python jobs/caption.py --config configs/caption_images.toml
Demo:         python jobs/caption.py --config configs/caption_demo.toml    (make demo)
On a cluster: ray job submit --working-dir . -- python jobs/caption.py --config configs/caption_s3_example.toml
Features:     python jobs/caption.py --config configs/caption_flickr8k.toml
Overrides:    --set decode.beam_width=5 --set cnn.actors=2 --set output_dir='"../runs/mine"'
Exit codes:   0 done; 2 a bad config or input (the message names the key or file).
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
