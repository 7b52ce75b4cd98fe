"""Train a DDPM: ``accelerate launch [--config_file accelerate_config.yaml] train_ddpm.py [options]``.

With no options it trains the small UNet preset on the bundled Fashion-MNIST images (CPU, minutes)
and writes a `DDPMPipeline` folder to ``outputs/ddpm-fashion-mnist``. ``--help`` lists every option;
the loop lives in :mod:`ddpm_pipeline.training`.
"""

import sys

from ddpm_pipeline.console import keep_stderr_writable, run_command
from ddpm_pipeline.training import exit_status, main

if __name__ == "__main__":
    keep_stderr_writable()  # a launcher that relays stderr may die first: the run still checkpoints
    sys.exit(exit_status(run_command(main, "train_ddpm.py")))
