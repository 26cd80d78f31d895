"""Quickstart: adapters on a small CNN, trained, saved, loaded onto a fresh base, merged away.

Run it from the repository root: ``python docs/quickstart.py`` (CPU, a few seconds; writes into
``runs/quickstart/``). ``tests/test_quickstart.py`` runs this file, so it cannot drift.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import convlora

torch.manual_seed(0)
out = Path("runs/quickstart")
out.mkdir(parents=True, exist_ok=True)


def make_base() -> nn.Module:  # any CNN; here a tiny x2 super-resolution network
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 3 * 4, 3, padding=1), nn.PixelShuffle(2),
    )


# 0. A trained base, as it would be shipped: a state dict in a safetensors file.
save_file(make_base().state_dict(), out / "base.safetensors")
model = make_base()
model.load_state_dict(load_file(out / "base.safetensors"))

# 1. Inject: rank-4 adapters on every conv, rank 8 on the upsampler ("4"); the base is frozen.
names = convlora.inject(model, rank=4, rank_pattern={"4": 8})
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
total = sum(p.numel() for p in model.parameters())
print(f"adapters on {names}: {trainable:,} trainable of {total:,} parameters")

# 2. Train only the adapters.
opt = torch.optim.Adam(convlora.lora_parameters(model), lr=1e-3)
x, y = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 64, 64)
for step in range(30):
    loss = (model(x) - y).abs().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step in (0, 29):
        print(f"step {step:2d}  L1 {loss.item():.4f}")

# 3. Save the adapter (a small safetensors file with its config and a fingerprint of the base)
#    and load it onto a fresh copy of the base: the same outputs.
adapter = convlora.save_adapter(model, out / "task.safetensors", metadata={"task": "demo"})
print(f"{adapter}: {adapter.stat().st_size:,} bytes")
fresh = make_base()
fresh.load_state_dict(load_file(out / "base.safetensors"))
convlora.load_adapter(fresh, out / "task.safetensors")
with torch.no_grad():
    y_adapted = model(x)
    assert torch.equal(fresh(x), y_adapted)

# 4. Deploy: unload merges the adapter into the weights and puts the original layers back, with
#    the original state-dict keys; outputs agree with the adapted model up to float round-off.
deploy = convlora.unload(fresh)
assert all(type(m) in (nn.Conv2d, nn.ReLU, nn.PixelShuffle) for m in deploy)
assert deploy.state_dict().keys() == make_base().state_dict().keys()
save_file(deploy.state_dict(), out / "deploy.safetensors")
with torch.no_grad():
    diff = (deploy(x) - y_adapted).abs().max().item()
print(f"deployed: plain {type(deploy[0]).__name__} layers, max |merged - adapted| = {diff:.1e}")
