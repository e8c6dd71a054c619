"""`ganpipe export`: a snapshot's EMA generator as an ONNX or TorchScript file, for serving.

    ganpipe export --snapshot RUN/snapshots/snapshot-000200000.json --format onnx --out G.onnx
    ganpipe export --snapshot RUN/snapshots/snapshot-000200000.json --format torchscript --out G.pt

The exported graph (names as in the ONNX file; TorchScript's `forward` takes them positionally):

    z        float32 (N, z_dim)                  latents
    label    int64 (N,)                          class of each image; conditional generators only
    noise_0 .. noise_{K-1}  float32 (N, 1, s, s) stylegan2 only: the per-pixel noise maps of
                                                 `G.noise_shapes()`, one per synthesis layer
    image    float32 (N, C, H, W) in [-1, 1]     the output (flat data: (N, C))

N is dynamic. The noise maps are inputs, not fixed inside the graph: a server draws them (standard
normal) as it draws z, and `pipeline.generate.draw(G, seed, start, count)` gives the z and noise
that `ganpipe sample` uses, so the exported file reproduces its images (to the tolerance below).
Pass zeros to switch the noise off. Truncation is not baked in (psi = 1).

What is exported is the eval-mode generator, exactly what `ganpipe sample` runs: BatchNorm with
its running statistics, the eval-mode clamp to [-1, 1], and spectral norm (in G for biggan) folded
into plain weights computed from the stored power-iteration vectors, as eval mode computes them.
Both formats are traced at one batch size; before the file is put in place it is run
(onnxruntime, or torch.jit.load) at two other batch sizes and compared with the eager generator:
a max abs difference above `TOLERANCE` is an error and nothing is written. A generator the
exporter cannot trace is one line naming the family and the format (r3gan to ONNX: its resampling
builds the filter from the input's channel count, which the TorchScript-based ONNX exporter
cannot give a static shape; TorchScript works). The file is written atomically and carries the
snapshot's record (family, kimg, sha256) as metadata.
ONNX uses torch's TorchScript-based exporter (`dynamo=False`, opset `OPSET`): it needs no
onnxscript and is what torch 2.14, which ganpipe pins, still ships. Needs the `export` extra
(`pip install -e '.[export]'`: onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.io import atomic_path

FORMATS = ("onnx", "torchscript")
OPSET = 17
TOLERANCE = 1e-4                # max abs difference from the eager G, on outputs in [-1, 1]
TRACE_BATCH = 2                 # batch the graph is traced at
CHECK_BATCHES = (1, 3)          # batches the written file is checked at (other than the traced one)


class Exportable(nn.Module):
    """G with a flat positional signature: (z, [label], *noise) -> image."""

    def __init__(self, G: nn.Module):
        super().__init__()
        self.G = G
        self.conditional = bool(G.num_classes)

    def forward(self, z: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        label = rest[0] if self.conditional else None
        noise = list(rest[1:] if self.conditional else rest)
        return self.G(z, label, noise=noise)


def prepared(G: nn.Module) -> Exportable:
    """An eval-mode CPU copy of G with every parametrization (spectral norm) folded into a plain
    weight; the caller's module keeps its mode, device and parametrizations."""
    from torch.nn.utils import parametrize

    G = copy.deepcopy(G).cpu().eval().requires_grad_(False)
    for module in G.modules():
        if parametrize.is_parametrized(module):
            # Eval mode: each weight as the forward computes it, from the stored u and v (no power
            # iteration). Done by hand because `remove_parametrizations` deletes the property from
            # the module's class, which the deep copy shares with the original: it would break G.
            weights = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
            module.__class__ = module.__class__.__bases__[0]      # the class before parametrization
            del module._modules["parametrizations"]
            for name, weight in weights.items():
                module.register_parameter(name, nn.Parameter(weight, requires_grad=False))
    return Exportable(G).eval()


@contextlib.contextmanager
def _stderr_discarded():
    """torch's TorchScript-based ONNX exporter prints the whole IR graph to the process's stderr
    when it fails (its log switch is always on in 2.14); the one-line error is what users need."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def input_names(G: nn.Module) -> list[str]:
    return ["z"] + (["label"] if G.num_classes else []) + [f"noise_{i}" for i in range(len(G.noise_shapes()))]


def example_inputs(G: nn.Module, count: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of `count` images as `ganpipe sample` draws them (z, labels i % classes, noise)."""
    from pipeline.generate import draw, labels_for

    z, noise = draw(G, seed, 0, count)
    labels = labels_for(G, 0, count)
    return (z, *([labels] if labels is not None else []), *noise)


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' notes on their own deprecation and on Python values frozen by the
    trace: the check at other batch sizes is what tells whether the trace is right."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        yield


def _write_onnx(model: Exportable, names: list[str], inputs: tuple, path: Path, meta: dict) -> None:
    import onnx

    axes = {name: {0: "batch"} for name in [*names, "image"]}
    with _quiet(), _stderr_discarded():
        torch.onnx.export(model, inputs, str(path), input_names=names, output_names=["image"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    proto = onnx.load(str(path))
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _write_torchscript(model: Exportable, inputs: tuple, path: Path, meta: dict) -> None:
    with _quiet():
        traced = torch.jit.trace(model, inputs, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"ganpipe.json": json.dumps(meta)})


def run_exported(path: Path, fmt: str, inputs: tuple) -> torch.Tensor:
    """The written file's output for `inputs` (onnxruntime for ONNX, torch.jit.load for TorchScript)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
        return torch.from_numpy(np.asarray(session.run(["image"], feeds)[0]))
    with torch.no_grad(), _quiet():
        return torch.jit.load(str(path), map_location="cpu")(*inputs)


def _require(fmt: str) -> None:
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise UserError(f"--format onnx needs the onnx and onnxruntime packages ({exc.name} is missing): "
                            "pip install 'ganpipe[export]' (or pip install onnx onnxruntime)") from None


def export_generator(G: nn.Module, fmt: str, out: str | Path, *, family: str, meta: dict | None = None) -> dict:
    """Write G (eval mode, CPU) to `out` as `fmt`, checked against the eager G at CHECK_BATCHES;
    returns {"batch": max abs difference}. Any failure is a UserError naming the family and the format."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    _require(fmt)
    out = Path(out)
    model = prepared(G)
    G = model.G
    names = input_names(G)
    info = {"ganpipe_family": family, "ganpipe_inputs": ",".join(names), "ganpipe_output": "image",
            **{f"ganpipe_{k}": str(v) for k, v in (meta or {}).items()}}
    with atomic_path(out) as tmp:
        try:
            inputs = example_inputs(G, TRACE_BATCH)
            if fmt == "onnx":
                _write_onnx(model, names, inputs, tmp, info)
            else:
                _write_torchscript(model, inputs, tmp, info)
            diffs = {}
            for batch in CHECK_BATCHES:
                inputs = example_inputs(G, batch, seed=1)
                with torch.no_grad():
                    want = model(*inputs)
                got = run_exported(tmp, fmt, inputs)
                if got.shape != want.shape:
                    raise RuntimeError(f"output shape {tuple(got.shape)} at batch {batch}, expected "
                                       f"{tuple(want.shape)} (the trace froze the batch size)")
                diffs[batch] = float((got.float() - want.float()).abs().max())
        except UserError:
            raise
        except Exception as exc:
            # The exporters' messages run on with IR dumps after the sentence that says what failed.
            message = (str(exc).strip().splitlines() or [""])[0].split("  [Caused by")[0][:300]
            raise UserError(f"the {family} generator cannot be exported to {fmt}: "
                            f"{type(exc).__name__}: {message}") from None
        worst = max(diffs.values())
        if not worst <= TOLERANCE:
            raise UserError(f"the {family} generator exported to {fmt} differs from the eager generator by "
                            f"{worst:.2e} (tolerance {TOLERANCE:g}, batches {', '.join(map(str, diffs))}); "
                            "nothing written")
    return diffs


def export_command(args: argparse.Namespace) -> int:
    """`ganpipe export`: the snapshot's EMA generator to --out, as --format."""
    from pipeline.training.snapshot import load_snapshot

    G, meta = load_snapshot(args.snapshot, device="cpu")
    family = meta["model"]["name"]
    record = {"snapshot": Path(meta["json_path"]).name, "snapshot_sha256": meta["sha256"], "kimg": meta["kimg"],
              "z_dim": G.z_dim, "num_classes": G.num_classes, "resolution": G.resolution, "channels": G.channels}
    diffs = export_generator(G, args.format, args.out, family=family, meta=record)
    names = ", ".join(input_names(G))
    print(f"wrote {args.out}: {family} generator of {args.snapshot} (kimg {meta['kimg']:.1f}) as {args.format}; "
          f"inputs {names} (batch dynamic), output image; max abs difference from the eager generator "
          f"{max(diffs.values()):.1e} at batches {', '.join(map(str, diffs))}")
    return 0
