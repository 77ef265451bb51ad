"""Images/s of the 2D training step alone (plain loop) and under torchrun/DDP with 1..N ranks.

    python benchmarks/ddp_scaling.py --device cuda --ranks 1 2 4 8 --json out.json       (NCCL)
    python benchmarks/ddp_scaling.py --device cpu --model lcnet_050 --size 64 --batch 32  (gloo, here)

Each configuration runs the library's step (device augmentation + windows, the backbone, weighted BCE,
Adam) on random int16 HU stacks already on the device, so the figures isolate the model and the
gradient all-reduce from data loading. The global batch stays ``--batch`` (each rank takes batch/N), as
in ``ichd train``. Reported as ratios: ``ddp1_vs_plain`` (the cost of the DDP wrapper on one rank) and
``scaling[N]`` = img/s at N ranks / img/s at 1 rank (ideal: N). The N-rank runs are launched with
``torch.distributed.run --standalone`` (this script re-invoked with ``--worker``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(args: argparse.Namespace, ddp: bool) -> float:
    """Images/s of ``args.steps`` timed steps after ``args.warmup`` (global images, all ranks)."""
    import torch

    from ichdlib.cnn import distributed as D
    from ichdlib.cnn.data import DeviceAugment
    from ichdlib.cnn.models import build_cnn
    from ichdlib.cnn.train import ddp_wrap, weighted_bce
    from ichdlib.config import load_params
    from ichdlib.runtime import autocast as _autocast
    from ichdlib.runtime import prepare_model

    device = args.device
    P = load_params(REPO / "params" / "smoke.yaml",
                    {"device": device, "cnn": {"amp": args.amp, "compile": args.compile, "channels_last": True}})
    torch.manual_seed(0)
    model = build_cnn(args.model)
    model, runner = prepare_model(model, P, device)
    runner = ddp_wrap(model, P, device) if ddp and D.is_dist() else runner
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    aug = DeviceAugment.from_params(P, args.size).train()
    local = len(range(args.batch)[D.shard_slice(args.batch)])
    gen = torch.Generator(device=device).manual_seed(D.rank())
    x = torch.randint(-1000, 1000, (local, 3, args.size, args.size), dtype=torch.int16, device=device, generator=gen)
    y = (torch.rand(local, 6, device=device, generator=gen) < 0.2).float()
    w = torch.tensor(P.cnn.class_weights, device=device)
    amp = torch.bfloat16 if args.amp and device == "cuda" else False
    cuda = device == "cuda"

    def step() -> None:
        with torch.no_grad():
            inp = aug(x)
        if cuda:
            inp = inp.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = runner(inp)
        loss = weighted_bce(logits, y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    D.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    D.barrier()
    return args.batch * args.steps / (time.perf_counter() - t0)


def worker(args: argparse.Namespace) -> None:
    import torch

    from ichdlib.cnn import distributed as D

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    with D.session(args.device):
        ips = measure(args, ddp=True)
        if D.is_main():
            Path(args.result).write_text(json.dumps({"images_per_s": ips, "world": D.world_size()}))


def launch(args: argparse.Namespace, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               __file__, "--worker", "--result", str(result), *sys.argv[1:]]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(cmd, check=True, env=env)
        return float(json.loads(result.read_text())["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="world sizes (default: 1 and all GPUs)")
    ap.add_argument("--model", default="densenet121")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (CUDA)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank on the CPU")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    ranks = sorted(set(args.ranks or [1, max(1, torch.cuda.device_count() if args.device == "cuda" else 2)]))
    plain = measure(args, ddp=False)
    per = {n: launch(args, n) for n in ranks}
    base = per.get(1)
    res = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
           "model": args.model, "size": args.size, "global_batch": args.batch, "steps": args.steps,
           "amp": bool(args.amp and args.device == "cuda"), "compile": args.compile,
           "plain_images_per_s": round(plain, 1), "ddp_images_per_s": {n: round(v, 1) for n, v in per.items()},
           "ddp1_vs_plain": round(base / plain, 3) if base else None,
           "scaling": {n: round(v / base, 3) for n, v in per.items()} if base else None}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


if __name__ == "__main__":
    main()
