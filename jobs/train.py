"""Train the caption decoder with Ray Train (see imgcap.train.ray_job.train_on_ray).

Local:          python jobs/train.py --config configs/train_flickr8k.toml
On a cluster:   ray job submit --working-dir . -- python jobs/train.py --config configs/train_flickr8k.toml
Overrides:      --set ray.num_workers=4 --set ray.use_gpu=true --set train.epochs=20
Resume:         rerun the same command: the run name is derived from output_dir, so the run continues from its
                latest checkpoint (a finished run only rewrites the bundle). From another run's checkpoint:
                --set ray.resume_from='"runs/other"'  (a checkpoint, run or output directory, or a URI)

Writes <output_dir>/bundle (the best epoch), history.csv, dev_report.json; Ray Train's run directory with
the per-epoch checkpoints is <output_dir>/ray_results/<run name> unless ray.storage_path is set.
On an autoscaling cluster missing workers' CPUs/GPUs are waited for (ray.resource_timeout_s), not refused.
Exit status: 0 on success, 2 on a configuration error (found before any worker starts).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from imgcap.runtime.logs import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # before anything imports TensorFlow: no CUDA/oneDNN banners on CPU machines

from imgcap.cli import run_config_job  # noqa: E402
from imgcap.config.training import TrainJobConfig  # noqa: E402
from imgcap.train.ray_job import train_on_ray  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_config_job(TrainJobConfig, train_on_ray, description=__doc__))
