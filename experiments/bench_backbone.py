"""Benchmark the backbone: grid-objective step time against a final-exit-only step, and inference images/s.

    python experiments/bench_backbone.py --dataset fashion-mnist
"""

from __future__ import annotations

import argparse
import time

import torch

from backbone import AdaPerceiver
from backbone.config import preset
from backbone.data import load_dataset
from backbone.errors import HelpFormatter, positive_int, run_cli
from backbone.io import check_output_path, write_json
from backbone.train import TrainConfig, TrainingForward, grid_loss_weights, sample_widths, training_loss


def step_seconds(model: AdaPerceiver, objective: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median seconds of one optimizer step of ``objective`` ('grid' or 'full') on batch ``x``."""
    train = TrainConfig(objective=objective)
    weights = grid_loss_weights(model.config, train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        widths = sample_widths(model.config, len(x), 0.5, generator)
        loss = training_loss(TrainingForward(model, objective), x, y, widths, weights, train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def inference_images_per_s(model: AdaPerceiver, x: torch.Tensor, config: tuple, repeats: int) -> float:
    model.eval()
    model(x, *config)
    start = time.perf_counter()
    for _ in range(repeats):
        model(x, *config)
    return repeats * len(x) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="digits", help="'digits', 'fashion-mnist' or a path to an .npz")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per batch")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed training steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    args = parser.parse_args(argv)
    check_output_path(args.json, "--json")
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_dataset(args.dataset)
    torch.manual_seed(0)
    model = AdaPerceiver(preset(data.name, data.image_shape, data.num_classes))
    split = data.splits["backbone_train"]
    x, y = split.x[: args.batch_size], split.y[: args.batch_size]
    model.train()
    grid = step_seconds(model, "grid", x, y, args.steps)
    final = step_seconds(model, "full", x, y, args.steps)
    c = model.config
    smallest = (c.token_grans[0], 1, c.ffn_widths[0])
    full_speed = inference_images_per_s(model, x, (None, None, None), args.steps)
    small_speed = inference_images_per_s(model, x, smallest, args.steps)
    result = {
        "dataset": data.name,
        "batch_size": len(x),
        "threads": torch.get_num_threads(),
        "grid_step_s": grid,
        "final_exit_step_s": final,
        "grid_over_final_exit": grid / final,
        "inference_full_images_per_s": full_speed,
        "inference_smallest_images_per_s": small_speed,
    }
    print(f"training step, batch {len(x)}: grid objective {1e3 * grid:.1f} ms, final exit only {1e3 * final:.1f} ms, "
          f"ratio {grid / final:.2f} (goal <= 1.5)")
    print(f"inference images/s: full {full_speed:,.0f}, smallest {smallest} {small_speed:,.0f}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    run_cli(main)
