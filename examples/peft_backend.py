"""lowrank_ops as PEFT's LoRA backend: a short, runnable example.

Builds a small MLP, wraps it with PEFT LoRA (or DoRA with ``--dora``) whose ``nn.Linear``
layers run on lowrank_ops' fused ops, trains it on a toy regression for a few steps,
saves the adapter and loads it into plain PEFT (no lowrank_ops) to show the outputs agree.

    python examples/peft_backend.py [--dora] [--steps 50]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lowrank_ops.integrations.peft import use_lowrank_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dora", action="store_true", help="use DoRA instead of LoRA")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    teacher = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh())
    config = use_lowrank_ops(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, use_dora=args.dora,
                                        target_modules=["0", "2"]))
    model = get_peft_model(copy.deepcopy(base), config)
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    start = time.perf_counter()
    for step in range(args.steps):
        x = torch.randn(64, 256)
        with torch.no_grad():
            target = base(x) + 0.1 * teacher(x)
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.5f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.2f} s")

    model.eval()
    x = torch.randn(8, 256)
    with torch.no_grad(), tempfile.TemporaryDirectory() as directory:
        ours = model(x)
        model.save_pretrained(directory)
        plain = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()  # plain PEFT layers
        theirs = plain(x)
        merged = plain.merge_and_unload()(x)
    print(f"max |ours - plain PEFT|   = {(ours - theirs).abs().max().item():.2e}")
    print(f"max |ours - merged model| = {(ours - merged).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
