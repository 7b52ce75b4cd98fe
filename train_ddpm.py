"""Train a DDPM: ``accelerate launch [--config_file accelerate_config.yaml] train_ddpm.py [options]``.

With no options it trains the small UNet preset on the bundled Fashion-MNIST images (CPU, minutes)
and writes a `DDPMPipeline` folder to ``outputs/ddpm-fashion-mnist``. ``--help`` lists every option;
the loop lives in :mod:`ddpm_pipeline.training`.
"""

from ddpm_pipeline.commands import train

if __name__ == "__main__":
    train()
