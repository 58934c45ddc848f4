"""One-shot OBS pruning with the M-FAC inverse Fisher, against magnitude pruning.

Trains a small MLP with the MFAC optimizer on a synthetic 10-class problem, collects
128 mini-batch gradients, and prunes the two weight matrices to 70 % sparsity three
ways: by magnitude, by OBS saliency alone, and by OBS with the weight update (one Fisher
over all 2688 weights, through MFACInverse).  Prints the training loss after each.
Under a minute on a 2-core CPU:

    python examples/mfac_prune.py
"""
import copy

import torch

from lowrank_ops.methods.mfac_pruning import collect_gradients, obs_prune
from lowrank_ops.optim import MFAC

torch.manual_seed(0)
X = torch.randn(2048, 32)
y = (X @ torch.randn(32, 10) + 0.5 * torch.randn(2048, 10)).argmax(1)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
loss_fn = torch.nn.functional.cross_entropy

opt = MFAC(model.parameters(), lr=0.05, ngrads=64, damp=0.1)
for step in range(200):
    idx = torch.randint(0, len(X), (128,))
    opt.zero_grad()
    loss_fn(model(X[idx]), y[idx]).backward()
    opt.step()


def full_loss(net) -> float:
    with torch.no_grad():
        return loss_fn(net(X), y).item()


def weights(net):
    return [net[0].weight, net[2].weight]


print(f"dense model: loss {full_loss(model):.4f}")
batches = [torch.randint(0, len(X), (16,)) for _ in range(128)]
grads = collect_gradients(weights(model), lambda idx: loss_fn(model(X[idx]), y[idx]), batches)

magnitude = copy.deepcopy(model)
with torch.no_grad():
    flat = torch.cat([w.reshape(-1) for w in weights(magnitude)])
    threshold = flat.abs().kthvalue(int(0.7 * flat.numel())).values
    for w in weights(magnitude):
        w.mul_(w.abs() > threshold)
print(f"magnitude, 70% sparse: loss {full_loss(magnitude):.4f}")

for update in (False, True):
    pruned = copy.deepcopy(model)
    obs_prune(weights(pruned), grads, damp=1e-3, sparsity=0.7, update_weights=update)
    label = "OBS scores + update" if update else "OBS scores only"
    print(f"{label}, 70% sparse: loss {full_loss(pruned):.4f}")
