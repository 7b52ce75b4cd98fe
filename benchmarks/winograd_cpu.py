"""Would Winograd convolutions reach issue 7's CPU target? A measured experiment, not a fast path.

    python benchmarks/winograd_cpu.py --model ddpm-small-28 --batch_size 32 [--compile]

On the 2-core CPU, 81% of a training step is oneDNN's direct 3×3 convolutions, already at ~70% of
the measured float32 matmul peak (RESULTS.md), so only fewer multiplies could give 1.3×. oneDNN
has Winograd only with AVX-512; this script builds F(2×2, 3×3) Winograd in PyTorch itself and times
it against ``F.conv2d`` on every 3×3, stride-1 convolution of the preset's UNet, forward and
backward, as one training step meets them. Per 2×2 output tile and channel pair, Winograd does 16
multiplies instead of 36 (2.25× fewer):

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

with d a 4×4 input tile, g the 3×3 filter, and the ⊙-sums over input channels done as 16 batched
matmuls. The backward pass is the same three matmuls transposed (dV = Uᵀ dM, dU = dM Vᵀ) and the
transposed transforms. Printed: milliseconds per step for direct convolutions, for Winograd, and
for Winograd's matmuls alone (the bound if its transforms cost nothing), plus the largest relative
error against ``F.conv2d``. ``--compile`` fuses the transforms with ``torch.compile``.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_pipeline.unet import DDPMUNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import append_json_lines  # noqa: E402

INPUT_MATRIX = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]  # Bᵀ
OUTPUT_MATRIX = [[1, 1, 1, 0], [0, 1, -1, -1]]  # Aᵀ
FILTER_MATRIX = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]  # G


def tile_counts(height: int, width: int) -> tuple[int, int]:
    """2×2 output tiles down and across a height × width output (the last row/column padded if odd)."""
    return (height + 1) // 2, (width + 1) // 2


def _transposed(matrix: list[list[int]]) -> list[list[int]]:
    return [list(column) for column in zip(*matrix, strict=True)]


def _combine(rows: list[torch.Tensor], matrix: list[list[int]]) -> list[torch.Tensor]:
    """``out[i] = Σ_p matrix[i][p] · rows[p]`` for a matrix of 0 and ±1, as adds and subtracts."""
    combined = []
    for coefficients in matrix:
        total = None
        for coefficient, row in zip(coefficients, rows, strict=True):
            if coefficient:
                term = row if coefficient == 1 else -row
                total = term if total is None else total + term
        combined.append(total)
    return combined


def _overlap_add(even: torch.Tensor, odd: torch.Tensor, shifted_even: torch.Tensor, shifted_odd: torch.Tensor,
                 dim: int) -> torch.Tensor:
    """Interleave tiles 2 apart along ``dim`` whose 4 positions overlap by 2: position 2w+q gets tile w's q."""
    pad_after = [0, 0] * (even.dim() - 1 - dim) + [0, 1]
    pad_before = [0, 0] * (even.dim() - 1 - dim) + [1, 0]
    evens = F.pad(even, pad_after) + F.pad(shifted_even, pad_before)
    odds = F.pad(odd, pad_after) + F.pad(shifted_odd, pad_before)
    size = list(evens.shape)
    size[dim] *= 2
    return torch.stack([evens, odds], dim + 1).reshape(size)


def input_transform(x: torch.Tensor) -> torch.Tensor:
    """V = Bᵀ d B for every 4×4 tile d (stride 2) of the zero-padded input: (N,C,H,W) → (16, C, N·⌈H/2⌉·⌈W/2⌉)."""
    batch, channels, height, width = x.shape
    tiles_h, tiles_w = tile_counts(height, width)
    padded = F.pad(x, (1, 1 + 2 * tiles_w - width, 1, 1 + 2 * tiles_h - height)).permute(1, 0, 2, 3)
    rows = _combine([padded[:, :, p:p + 2 * tiles_h:2, :] for p in range(4)], INPUT_MATRIX)
    tiles = []
    for row in rows:
        tiles += _combine([row[..., q:q + 2 * tiles_w:2] for q in range(4)], INPUT_MATRIX)
    return torch.stack(tiles).reshape(16, channels, batch * tiles_h * tiles_w)


def input_transform_adjoint(grad_tiles: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """The adjoint of :func:`input_transform`: B dV Bᵀ per tile, overlap-added back to (N,C,H,W)."""
    tiles_h, tiles_w = tile_counts(height, width)
    channels = grad_tiles.shape[1]
    grad_tiles = grad_tiles.reshape(4, 4, channels, batch, tiles_h, tiles_w)
    transposed = _transposed(INPUT_MATRIX)
    rows = []
    for i in range(4):
        q = _combine([grad_tiles[i, j] for j in range(4)], transposed)
        rows.append(_overlap_add(q[0], q[1], q[2], q[3], dim=3))
    p = _combine(rows, transposed)
    padded = _overlap_add(p[0], p[1], p[2], p[3], dim=2)
    return padded[:, :, 1:1 + height, 1:1 + width].permute(1, 0, 2, 3).contiguous()


def output_transform(products: torch.Tensor, batch: int, height: int, width: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """Y = Aᵀ M A per tile, the 2×2 results put in place: (16, K, tiles) → (N,K,H,W), plus the bias."""
    tiles_h, tiles_w = tile_counts(height, width)
    out_channels = products.shape[1]
    products = products.reshape(4, 4, out_channels, batch, tiles_h, tiles_w)
    rows = _combine([products[i] for i in range(4)], OUTPUT_MATRIX)
    pixels = [torch.stack(_combine([row[j] for j in range(4)], OUTPUT_MATRIX), -1) for row in rows]
    y = torch.stack(pixels, 3).reshape(out_channels, batch, 2 * tiles_h, 2 * tiles_w)
    y = y[:, :, :height, :width].permute(1, 0, 2, 3)
    return (y if bias is None else y + bias.view(1, -1, 1, 1)).contiguous()


def output_transform_adjoint(grad_output: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`output_transform`: A dY Aᵀ per tile, (N,K,H,W) → (16, K, tiles)."""
    batch, out_channels, height, width = grad_output.shape
    tiles_h, tiles_w = tile_counts(height, width)
    padded = F.pad(grad_output, (0, 2 * tiles_w - width, 0, 2 * tiles_h - height)).permute(1, 0, 2, 3)
    tiles = padded.reshape(out_channels, batch, tiles_h, 2, tiles_w, 2)
    transposed = _transposed(OUTPUT_MATRIX)
    rows = _combine([tiles[:, :, :, a] for a in range(2)], transposed)
    grad_products = []
    for row in rows:
        grad_products += _combine([row[..., b] for b in range(2)], transposed)
    return torch.stack(grad_products).reshape(16, out_channels, batch * tiles_h * tiles_w)


TRANSFORMS = {f.__name__: f for f in (input_transform, input_transform_adjoint, output_transform,
                                      output_transform_adjoint)}


def filter_transform(weight: torch.Tensor) -> torch.Tensor:
    """U = G g Gᵀ for every filter: (K, C, 3, 3) → (16, K, C)."""
    g = torch.tensor(FILTER_MATRIX, dtype=weight.dtype)
    return torch.einsum("ai,kcij,bj->abkc", g, weight, g).reshape(16, *weight.shape[:2])


class WinogradConv3x3(torch.autograd.Function):
    """A 3×3, stride-1, padding-1 convolution by F(2×2, 3×3) Winograd, forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        tiles = TRANSFORMS["input_transform"](x)
        filters = filter_transform(weight)
        ctx.save_for_backward(tiles, filters)
        ctx.size = (x.shape[0], x.shape[2], x.shape[3])
        ctx.has_bias = bias is not None
        return TRANSFORMS["output_transform"](torch.bmm(filters, tiles), *ctx.size, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        tiles, filters = ctx.saved_tensors
        grad_products = TRANSFORMS["output_transform_adjoint"](grad_output.contiguous())
        g = torch.tensor(FILTER_MATRIX, dtype=filters.dtype)
        grad_filters = torch.bmm(grad_products, tiles.transpose(1, 2)).reshape(4, 4, *filters.shape[1:])
        grad_weight = torch.einsum("ai,abkc,bj->kcij", g, grad_filters, g)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_tiles = torch.bmm(filters.transpose(1, 2), grad_products)
            grad_x = TRANSFORMS["input_transform_adjoint"](grad_tiles, *ctx.size)
        grad_bias = grad_output.sum((0, 2, 3)) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for 3×3 filters, by Winograd F(2×2, 3×3)."""
    return WinogradConv3x3.apply(x, weight, bias)


def compile_transforms() -> None:
    """Fuse each transform into one loop nest with ``torch.compile`` (inductor's C++ on the CPU)."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # < 2.7
    setattr(torch._dynamo.config, limit, 64)  # one graph per layer shape
    for name, transform in list(TRANSFORMS.items()):
        TRANSFORMS[name] = torch.compile(transform, dynamic=False, fullgraph=True)


def conv3x3_shapes(model: str, batch_size: int) -> collections.Counter:
    """(input shape, output channels) of every 3×3, stride-1 convolution in one forward, with counts."""
    unet = DDPMUNet.from_preset(model)
    shapes: collections.Counter = collections.Counter()

    def record(module, inputs, _output):
        if module.kernel_size == (3, 3) and module.stride == (1, 1) and module.padding == (1, 1):
            shapes[(tuple(inputs[0].shape), module.out_channels)] += 1

    hooks = [m.register_forward_hook(record) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    size = unet.config.sample_size
    with torch.no_grad():
        unet(torch.zeros(batch_size, unet.config.in_channels, size, size), torch.zeros(batch_size, dtype=torch.long))
    for hook in hooks:
        hook.remove()
    return shapes


def milliseconds(call, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e3


def time_layer(shape: tuple[int, int, int, int], out_channels: int, repeats: int) -> tuple[dict[str, float], float]:
    """Milliseconds for forward + backward of one layer (direct, Winograd, Winograd's three matmuls
    alone) and Winograd's largest error relative to the output's largest magnitude."""
    batch, channels, height, width = shape
    x = torch.randn(shape, requires_grad=channels > 1)
    weight = (torch.randn(out_channels, channels, 3, 3) / (3 * channels**0.5)).requires_grad_()
    bias = torch.zeros(out_channels, requires_grad=True)
    grad = torch.randn(batch, out_channels, height, width)
    tile_count = batch * math.prod(tile_counts(height, width))
    filters, tiles = torch.randn(16, out_channels, channels), torch.randn(16, channels, tile_count)
    products = torch.randn(16, out_channels, tile_count)

    def matmuls_only():
        torch.bmm(filters, tiles)
        torch.bmm(products, tiles.transpose(1, 2))
        torch.bmm(filters.transpose(1, 2), products)

    calls = {
        "direct": lambda: F.conv2d(x, weight, bias, padding=1).backward(grad),
        "winograd": lambda: winograd_conv3x3(x, weight, bias).backward(grad),
        "winograd_matmuls_only": matmuls_only,
    }
    times = {name: milliseconds(call, repeats) for name, call in calls.items()}
    with torch.no_grad():
        reference = F.conv2d(x, weight, bias, padding=1)
        error = ((winograd_conv3x3(x, weight, bias) - reference).abs().max() / reference.abs().max()).item()
    return times, error


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ddpm-small-28")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="fuse the transforms with torch.compile")
    parser.add_argument("--output", type=Path, help="append the result as a JSON line")
    args = parser.parse_args(argv)
    if args.compile:
        compile_transforms()
    torch.manual_seed(0)
    totals = collections.Counter()
    worst_error = 0.0
    for (shape, out_channels), count in conv3x3_shapes(args.model, args.batch_size).items():
        times, error = time_layer(shape, out_channels, args.repeats)
        times = {name: count * ms for name, ms in times.items()}
        totals.update(times)
        worst_error = max(worst_error, error)
        print(f"{count} × conv {shape[1]}→{out_channels} at {shape[2]}×{shape[3]}: "
              + ", ".join(f"{name} {ms:.1f} ms" for name, ms in times.items()) + f"; rel. error {error:.1e}")
    result = {"model": args.model, "batch_size": args.batch_size, "compiled_transforms": args.compile,
              **{f"{name}_ms": round(ms, 1) for name, ms in totals.items()},
              "winograd_speedup": round(totals["direct"] / totals["winograd"], 3),
              "matmuls_only_speedup": round(totals["direct"] / totals["winograd_matmuls_only"], 3),
              "max_relative_error": worst_error}
    print(f"3×3 convolutions, forward + backward per step: direct {totals['direct']:.0f} ms, Winograd "
          f"{totals['winograd']:.0f} ms ({result['winograd_speedup']:.2f}×), its matmuls alone "
          f"{totals['winograd_matmuls_only']:.0f} ms ({result['matmuls_only_speedup']:.2f}×); "
          f"largest relative error {worst_error:.1e}")
    append_json_lines(args.output, [result])
    return result


if __name__ == "__main__":
    main()
