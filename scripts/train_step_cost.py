"""Time one training step (AdamW, batch 16, 256 px, channels-last) in float32 and bfloat16 autocast.

    python scripts/train_step_cost.py [ARCH:HEAD:ATTENTION ...] [--threads N] [--steps N]

Information for planning CPU training (docs/performance.md, session 17): whether bfloat16
autocast would pay on this CPU. Random inputs and an untrained net: only the time is measured.
Prints the mean milliseconds of ``--steps`` steps after one warm-up step, twice per precision,
alternating, so that a drift of the machine shows as disagreement between the two rounds.
"""

from __future__ import annotations

import argparse
import time

import torch

from ml.models import ModelSpec, build_model


def step_ms(model: torch.nn.Module, optimizer: torch.optim.Optimizer, bf16: bool, steps: int) -> float:
    x = torch.randn(16, 3, 256, 256).to(memory_format=torch.channels_last)

    def one() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            first = out if isinstance(out, torch.Tensor) else next(iter(out.values()))
            loss = first.float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    one()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "specs",
        nargs="*",
        default=["mobilenetv2_100:regression:none", "tf_efficientnet_lite1:multitask:cbam"],
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.specs:
        arch, head, attention = spec.split(":")
        model = build_model(ModelSpec(arch=arch, head=head, attention=attention)).to(
            memory_format=torch.channels_last
        )
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for bf16 in (False, True, False, True):
            ms = step_ms(model, optimizer, bf16, args.steps)
            print(f"{arch} {'bf16' if bf16 else 'f32 '} {ms:7.0f} ms per step of 16", flush=True)


if __name__ == "__main__":
    main()
