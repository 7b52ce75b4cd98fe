"""Score a DDPM pipeline with torch-fidelity (FID, IS, KID, precision/recall) and bits/dim.

    python eval_metrics.py --model outputs/ddpm-fashion-mnist --num_samples 50000 \\
        --num_inference_steps 1000 --reference bundled --metrics fid,kid,prc,bpd --output results.json

``accelerate launch --multi_gpu --num_processes N eval_metrics.py ...`` shares the sampling among
N GPUs. ``--help`` lists every option; the work is done by :func:`ddpm_pipeline.evaluate`.
"""

from ddpm_pipeline.commands import evaluate

if __name__ == "__main__":
    evaluate()
