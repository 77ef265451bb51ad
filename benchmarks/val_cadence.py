"""What share of a fold's time validation takes under a params file's validation cadence, from measured
per-image costs.

    python benchmarks/val_cadence.py --params params/rsna_gpu.yaml [--device cuda] [--json out.json]

Measures, for the params' first backbone, seconds per image of a training step (augment + forward +
backward + Adam) and of a validation pass (eval view + forward, no grad, batch x 2) after a warm-up, then
applies them to RSNA stage 2's full size under the params' schedule: per epoch the study sampler's
``k x training studies`` images (rounded up to whole batches), full validation of the held-out fold
(1/5 of 752,803 slices) every ``cnn.val_every`` epochs and at the last, ``cnn.val_subset`` slices at the
other epochs, and the fold's test prediction (121,232 slices) once. Data loading is left out on both
sides (the loaders run ahead of the GPU when they have enough workers).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RSNA_TRAIN_SLICES, RSNA_TRAIN_STUDIES, RSNA_TEST_SLICES = 752_803, 21_744, 121_232


def per_image_costs(name: str, size: int, batch: int, device: str, amp: bool, steps: int, P) -> tuple[float, float]:
    """(training seconds per image, validation seconds per image)."""
    import torch

    from ichdlib.cnn.data import DeviceAugment
    from ichdlib.cnn.models import build_cnn
    from ichdlib.cnn.train import weighted_bce
    from ichdlib.runtime import autocast as _autocast
    from ichdlib.runtime import prepare_model

    torch.manual_seed(0)
    model, runner = prepare_model(build_cnn(name), P, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    aug = DeviceAugment.from_params(P, size)
    cuda = device == "cuda"
    dtype = (torch.float16 if P.cnn.amp_dtype == "fp16" else torch.bfloat16) if amp and cuda else False
    w = torch.tensor(P.cnn.class_weights, device=device)

    def timed(fn, n: int) -> float:
        fn()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    x = torch.randint(-1000, 1000, (batch, 3, size, size), dtype=torch.int16, device=device)
    y = (torch.rand(batch, 6, device=device) < 0.2).float()
    xv = torch.randint(-1000, 1000, (2 * batch, 3, size, size), dtype=torch.int16, device=device)

    def train_step() -> None:
        model.train()
        aug.train()
        with torch.no_grad():
            inp = aug(x)
        with _autocast(device, dtype):
            logits = runner(inp)
        loss = weighted_bce(logits, y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def val_step() -> None:
        model.eval()
        aug.eval()
        with _autocast(device, dtype):
            torch.sigmoid(runner(aug(xv)).float())

    return timed(train_step, steps) / batch, timed(val_step, steps) / (2 * batch)


def schedule_share(P, cfg, t_train: float, t_val: float, folds: int = 5) -> dict:
    """The arithmetic: images and seconds per fold for training, validation and test prediction."""
    train_studies = RSNA_TRAIN_STUDIES * (folds - 1) / folds
    steps = math.ceil(P.cnn.study_sampler_k * train_studies / cfg.batch)
    if P.cnn.max_steps_per_epoch:
        steps = min(steps, P.cnn.max_steps_per_epoch)
    per_epoch = steps * cfg.batch
    n_val = round(RSNA_TRAIN_SLICES / folds)
    full = [e for e in range(cfg.epochs) if (e + 1) % P.cnn.val_every == 0 or e == cfg.epochs - 1]
    sub = cfg.epochs - len(full) if P.cnn.val_subset else 0
    val_images = len(full) * n_val + sub * min(P.cnn.val_subset or 0, n_val)
    train_s = cfg.epochs * per_epoch * t_train
    val_s = val_images * t_val
    test_s = RSNA_TEST_SLICES * t_val
    total = train_s + val_s + test_s
    return {"train_images_per_epoch": per_epoch, "epochs": cfg.epochs, "full_validations": len(full),
            "subset_validations": sub, "val_images_per_fold": val_images, "test_images_per_fold": RSNA_TEST_SLICES,
            "train_s_per_image": t_train, "val_s_per_image": t_val, "val_vs_train_per_image": t_val / t_train,
            "train_hours": train_s / 3600, "validation_hours": val_s / 3600, "test_hours": test_s / 3600,
            "validation_share": val_s / total, "validation_and_test_share": (val_s + test_s) / total,
            "every_epoch_full_share": (cfg.epochs * n_val * t_val)
            / (train_s + cfg.epochs * n_val * t_val + test_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params" / "rsna_gpu.yaml"))
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--size", type=int, default=None, help="measure at this size instead (CPU: e.g. 128)")
    ap.add_argument("--batch", type=int, default=None, help="measure with this batch instead")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from ichdlib.config import load_params

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    P = load_params(args.params, {"device": device})
    cfg = P.cnn.backbones[0]
    size, batch = args.size or cfg.size, args.batch or cfg.batch
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    t_train, t_val = per_image_costs(cfg.name, size, batch, device, P.cnn.amp, args.steps, P)
    res = {"params": str(args.params), "backbone": cfg.key, "measured_on": device, "measured_size": size,
           "measured_batch": batch, "val_every": P.cnn.val_every, "val_subset": P.cnn.val_subset,
           **schedule_share(P, cfg, t_train, t_val)}
    for k, v in res.items():
        print(f"{k:>28}: {round(v, 4) if isinstance(v, float) else v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
