"""Safe checkpoints: model weights as safetensors, training state as a weights-only torch file.

Nothing here ever unpickles arbitrary objects, so opening a checkpoint from an untrusted source
cannot execute code:

- a **model checkpoint** (``*.safetensors``) holds the state dict plus string metadata: the format
  tag, the resolved config (JSON), the architecture descriptor ``skullrec.nets.autoencoder.architecture(cfg)``,
  free-form ``meta`` (JSON: epoch, validation DSC, ...) and a SHA-256 of the tensor bytes, so that a
  flipped byte in the data is reported instead of silently loaded (safetensors itself only checks
  the header and the file length);
- a **training state** (``state.pt``, what ``--resume`` needs: optimizer moments, epoch, step,
  partial epoch sums, best score) is a dict of tensors and plain values written with ``torch.save``
  and read back with ``torch.load(weights_only=True)``, whose restricted unpickler only rebuilds
  tensors and builtin containers.

Both are written atomically (temporary file + rename): a ``kill -9`` leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..config import Config, Stage2Config, config_from_dict, stage2_config_from_dict, upgrade_stored
from ..errors import ConfigError, InputError, clip, short_repr
from ..io import atomic_write_bytes, json_default

FORMAT = "skullrec-checkpoint/1"
IMPLANT_FORMAT = "skullrec-implant-checkpoint/1"  # stage 2 (skullrec train-implant)
STATE_FORMAT = "skullrec-training-state/1"


def architecture(cfg: Config) -> str:
    """The architecture descriptor of ``cfg``'s model: ``skullrec.nets.autoencoder.architecture(cfg.model)`` as JSON.

    Two checkpoints with equal descriptors have interchangeable state dicts.
    """
    from .autoencoder import architecture as model_architecture

    return json.dumps(model_architecture(cfg.model), sort_keys=True)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of all tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # A uint8 view gives the raw bytes for every dtype (bfloat16 has no numpy equivalent).
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_safetensors(path: str | Path, model: torch.nn.Module, fmt: str, config: dict[str, Any], arch: str, meta: dict[str, Any]) -> Path:
    """Weights + format tag + config + architecture + meta + checksum as safetensors, written atomically."""
    path = Path(path)
    # clone(): safetensors refuses tensors that share storage, and a copy on the CPU is needed anyway.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": fmt,
        "config": json.dumps(config),
        "architecture": arch,
        "meta": json.dumps(meta, default=json_default),
        "sha256": _digest(tensors),
    }
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))
    return path


# safetensors' own bound on the JSON header; a longer one is not a checkpoint
MAX_HEADER_BYTES = 100 << 20


def _corrupt(path: Path, reason: str) -> InputError:
    return InputError(f"{path}: corrupt or truncated checkpoint ({clip(reason)})")


def _header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header of the file ``path`` (tensor entries plus ``__metadata__``), read alone; InputError if malformed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise _corrupt(path, f"header of {header_len} bytes in a file of {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _corrupt(path, "header is not JSON" if isinstance(exc, ValueError) else "header nested too deeply") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    return header


def _json_value(path: Path, metadata: dict[str, Any], key: str, default: str | None = None) -> Any:
    """The JSON string ``metadata[key]`` parsed (``default`` when absent); InputError naming the key otherwise."""
    text = metadata.get(key, default)
    if text is None:
        raise InputError(f"{path}: checkpoint metadata unreadable (no '{key}')")
    try:
        if not isinstance(text, str):
            raise TypeError(f"a {type(text).__name__}, not a JSON string")
        return json.loads(text)
    except RecursionError:  # json.loads recurses per nesting level; a crafted value is 10^5 levels deep
        raise InputError(f"{path}: checkpoint metadata unreadable ('{key}' is nested too deeply)") from None
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: checkpoint metadata unreadable ('{key}': {clip(str(exc), 120)})") from None


def _tensor_shapes(path: Path, header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the header lists (read from the header only: nothing is loaded)."""
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _corrupt(path, f"tensor {short_repr(name, 60)} has no valid shape")
        shapes[name] = tuple(shape)
    return shapes


def _dims(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape)) or "a scalar"


def shape_problem(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    """The first tensor that is missing, extra or of another shape in ``found`` against ``expected`` (and how many more); None if all fit."""
    problems = [f"tensor '{n}' missing" for n in sorted(set(expected) - set(found))]
    problems += [f"unexpected tensor {short_repr(n, 60)}" for n in sorted(set(found) - set(expected))]
    problems += [f"tensor '{n}' is {_dims(found[n])} in the file, the architecture needs {_dims(expected[n])}"
                 for n in sorted(set(found) & set(expected)) if found[n] != expected[n]]
    if not problems:
        return None
    return problems[0] + (f"; and {len(problems) - 1} more" if len(problems) > 1 else "")


def _read_metadata(path: Path, fmt: str, kind: str, parse: Callable[[dict[str, Any]], Any],
                   shapes_of: Callable[[Any], dict[str, tuple[int, ...]]]) -> tuple[bytes, dict[str, Any], Any, str, dict[str, Any]]:
    """(metadata, config, architecture, meta) of a checkpoint, its tensor shapes checked; only the header is read.

    ``parse`` turns the stored config mapping into the typed config (a ConfigError becomes an InputError);
    ``shapes_of(config)`` gives the state-dict shapes that config's network has, computed without
    allocating it. The metadata (JSON with bounded nesting, config types and bounds) and the tensor
    shapes of the header are checked against it, so a crafted header claiming a huge network costs nothing.
    """
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    if size < 8:
        raise InputError(f"{path}: not a {kind} checkpoint (file is {size} bytes; truncated?)")
    header = _header(path)  # the header alone: the tensors are read only once it has passed every check
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, "__metadata__ is not a JSON object")
    if metadata.get("format") != fmt:
        raise InputError(f"{path}: not a {kind} checkpoint (format {short_repr(metadata.get('format'))}, expected {fmt!r})")
    arch = metadata.get("architecture", "")
    arch = arch if isinstance(arch, str) else ""
    stored = _json_value(path, metadata, "config")
    meta = _json_value(path, metadata, "meta", "{}")
    for key, value in (("config", stored), ("meta", meta)):
        if not isinstance(value, dict):  # null, a list, a number: never what skullrec writes
            kind_of = "null" if value is None else f"a {type(value).__name__}"
            raise InputError(f"{path}: checkpoint metadata unreadable ('{key}' is {kind_of}, not a JSON object)")
    try:
        cfg = parse(stored)
        expected = shapes_of(cfg)
    except ConfigError as exc:
        raise InputError(f"{path}: checkpoint config invalid for this skullrec version ({exc})") from None
    except RecursionError:
        raise InputError(f"{path}: checkpoint config invalid for this skullrec version (nested too deeply)") from None
    problem = shape_problem(_tensor_shapes(path, header), expected)
    if problem:
        raise InputError(f"{path}: weights do not fit architecture '{clip(arch)}' ({problem})")
    return metadata, cfg, arch, meta


def _read_safetensors(path: Path, fmt: str, kind: str, parse: Callable[[dict[str, Any]], Any],
                      shapes_of: Callable[[Any], dict[str, tuple[int, ...]]]) -> tuple[dict[str, torch.Tensor], Any, str, dict[str, Any]]:
    """(tensors, config, architecture, meta) of a checkpoint file of format ``fmt``, verified; InputError otherwise.

    Everything :func:`_read_metadata` checks comes first; then the tensors are loaded and their checksum verified.
    """
    metadata, cfg, arch, meta = _read_metadata(path, fmt, kind, parse, shapes_of)
    try:
        tensors = st_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise _corrupt(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if metadata.get("sha256") != _digest(tensors):
        raise InputError(f"{path}: corrupt checkpoint (tensor data do not match their checksum)")
    return tensors, cfg, arch, meta


def _checked_shapes(shapes: Callable[[Any], dict[str, tuple[int, ...]]], key: str,
                    section: Callable[[Any], Any]) -> Callable[[Any], dict[str, tuple[int, ...]]]:
    """``cfg -> shapes(section(cfg))`` with the parameter-count bound (ConfigError naming ``key``) applied."""
    from .autoencoder import check_parameter_count

    def run(cfg: Any) -> dict[str, tuple[int, ...]]:
        out = shapes(section(cfg))
        check_parameter_count(out, key)
        return out

    return run


def _upgrade_architecture(arch: str) -> str:
    """A descriptor written before ``out_channels`` existed described the one-channel (sigmoid) head."""
    try:
        desc = json.loads(arch)
    except json.JSONDecodeError:
        return arch
    if isinstance(desc, dict) and "out_channels" not in desc:
        desc["out_channels"] = 1
        return json.dumps(desc, sort_keys=True)
    return arch


def save_checkpoint(path: str | Path, model: torch.nn.Module, cfg: Config, **meta: Any) -> Path:
    """Write ``model``'s weights with ``cfg``, its architecture and JSON-able ``meta`` to ``path`` atomically."""
    return _write_safetensors(path, model, FORMAT, cfg.to_dict(), architecture(cfg), meta)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, str, dict[str, Any]]:
    """Read and verify a checkpoint file without building a model: (tensors, cfg, architecture, meta)."""
    # Stored configs and descriptors written before model.loss / out_channels existed are the sigmoid head.
    from .autoencoder import state_shapes

    tensors, cfg, arch, meta = _read_safetensors(Path(path), FORMAT, "skullrec", lambda v: config_from_dict(upgrade_stored(v)),
                                                 _checked_shapes(state_shapes, "model", lambda c: c.model))
    return tensors, cfg, _upgrade_architecture(arch), meta


def read_checkpoint_config(path: str | Path) -> Config:
    """The config stored in a stage-1 checkpoint, checked as :func:`read_checkpoint` does but without loading the tensors."""
    from .autoencoder import state_shapes

    return _read_metadata(Path(path), FORMAT, "skullrec", lambda v: config_from_dict(upgrade_stored(v)),
                          _checked_shapes(state_shapes, "model", lambda c: c.model))[1]


def _load_weights(path: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor], arch: str) -> torch.nn.Module:
    """``model`` with ``tensors`` loaded strictly; a mismatch is a one-line InputError naming the architecture."""
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: weights do not fit architecture '{clip(arch)}' ({clip(first)})") from None
    return model


def check_finite(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or inf (a diverged run, a damaged export): they would make every skull empty."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in sorted(tensors.items()) if t.is_floating_point()}
    bad = {name: n for name, n in bad.items() if n}
    if bad:
        first = next(iter(bad))
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise InputError(f"{path}: checkpoint weights are not finite ({bad[first]} NaN/inf values in '{first}'{more}); "
                         "the run diverged or the file was altered")


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", expect_architecture: str | None = None
) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Rebuild the model stored in ``path`` on ``device``: (model in eval mode, cfg, meta).

    Refused with a one-line InputError: a missing, corrupt or truncated file; NaN or inf weights; a
    checkpoint whose architecture differs from what this version builds for its config, or from ``expect_architecture``.
    """
    from .autoencoder import build_model

    path = Path(path)
    tensors, cfg, arch, meta = read_checkpoint(path)
    current = architecture(cfg)
    if arch != current:
        raise InputError(f"{path}: checkpoint architecture '{clip(arch)}' differs from the one this skullrec builds for its config ('{current}')")
    if expect_architecture is not None and arch != expect_architecture:
        raise InputError(f"{path}: checkpoint architecture '{clip(arch)}' is not the expected '{clip(expect_architecture)}'")
    check_finite(path, tensors)
    model = _load_weights(path, build_model(cfg.model), tensors, arch)
    model.to(device).eval()
    return model, cfg, meta


def save_training_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a resume state (tensors, numbers, strings, lists, dicts only) atomically."""
    buf = _io.BytesIO()
    torch.save({"format": STATE_FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a resume state with ``torch.load(weights_only=True)`` (never executes code)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no training state; nothing to resume")
    import pickle

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's restricted unpickler met a Python object (a class, a function, a __reduce__ payload).
        # skullrec never writes one; say so, without torch's hint to retry with weights_only=False.
        if "weights only load failed" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise InputError(f"{path}: not a skullrec training state: it holds Python objects (not just tensors and "
                             "plain values), which skullrec never writes; refused without loading them") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: corrupt or truncated training state ({reason[:200]})") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: corrupt or truncated training state ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f"{path}: not a skullrec training state")
    return state


__all__ = [
    "FORMAT",
    "architecture",
    "save_checkpoint",
    "read_checkpoint",
    "read_checkpoint_config",
    "shape_problem",
    "load_checkpoint",
    "save_training_state",
    "load_training_state",
]


# ------------------------------------------------------------------------------------------- stage 2

def _implant_architecture(cfg: Stage2Config) -> str:
    from .implant_net import architecture as net_architecture

    return json.dumps(net_architecture(cfg.net), sort_keys=True)


def save_implant_checkpoint(path: str | Path, model: torch.nn.Module, cfg: Stage2Config, **meta: Any) -> Path:
    """Stage-2 weights + config + architecture + checksum as safetensors, written atomically."""
    return _write_safetensors(path, model, IMPLANT_FORMAT, cfg.to_dict(), _implant_architecture(cfg), meta)


def load_implant_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Stage2Config, dict[str, Any]]:
    """(model in eval mode, cfg, meta) from a stage-2 checkpoint; one-line InputError for anything wrong."""
    from .implant_net import build_implant_net

    path = Path(path)
    from .implant_net import state_shapes

    tensors, cfg, arch, meta = _read_safetensors(path, IMPLANT_FORMAT, "stage-2 (implant)", stage2_config_from_dict,
                                                 _checked_shapes(state_shapes, "net", lambda c: c.net))
    if arch != _implant_architecture(cfg):
        raise InputError(f"{path}: checkpoint architecture differs from the one this skullrec builds for its config")
    check_finite(path, tensors)
    model = _load_weights(path, build_implant_net(cfg.net), tensors, arch)
    return model.to(device).eval(), cfg, meta
