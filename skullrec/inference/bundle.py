"""A MONAI bundle of skullrec's stage-1 + stage-2 predictor (``skullrec export-bundle``).

Layout of an exported bundle (the MONAI Bundle specification's folders)::

    BUNDLE/
      configs/metadata.json    versions, task, licence, network_data_format (stage 1) + skullrec's own keys
      configs/inference.json   the predictor: skullrec.inference.bundle.BundlePredictor via ``_target_``
      configs/logging.conf     so the predictor's progress and warnings are printed
      models/stage1.safetensors, models/stage2.safetensors   the weights, byte-for-byte the exported files
      docs/README.md           model card: what it does, how to run it, licence and attribution
      LICENSE                  the weights' licence

Run from the bundle folder (``bundle_root`` is ``.``, the model-zoo convention; pass
``--bundle_root DIR`` to run from elsewhere)::

    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
        --dataset_dir IN --output_dir OUT

The work is :func:`skullrec.inference.predict.predict_folder`, the function ``skullrec predict`` calls,
so the bundle's outputs are those of ``skullrec predict --checkpoint models/stage1.safetensors --stage2
models/stage2.safetensors`` (tests/inference/test_bundle.py checks them voxel for voxel).

Why safetensors and no ``models/model.pt``: the specification's ``model.pt`` is a pickled state dict,
and unpickling a file can execute code. The weights here are read with
:mod:`skullrec.nets.checkpoint` (safetensors + checksum), both when exporting and when the bundle runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from ..errors import InputError

BUNDLE_NAME = "skullrec_cranial_implant"
# The MONAI model zoo's current metadata schema (verify_metadata downloads it from this URL).
META_SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
STAGE1_FILE = "models/stage1.safetensors"
STAGE2_FILE = "models/stage2.safetensors"
# Packages the predictor imports at run time besides MONAI, torch and numpy (their own metadata keys).
RUNTIME_PACKAGES = ("skullrec", "nibabel", "SimpleITK", "scipy", "safetensors", "trimesh", "fire")
SHIPPED_LICENCE = "CC BY-NC-SA 4.0"

log = logging.getLogger("skullrec.bundle")


# ------------------------------------------------------------------------------------------------
# running a bundle


def _flag(name: str, value: Any) -> bool:
    """A bundle switch as bool: ``--overwrite true`` reaches the config as the *string* 'true' from fire."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise InputError(f"{name}: expected true or false, got {value!r}")


def _number(name: str, value: Any, kind: type) -> Any:
    """``kind(value)`` for a numeric bundle variable; InputError naming the variable when it is not a number."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a number, got {value!r}") from None


class BundlePredictor:
    """The bundle's predictor: ``BundlePredictor(stage1, stage2, ...)(dataset_dir, output_dir)``.

    Writes OUTPUT_DIR/complete/CASE.nii.gz, OUTPUT_DIR/implant/CASE.nii.gz (and stl/) and
    predict.json for every defective skull in ``dataset_dir``, exactly as ``skullrec predict`` with
    the same weights and options. ``stage2`` None: stage 1 alone (its own implant).
    """

    def __init__(self, stage1: str | Path, stage2: str | Path | None = None, device: str = "auto", batch_size: int = 8,
                 threshold: float | None = None, stl: Any = False, mirror: Any = False, overwrite: Any = False) -> None:
        self.stage1 = Path(str(stage1))
        self.stage2 = None if stage2 in (None, "", "None", "none") else Path(str(stage2))
        self.device = str(device)
        self.batch_size = _number("batch_size", batch_size, int)
        self.threshold = None if threshold in (None, "None", "none") else _number("threshold", threshold, float)
        self.stl, self.mirror, self.overwrite = _flag("stl", stl), _flag("mirror", mirror), _flag("overwrite", overwrite)
        if self.mirror and self.stage2 is None:
            raise InputError("mirror: mirrors stage 2's box, and this bundle has no stage 2")
        for p in (self.stage1, self.stage2):
            if p is not None and not p.is_file():
                raise InputError(f"{p}: no such weights file (run from the bundle folder, or pass --bundle_root BUNDLE)")

    def __call__(self, dataset_dir: str | Path, output_dir: str | Path) -> list[dict[str, Any]]:
        """Predict every case of ``dataset_dir`` into ``output_dir``; the per-case rows of predict.json."""
        from .predict import predict_folder

        inp, out = Path(str(dataset_dir)), Path(str(output_dir))
        log.info(f"skullrec bundle: {inp} -> {out} (stage 1 {self.stage1}, stage 2 {self.stage2})")

        def progress(done: int, total: int) -> None:
            if done:  # predict_folder also reports (0, total) before the first case
                log.info(f"case {done}/{total}")

        rows = predict_folder(
            self.stage1, inp, out, stl=self.stl, batch_size=self.batch_size, threshold=self.threshold, device=self.device,
            overwrite=self.overwrite, progress=progress, warn=log.warning, stage2=self.stage2, mirror=self.mirror,
        )
        log.info(f"{len(rows)} cases -> {out} (complete/, implant/{', stl/' if self.stl else ''}; predict.json)")
        return rows


# ------------------------------------------------------------------------------------------------
# exporting a bundle


@dataclass
class ExportedBundle:
    """What :func:`export_bundle` wrote: the bundle folder and the files in it (relative paths)."""

    out: Path
    files: list[str]
    shipped: bool


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inference_config(with_stage2: bool) -> dict[str, Any]:
    """configs/inference.json: bundle variables (overridable as ``--NAME VALUE``) and the predictor's ``_target_``."""
    return {
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "auto",
        "batch_size": 8,
        "threshold": None,
        "stl": False,
        "mirror": False,
        "overwrite": False,
        "stage1_weights": f"$@bundle_root + '/{STAGE1_FILE}'",
        "stage2_weights": f"$@bundle_root + '/{STAGE2_FILE}'" if with_stage2 else None,
        "predictor": {
            "_target_": "skullrec.inference.bundle.BundlePredictor",
            "stage1": "@stage1_weights",
            "stage2": "@stage2_weights",
            "device": "@device",
            "batch_size": "@batch_size",
            "threshold": "@threshold",
            "stl": "@stl",
            "mirror": "@mirror",
            "overwrite": "@overwrite",
        },
        "run": ["$@predictor(@dataset_dir, @output_dir)"],
    }


# The predictor logs through "skullrec.bundle"; MONAI applies configs/logging.conf with fileConfig.
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=plain

[logger_root]
level=INFO
handlers=console

[handler_console]
class=StreamHandler
level=INFO
formatter=plain
args=(sys.stdout,)

[formatter_plain]
format=%(asctime)s %(levelname)s %(name)s: %(message)s
"""


def _tensor_format(kind: str, fmt: str, channels: int, shape: list[int], value_range: list[float], channel_def: dict[str, str]) -> dict[str, Any]:
    """One MONAI tensor format specifier (every key the specification lists)."""
    return {"type": kind, "format": fmt, "modality": "CT", "num_channels": channels, "spatial_shape": shape, "dtype": "float32",
            "value_range": value_range, "is_patch_data": False, "channel_def": channel_def}


def bundle_metadata(stage1: Path, stage2: Path | None, shipped: bool) -> dict[str, Any]:
    """configs/metadata.json for the verified weights ``stage1`` (+ ``stage2``) as they lie in the bundle."""
    import monai
    import numpy
    import torch

    from ..nets.autoencoder import out_channels
    from ..nets.checkpoint import read_checkpoint

    _, cfg1, arch1, meta1 = read_checkpoint(stage1)
    size = int(cfg1.model.size)
    n_out = out_channels(cfg1.model.loss)
    pred_def = {"0": "background logit", "1": "bone logit"} if n_out == 2 else {"0": "bone logit (sigmoid: probability)"}
    skullrec_version = _skullrec_version()
    packages = {p: (skullrec_version if p == "skullrec" else _version(p)) for p in RUNTIME_PACKAGES}
    weights: dict[str, Any] = {"stage1": {"file": STAGE1_FILE, "sha256": _sha256(stage1), "architecture": json.loads(arch1) if arch1 else None,
                                          "training": {"name": cfg1.name, "method": cfg1.train.method, "data": cfg1.data.root, "meta": meta1}}}
    if stage2 is not None:
        from ..nets.checkpoint import load_implant_checkpoint

        _, cfg2, meta2 = load_implant_checkpoint(stage2)
        weights["stage2"] = {"file": STAGE2_FILE, "sha256": _sha256(stage2), "box_mm": cfg2.net.box_mm, "grid": cfg2.net.grid,
                             "channels": list(cfg2.net.channels), "strides": list(cfg2.net.strides), "training": {"meta": meta2}}
    stages = f"stage 1 (an autoencoder completing the skull at {size}^3)" + (
        f" and stage 2 (a UNet designing the implant in a {weights['stage2']['box_mm']:g} mm box around the defect)" if stage2 else " only")
    data_source = ("SkullFix (AutoImplant 2020) training set: the 80 training skulls of 'skullrec prepare --eval-fraction 0.2 --seed 0' "
                   "(skulls from the CQ500 head CT collection)") if shipped else f"not recorded by the exporter; stage 1's training config names data folder '{cfg1.data.root}'"
    return {
        "schema": META_SCHEMA_URL,
        "version": skullrec_version,
        "changelog": {skullrec_version: f"exported by skullrec {skullrec_version} (skullrec export-bundle)"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        # fire: MONAI's command line needs it. No optional_packages_version: MONAI 1.6 renames that
        # deprecated key to required_packages_version when reading, replacing this one.
        "required_packages_version": {k: v for k, v in packages.items() if v is not None},
        "name": "skullrec cranial implant",
        "task": "Cranial implant design: complete a defective skull (binary bone mask) and design the implant",
        "description": (f"skullrec's two-stage predictor: {stages}. Input: defective skulls as binary bone masks "
                        "(NIfTI or NRRD, any size and spacing). Output, on each input's own grid: the completed skull "
                        "(complete/CASE.nii.gz) and the implant (implant/CASE.nii.gz), as 'skullrec predict' writes them."),
        "authors": "skullrec contributors",
        "copyright": "Copyright (c) skullrec contributors",
        "license": (f"weights: {SHIPPED_LICENCE} (see LICENSE); skullrec code: Apache-2.0" if shipped
                    else "weights: see LICENSE; skullrec code: Apache-2.0"),
        "data_source": data_source,
        "data_type": "nibabel",
        "image_classes": "single channel binary bone mask of a defective skull (1 bone, 0 background)",
        "pred_classes": "complete skull and implant as binary masks on the input grid",
        "intended_use": "Research only. Not a medical device: no implant designed with it is fit for a patient without review by a qualified person.",
        "references": [
            "O. Kodym et al., 'SkullBreak / SkullFix - Dataset for automatic cranial implant design and a benchmark for volumetric shape learning tasks', Data in Brief 35:106902, 2021.",
            "J. Li et al., 'AutoImplant 2020 - First MICCAI Challenge on Automatic Cranial Implant Design', IEEE Transactions on Medical Imaging 40(9):2329-2342, 2021.",
        ],
        # network_data_format describes stage 1's network; the predictor itself takes files (see docs/README.md).
        "network_data_format": {
            "inputs": {"image": _tensor_format(
                "image", "segmentation", 1, [size, size, size], [0, 1],
                {"0": f"defective skull bone mask, cropped around the bone and resampled to {size}^3"})},
            "outputs": {"pred": _tensor_format("image", "labels" if n_out == 2 else "classes", n_out, [size, size, size], [], pred_def)},
        },
        "skullrec": {"weights": weights, "weights_format": "safetensors (no pickle); read with skullrec.nets.checkpoint"},
    }


def _skullrec_version() -> str:
    from .. import __version__

    return __version__


def bundle_readme(meta: dict[str, Any], shipped: bool) -> str:
    """docs/README.md: a short model card from the bundle's metadata."""
    w = meta["skullrec"]["weights"]
    s2 = w.get("stage2")
    stage2_line = (f"- `{STAGE2_FILE}`: stage 2, a MONAI UNet designing the implant in a {s2['box_mm']:g} mm box around the defect "
                   f"at {s2['grid']}^3 (sha256 `{s2['sha256']}`)\n") if s2 else "- no stage 2: the implant is stage 1's own\n"
    size = meta["network_data_format"]["inputs"]["image"]["spatial_shape"][0]
    licence = (f"The weights are shared under **{SHIPPED_LICENCE}** (non-commercial, share-alike), because they were trained "
               "on SkullFix, whose skulls come from the CQ500 collection; see `LICENSE` for the licence and the attribution "
               "it requires.") if shipped else "The weights' licence is in `LICENSE`, as given by whoever exported this bundle."
    return f"""# {meta['name']} (MONAI bundle)

{meta['task']}. {meta['description']}

{meta['intended_use']}

Training data: {meta['data_source']}.

## Contents

- `{STAGE1_FILE}`: stage 1, an autoencoder that completes the skull at {size}^3 (sha256 `{w['stage1']['sha256']}`)
{stage2_line}- `configs/inference.json`: the predictor (`skullrec.inference.bundle.BundlePredictor`)
- `configs/metadata.json`: versions, licence, data formats; `skullrec.weights` records the weights' training configs

The weights are safetensors files, read with skullrec's loaders (format tag and SHA-256 checked, nothing
unpickled). There is no `models/model.pt` on purpose: a pickled file can execute code when loaded.

## Run

Needs skullrec {meta['version']} (and MONAI {meta['monai_version']}) installed, plus `fire` for MONAI's command line
(`pip install fire`). From this folder:

```
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --dataset_dir /path/to/defective_skulls --output_dir /path/to/results
```

`--dataset_dir` holds defective skulls as binary masks (`.nii`, `.nii.gz`, `.nrrd`; any size and spacing).
`--output_dir` receives `complete/CASE.nii.gz`, `implant/CASE.nii.gz` and `predict.json`, exactly as
`skullrec predict --checkpoint {STAGE1_FILE}{' --stage2 ' + STAGE2_FILE if s2 else ''}` writes them. Other variables:
`--device cpu|cuda|auto`, `--stl true` (STL meshes in mm), `--mirror true` (stage-2 left-right test-time
augmentation), `--overwrite true` (replace a non-empty output folder), `--threshold T` (binarise non-binary
inputs as value > T), `--bundle_root DIR` (run from another folder). From Python:

```python
from monai.bundle import run
run(config_file="configs/inference.json", meta_file="configs/metadata.json",
    dataset_dir="/path/to/defective_skulls", output_dir="/path/to/results")
```

## Licence

{licence} The skullrec code that runs them is Apache-2.0.
"""


def _fallback_licence() -> str:
    return ("Licence of the weights in models/\n\n"
            "These weights were exported with 'skullrec export-bundle' from checkpoints given by the exporter,\n"
            "who did not supply a licence file (--license). Their licence is therefore not stated here; ask\n"
            "whoever gave you this bundle. The skullrec code that runs them is Apache-2.0.\n")


def export_bundle(out: str | Path, stage1: str | Path | None = None, stage2: str | Path | None = None,
                  licence: str | Path | None = None, overwrite: bool = False) -> ExportedBundle:
    """Write a MONAI bundle of ``stage1`` (+ ``stage2``) into ``out`` atomically; default: the shipped weights.

    Both files are verified with skullrec's safe loaders before anything is written and copied
    byte for byte; the copies are verified again in the staging folder. ``licence``: a text file
    to ship as LICENSE (default: the shipped weights' LICENSE.md with them, a note saying that no
    licence was given otherwise). A non-empty ``out`` is refused without ``overwrite``.
    """
    from ..data.layout import check_output_dir, staged_output
    from ..io import atomic_write_bytes, atomic_write_text
    from ..nets.checkpoint import load_checkpoint, load_implant_checkpoint

    out = Path(out)
    shipped = stage1 is None
    if shipped:
        if stage2 is not None:
            raise InputError("--stage2: needs --checkpoint (without both, the shipped stage 1 + stage 2 are exported)")
        from .shipped import shipped_checkpoints

        stage1, stage2 = shipped_checkpoints()
        if licence is None and (stage1.parent / "LICENSE.md").is_file():
            licence = stage1.parent / "LICENSE.md"
    stage1 = Path(stage1)
    stage2 = None if stage2 is None else Path(stage2)
    licence = None if licence is None else Path(licence)
    inputs = (stage1, stage2, licence)
    check_output_dir(out, overwrite, inputs)  # before loading anything: a refused output costs nothing
    if licence is not None and not licence.is_file():
        raise InputError(f"{licence}: no such licence file")
    # Verified before anything is written: a wrong or damaged file is one line, and no bundle.
    load_checkpoint(stage1)
    if stage2 is not None:
        load_implant_checkpoint(stage2)
    licence_text = licence.read_text(encoding="utf-8", errors="replace") if licence is not None else _fallback_licence()
    with staged_output(out, overwrite, inputs) as staging:
        (staging / "models").mkdir()
        shutil.copyfile(stage1, staging / STAGE1_FILE)
        load_checkpoint(staging / STAGE1_FILE)  # the bundle's own copy is what must load
        if stage2 is not None:
            shutil.copyfile(stage2, staging / STAGE2_FILE)
            load_implant_checkpoint(staging / STAGE2_FILE)
        meta = bundle_metadata(staging / STAGE1_FILE, staging / STAGE2_FILE if stage2 is not None else None, shipped)
        atomic_write_text(staging / "configs" / "metadata.json", json.dumps(meta, indent=2) + "\n")
        atomic_write_text(staging / "configs" / "inference.json", json.dumps(inference_config(stage2 is not None), indent=2) + "\n")
        atomic_write_text(staging / "configs" / "logging.conf", LOGGING_CONF)
        atomic_write_text(staging / "docs" / "README.md", bundle_readme(meta, shipped))
        atomic_write_bytes(staging / "LICENSE", licence_text.encode("utf-8"))
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    return ExportedBundle(out=out, files=files, shipped=shipped)


__all__ = ["BundlePredictor", "ExportedBundle", "export_bundle", "bundle_metadata", "inference_config", "META_SCHEMA_URL"]
