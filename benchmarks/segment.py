"""Segmentation speed: inference patches/s on 256 px images with mirror padding, and training step time.

Prints one `name value unit` line per measurement (random weights; speed only)::

    python benchmarks/segment.py [--base-channels 64] [--batch-size 4] [--device auto] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch

from histosynth.devices import pick_device
from histosynth.schema import RENAL
from histosynth.segment.geometry import mirror_padding_for
from histosynth.segment.predict import predict_images
from histosynth.segment.segmenter import Segmenter
from histosynth.segment.training import segmentation_loss


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        step()
    _synchronise(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _synchronise(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=8, help="256 px images per inference measurement")
    parser.add_argument("--train-input", type=int, default=428, help="training window (valid size)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    segmenter = Segmenter.for_class(RENAL, None, base_channels=args.base_channels)
    net = segmenter.net.to(device)
    print(f"segment_params {sum(p.numel() for p in net.parameters())} parameters")
    print(f"segment_mirror_padding_256 {mirror_padding_for(256)} px")

    images = list(np.random.default_rng(0).integers(0, 256, (args.images, 256, 256, 3), dtype=np.uint8))
    for coverage, window in (("thesis", 428), ("full", 444)):
        step = functools.partial(predict_images, segmenter, images, coverage=coverage, batch_size=args.batch_size,
                                 device=str(device))
        seconds = median_seconds(step, device, args.repeats)
        print(f"segment_infer_256_{coverage}_{window}px_bs{args.batch_size} {args.images / seconds:.2f} patches/s")

    net.train()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-4)
    inputs = torch.randn(args.batch_size, 3, args.train_input, args.train_input, device=device)
    out = args.train_input - 184
    labels = torch.randint(0, segmenter.schema.num_classes, (args.batch_size, out, out), device=device)

    def train_step() -> None:
        optimiser.zero_grad(set_to_none=True)
        segmentation_loss(segmenter, net(inputs), labels).backward()
        optimiser.step()

    seconds = median_seconds(train_step, device, args.repeats)
    print(f"segment_train_step_{args.train_input}px_bs{args.batch_size} {seconds:.4f} s")
    print(f"segment_train_throughput_{args.train_input}px {args.batch_size / seconds:.2f} patches/s")
    if device.type == "cuda":
        print(f"segment_peak_memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
