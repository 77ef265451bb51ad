"""The 3D CNN member's model costs: training slices/s, activation memory per crop, whole-study inference.

    python benchmarks/cnn3d_throughput.py [--params params/rsna_gpu.yaml] [--device cuda] [--steps 10] [--json OUT]
    python benchmarks/cnn3d_throughput.py --depth 10 --widen 0.25 --size 96 --slices 12 --batch 4   # the CPU demo's

With the params' ``cnn3d`` section (flags override it): a training step (forward, weighted BCE over the
slices, backward, Adam) on random windowed crops ``(batch, 3, slices, size, size)`` under the loop's autocast
(bf16 on CUDA), timed over ``--steps`` steps after two warm-up steps; the bytes autograd saves for backward
per crop (counted with ``torch.autograd.graph.saved_tensors_hooks``, the activation memory that grows with the
batch); on CUDA the peak allocated memory of a training step; and the seconds of one whole-study forward pass
for studies of 32 and 60 slices (the evaluation path). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def saved_bytes(model, x) -> int:
    """Bytes autograd keeps for backward in one forward pass of ``x`` (activations)."""
    import torch

    total = 0
    seen: set[int] = set()

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).float().sum()
    return total


def main(argv: list[str] | None = None) -> dict:
    import torch

    from ichdlib.cnn.train import weighted_bce
    from ichdlib.cnn3d.models import build_net3d
    from ichdlib.config import load_params
    from ichdlib.runtime import amp_mode, autocast
    from ichdlib.spec import VolumeSpec

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(REPO / "params/rsna_gpu.yaml"))
    ap.add_argument("--device", default="cpu")
    for k, t in (("depth", int), ("widen", float), ("size", int), ("slices", int), ("batch", int)):
        ap.add_argument(f"--{k}", type=t)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    over = {k: getattr(args, k) for k in ("depth", "widen", "size", "slices", "batch") if getattr(args, k) is not None}
    P = load_params(args.params, {"device": args.device, "cnn3d": {"enabled": True, **over}})
    c, dev = P.cnn3d, args.device
    cuda = dev.startswith("cuda")
    amp = amp_mode(P, dev)
    torch.manual_seed(0)
    model = build_net3d(VolumeSpec.from_params(P)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    w = torch.tensor(P.cnn.class_weights, device=dev)
    x = torch.rand(c.batch, 3, c.slices, c.size, c.size, device=dev)
    y = (torch.rand(c.batch, c.slices, 6, device=dev) < 0.1).float()
    with autocast(dev, amp):
        per_crop = saved_bytes(model, x[:1])
    opt.zero_grad(set_to_none=True)

    def step():
        with autocast(dev, amp):
            logits = model(x)
        loss = weighted_bce(logits.reshape(-1, 6), y.reshape(-1, 6), w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / args.steps
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "arch": f"resnet{c.depth}", "widen": c.widen,
           "size": c.size, "slices": c.slices, "batch": c.batch, "amp": str(amp),
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "train_step_s": round(secs, 4), "train_slices_per_s": round(c.batch * c.slices / secs, 1),
           "saved_activation_gb_per_crop": round(per_crop / 1e9, 3), "saved_activation_bytes_per_crop": per_crop,
           "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None}
    model.eval()
    for n in (32, 60):
        v = torch.rand(1, 3, n, c.size, c.size, device=dev)
        with torch.no_grad(), autocast(dev, amp):
            model(v)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(v)
            if cuda:
                torch.cuda.synchronize()
        out[f"study{n}_forward_s"] = round(time.perf_counter() - t0, 4)
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
