"""End-to-end SLTrain vs dense: a small transformer language model on synthetic data.

Trains the same decoder-only transformer twice for the same number of steps, once with
dense ``nn.Linear`` layers and once with every attention and MLP projection converted
to :class:`lowrank_ops.nn.SparseLowRankLinear` (``lowrank_ops.methods.sltrain.convert``),
and reports trainable parameters, AdamW optimizer-state memory, median step time and the
held-out loss.

The data is a random sparse Markov chain over ``vocab`` tokens (each token has a few
likely successors), so the achievable loss is the chain's entropy rate, printed as the
floor.  Runs on CPU in about a minute with the defaults:

    python examples/sltrain_lm.py --steps 200
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lowrank_ops.methods import sltrain


class MarkovChain:
    """Token sequences from a random transition matrix with ``branching`` likely successors."""

    def __init__(self, vocab: int, branching: int, generator: torch.Generator):
        logits = torch.full((vocab, vocab), -8.0)
        for token in range(vocab):
            successors = torch.randperm(vocab, generator=generator)[:branching]
            logits[token, successors] = torch.randn(branching, generator=generator)
        self.transition = logits.softmax(-1)
        self.generator = generator

    def entropy_rate(self) -> float:
        """Average next-token entropy (nats) under the stationary distribution."""
        stationary = torch.full((self.transition.shape[0],), 1.0 / self.transition.shape[0])
        for _ in range(200):
            stationary = stationary @ self.transition
        entropy = -(self.transition * self.transition.clamp_min(1e-30).log()).sum(-1)
        return float(stationary @ entropy)

    def sample(self, batch: int, length: int) -> torch.Tensor:
        tokens = torch.empty(batch, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.transition.shape[0], (batch,), generator=self.generator)
        for t in range(1, length):
            tokens[:, t] = torch.multinomial(self.transition[tokens[:, t - 1]], 1, generator=self.generator)[:, 0]
        return tokens


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.up_proj = torch.nn.Linear(dim, hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(batch, length, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.down_proj(F.gelu(self.up_proj(self.norm2(x))))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, hidden: int, length: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.position = torch.nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def train(model, data, args, label):
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    held_out = data.sample(args.batch, args.length + 1)
    step_times, losses = [], []
    for step in range(args.steps):
        batch = data.sample(args.batch, args.length + 1)
        start = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(held_out[:, :-1])
        eval_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), held_out[:, 1:].reshape(-1)).item()
    return {
        "model": label,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_MB": optimizer_state_bytes(optimizer) / 2**20,
        "median_step_ms": 1e3 * statistics.median(step_times[min(5, len(step_times) - 1):]),
        "train_loss_last10": statistics.fmean(losses[-10:]),
        "eval_loss": eval_loss,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=683, help="MLP width (8/3 of dim, as LLaMA)")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    results = []
    for label in ("dense", "sltrain"):
        torch.manual_seed(args.seed)
        data = MarkovChain(args.vocab, branching=4, generator=torch.Generator().manual_seed(args.seed))
        model = TinyLM(args.vocab, args.dim, args.layers, args.heads, args.hidden, args.length)
        if label == "sltrain":
            report = sltrain.convert(
                model, args.rank, args.density, target_modules=["*_proj"], alpha=args.alpha,
                generator=torch.Generator().manual_seed(args.seed),
            )
            print(report, file=sys.stderr if args.json else sys.stdout)  # --json: stdout holds only the JSON
        results.append(train(model, data, args, label))
    floor = MarkovChain(args.vocab, 4, torch.Generator().manual_seed(args.seed)).entropy_rate()

    if args.json:
        print(json.dumps({"config": vars(args), "entropy_floor": floor, "results": results}, indent=1))
        return
    print(f"\n{args.steps} steps, batch {args.batch} x {args.length} tokens; loss floor (entropy rate) {floor:.3f}, "
          f"uniform {math.log(args.vocab):.3f}")
    header = f"{'model':8} {'trainable params':>17} {'AdamW state MB':>15} {'step ms':>8} {'train loss':>11} {'eval loss':>10}"
    print(header)
    for r in results:
        print(f"{r['model']:8} {r['trainable_parameters']:>17,} {r['optimizer_state_MB']:>15.2f} "
              f"{r['median_step_ms']:>8.1f} {r['train_loss_last10']:>11.3f} {r['eval_loss']:>10.3f}")


if __name__ == "__main__":
    main()
