"""The bundle's networks in ONNX, run by ONNX Runtime (or OpenVINO) on the CPU; torch stays the reference.

``ichd export --runtime onnx`` adds, next to the safetensors weights (which Grad-CAM and the torch path
still use), one ONNX graph per fold model and a ``runtime`` section to ``bundle.json``::

    onnx/<member>/fold<k>.onnx          graph of fold model k of a 2D member (dynamic batch)

    "runtime": {"engine": "onnxruntime", "opset": 17,
                "files": {"<member>": {"<fold>": "onnx/<member>/fold<k>.onnx"}},
                "max_abs_diff": 1.2e-07}       # measured against torch on a random batch at export

What a graph computes: the model's input normalisation (mean 0.456, std 0.224), the learnable window when
the model has one, the backbone, its pooled feature and six logits (``CnnNet.forward_both``). What stays
outside: the views, i.e. crop, resize, flips and the recipe's windows, which :class:`ichdlib.cnn.data.DeviceAugment`
applies in torch before the graph, exactly as on the torch path, so both runtimes see the same pixels.
:class:`OrtNet` answers ``forward_both``/``__call__`` like the torch model, so the one prediction loop
(:func:`ichdlib.cnn.infer.predict`) serves both.

The graph files are listed with their sha256 in the manifest's ``files`` (checked when loaded); the
manifest's own checksum covers the ``runtime`` section. A new member type (e.g. a 3D CNN) plugs in by
registering how to wrap it for export (:data:`EXPORTERS`: member kind -> module with a tensor-only
``forward`` and an example input); the member's ``build`` gives the torch models.

Engines: ``onnxruntime`` (CPUExecutionProvider), ``openvino`` (reads the same ONNX file; float32) and
``openvino_bf16`` (bfloat16 matrix units where the CPU has them, e.g. AMX: faster, probabilities differ by
~1e-2; measure with ``benchmarks/predict.py --profiles`` before choosing it) on the CPU; on CUDA the torch
path runs (the graphs are exported and checked in float32 for the CPU). OpenVINO is optional
(``pip install openvino==2026.4.1``).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from ichdlib.serve.bundle import MANIFEST, Bundle, BundleError, _sha256, manifest_digest

OPSET = 17
ONNX_DIR = "onnx"
#: ``openvino_bf16``: OpenVINO computing in bfloat16 where the CPU has it (AMX / AVX512-BF16; else float32)
ENGINES = ("torch", "onnxruntime", "openvino", "openvino_bf16")
#: Largest |p_onnx - p_torch| accepted at export (probabilities; float32 reassociation gives ~1e-6).
EXPORT_TOLERANCE = 1e-4


class RuntimeSection(BaseModel):
    """``bundle.json``'s ``runtime`` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    engine: Literal["torch", "onnxruntime", "openvino", "openvino_bf16"]
    opset: int
    files: dict[str, dict[str, str]]
    max_abs_diff: float


class _Both(torch.nn.Module):
    """A 2D member's export form: ``x -> (pooled features, logits)``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_both(x)


def _cnn_example(entry: dict[str, Any], batch: int = 2) -> torch.Tensor:
    size = int(entry["size"])
    return torch.rand(batch, 3, size, size) * (1000.0 if entry["spec"].get("learnable_window") else 1.0)


#: member kind -> (wrap the torch model for export, an example input from its manifest entry)
EXPORTERS: dict[str, tuple[Callable[[torch.nn.Module], torch.nn.Module], Callable[..., torch.Tensor]]] = {
    "cnn": (_Both, _cnn_example),
}


def export_model(model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike, kind: str = "cnn",
                 opset: int = OPSET) -> Path:
    """Write ``model`` (a member's torch model) as an ONNX graph with a dynamic batch axis."""
    wrap, _ = EXPORTERS[kind]
    module = wrap(model).eval()  # export restores the wrapper's train flag afterwards: keep it in eval
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["feat", "logits"],
                          dynamic_axes={"x": {0: "batch"}, "feat": {0: "batch"}, "logits": {0: "batch"}})
    model.eval()
    return path


class OrtNet:
    """One exported fold model behind the torch model's interface (``forward_both``, ``__call__``, ``eval``):
    takes and returns CPU torch tensors, runs ONNX Runtime (or OpenVINO) inside."""

    def __init__(self, path: str | os.PathLike, engine: str = "onnxruntime", threads: int | None = None) -> None:
        self.path, self.engine = Path(path), engine
        threads = threads or torch.get_num_threads()
        if engine == "onnxruntime":
            import onnxruntime as ort  # noqa: PLC0415  (the onnx extra: loaded only for ONNX bundles)

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            so.enable_cpu_mem_arena = False  # the arena keeps a 512 px batch's peak (GBs) for the process's life
            self._session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
            self._run = lambda x: self._session.run(None, {"x": x})
        elif engine in ("openvino", "openvino_bf16"):
            import openvino as ov  # noqa: PLC0415  (optional: the openvino extra)

            core = ov.Core()
            precision = "bf16" if engine == "openvino_bf16" else "f32"
            compiled = core.compile_model(str(self.path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                 "INFERENCE_PRECISION_HINT": precision})
            request = compiled.create_infer_request()

            def run(x: np.ndarray) -> list[np.ndarray]:
                res = request.infer({0: x})
                return [np.asarray(res[compiled.output(i)]) for i in range(2)]

            self._run = run
        else:
            raise ValueError(f"unknown engine {engine!r}: expected one of {ENGINES[1:]}")

    def eval(self) -> OrtNet:
        return self

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat, logits = self._run(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))
        return torch.from_numpy(np.asarray(feat)), torch.from_numpy(np.asarray(logits))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_both(x)[1]


def max_prob_diff(model: torch.nn.Module, net: OrtNet, example: torch.Tensor) -> float:
    """Largest difference of sigmoid probabilities and of pooled features (relative to their scale)
    between the torch model and its exported graph on ``example``."""
    with torch.no_grad():
        f, lg = model.eval().forward_both(example)
    of, olg = net.forward_both(example)
    dp = float((torch.sigmoid(lg) - torch.sigmoid(olg)).abs().max())
    df = float((f - of).abs().max() / (f.abs().max() + 1e-6))
    return max(dp, df)


def add_onnx(folder: str | os.PathLike, engine: str = "onnxruntime", opset: int = OPSET) -> dict[str, Any]:
    """Export every 2D fold model of the saved bundle at ``folder`` to ``folder/onnx/``, check each graph
    against torch (:data:`EXPORT_TOLERANCE`), and rewrite ``bundle.json`` with the ``runtime`` section, the
    graphs' checksums and a new integrity digest. Returns the runtime section."""
    folder = Path(folder)
    bundle = Bundle.load(folder)
    files: dict[str, dict[str, str]] = {}
    checksums: dict[str, str] = {}
    worst = 0.0
    torch.manual_seed(0)
    for key, member in bundle.cnn.items():
        _, make_example = EXPORTERS[member.kind]
        example = make_example(bundle.backbone(key))
        files[key] = {}
        for fold, model in zip(member.folds, member.build("cpu"), strict=True):
            rel = f"{ONNX_DIR}/{key}/fold{fold}.onnx"
            export_model(model, example, folder / rel, member.kind, opset)
            diff = max_prob_diff(model, OrtNet(folder / rel, "onnxruntime", 1), example)
            if not diff <= EXPORT_TOLERANCE:
                raise BundleError(f"{folder / rel}: ONNX graph differs from the torch model by {diff:.2e} "
                                  f"(tolerance {EXPORT_TOLERANCE:g}); the model has an op that does not export")
            worst = max(worst, diff)
            (folder / rel).chmod(0o644)
            (folder / rel).parent.chmod(0o755)
            files[key][str(fold)] = rel
            checksums[rel] = _sha256(folder / rel)
    (folder / ONNX_DIR).chmod(0o755)
    section = RuntimeSection(engine=engine, opset=opset, files=files, max_abs_diff=worst).model_dump()
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["runtime"] = section
    manifest["files"] = {**manifest["files"], **checksums}
    manifest.pop("integrity", None)
    manifest["integrity"] = manifest_digest(manifest)
    _write_json(folder / MANIFEST, manifest)
    Bundle.load(folder)  # the rewritten manifest validates
    return section


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(data, indent=1))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def profile_views(bundle: Any, views: list[Any]) -> list[Any]:
    """The TTA views a bundle runs: all of ``views``, or those its ``profile`` section keeps
    (:mod:`ichdlib.serve.profiles`)."""
    keep = (bundle.manifest.get("profile") or {}).get("views")
    if keep is None:
        return list(views)
    if not keep or any(not isinstance(i, int) or not 0 <= i < len(views) for i in keep):
        raise ValueError(f"{bundle.source}: bundle.json profile.views {keep} must name some of the "
                         f"{len(views)} TTA views (0..{len(views) - 1})")
    return [views[i] for i in keep]


def bundle_engine(bundle: Any) -> str:
    """The engine the bundle asks for (``torch`` for bundles without a ``runtime`` section)."""
    section = bundle.manifest.get("runtime")
    return "torch" if not section else str(section["engine"])


def cnn_runners(bundle: Any, engine: str | None = None, threads: int | None = None,
                verify: bool = True) -> dict[str, list[OrtNet]]:
    """One :class:`OrtNet` per fold model of every 2D member of ``bundle`` (a loaded bundle folder with a
    ``runtime`` section), in the members' fold order; the graphs' checksums are checked against ``files``."""
    raw = bundle.manifest.get("runtime")
    if not raw:
        raise BundleError(f"{bundle.source}: the bundle has no ONNX graphs; export it with 'ichd export "
                          "--runtime onnx'")
    section = RuntimeSection.model_validate(raw)
    engine = engine or section.engine
    base = Path(bundle.source)
    out: dict[str, list[OrtNet]] = {}
    for key, member in bundle.cnn.items():
        nets = []
        for fold in member.folds:
            rel = section.files.get(key, {}).get(str(fold))
            if rel is None:
                raise BundleError(f"{base / 'bundle.json'}: runtime.files has no graph for {key!r} fold {fold}")
            path = base / rel
            if not path.is_file():
                raise BundleError(f"{path}: missing ONNX graph of {key!r} fold {fold}")
            if verify and _sha256(path) != bundle.manifest["files"].get(rel):
                raise BundleError(f"{path}: checksum differs from bundle.json (damaged or replaced file)")
            nets.append(OrtNet(path, engine, threads))
        out[key] = nets
    return out
