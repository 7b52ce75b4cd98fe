"""Sample a trained DDPM into a folder of PNGs (with a grid, a report and optionally an .npz).

    python sample_ddpm.py --model outputs/ddpm-fashion-mnist --num_images 1000 --num_inference_steps 250 \\
        --output_dir samples

``accelerate launch --multi_gpu --num_processes N sample_ddpm.py ...`` shares the batches among N
GPUs. ``--help`` lists every option; the work is done by
:func:`ddpm_pipeline.generation.generate_samples`.
"""

from ddpm_pipeline.commands import sample

if __name__ == "__main__":
    sample()
