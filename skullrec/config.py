"""Typed, validated configurations (YAML files in ``configs/``): training runs and experiments.

A config is a tree of dataclasses (:class:`Config` for ``skullrec train``, :class:`ExperimentConfig`
for ``skullrec experiment``, read by :func:`load_experiment`). :func:`load_config` reads YAML, applies ``--set key=value``
overrides (dotted keys, values parsed as YAML), and validates: an unknown key, a wrong type or
an out-of-range value raises :class:`ConfigError` naming the key, e.g.
``fam.lam: must be >= 0, got -1.0``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError, short_repr


@dataclass
class DataConfig:
    """Where the training data come from."""

    root: str = "data/synthetic"  # a data set in the layout of skullrec.data.layout
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["eval_set1", "eval_set2"])
    max_train_cases: int | None = None  # use only the first N training cases (None: all)
    max_eval_cases: int | None = None
    # Fraction of the training cases held out as the validation split that chooses best.safetensors (those
    # cases are not trained on). 0: best is the lowest training Dice loss. The evaluation splits are only
    # monitored (val_dsc in metrics.jsonl), never used to choose a checkpoint.
    val_fraction: float = 0.0
    # Seed of that carve-out; apart from the training seed, so runs of several seeds train on the same cases.
    val_seed: int = 0


@dataclass
class ModelConfig:
    """The convolutional autoencoder (see skullrec.nets.autoencoder)."""

    size: int = 64  # input edge length; must be divisible by 2**len(strides)
    channels: list[int] = field(default_factory=lambda: [20, 40, 80, 160, 8])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 2, 2])
    latent_size: int = 8
    norm: Literal["group", "instance", "batch"] = "group"
    # The training loss, which also fixes the output head: "sigmoid_dice" = one logit channel (bone),
    # MONAI DiceLoss(sigmoid=True); "softmax_dice" = two channels (background, bone),
    # DiceLoss(to_onehot_y=True, softmax=True) as the FAM authors' code. Stored configs written before
    # this key existed were sigmoid_dice (see LEGACY_DEFAULTS).
    loss: Literal["sigmoid_dice", "softmax_dice"] = "softmax_dice"


@dataclass
class FamConfig:
    """Relative-flatness regulariser lam * kappa(w) of the named Linear layers (see skullrec.flatness.hessian)."""

    lam: float = 0.0
    layers: list[str] = field(default_factory=lambda: ["decodeL"])
    samples: int = 1  # Hutchinson probes per estimate
    gradient: Literal["full", "detached"] = "full"
    norm: Literal["squared", "frobenius"] = "squared"
    # signed: the paper's formula. Tr(H) of decodeL is slightly negative at initialisation and positive
    # on every measured sample from 10 % of training on, for both losses (benchmarks/trace_sign_losses.py,
    # docs/explanation/fam.md); abs / relu need a whole-batch estimator (check_unbiased).
    trace: Literal["signed", "abs", "relu"] = "signed"
    # How v^T H v and its full gradient are computed: "autograd" (third-order backward, ~3.9x a plain
    # step on CPU), or the output-space estimators of skullrec.flatness.fast: "fd" (whole batch, ~2.3x),
    # "fd-half", "fd-quarter" (a random quarter of the batch, unbiased for trace=signed, ~1.35x; refused
    # with abs / relu, which would shape a subset's estimate), "outspace" (exact).
    estimator: str = "fd-quarter"
    every: int = 1  # add the regulariser every k-th step (amortisation)


@dataclass
class SamConfig:
    """SAM / ASAM (see skullrec.training.sam)."""

    rho: float = 0.05
    adaptive: bool = False  # True: ASAM
    eta: float = 0.01  # ASAM's scale offset
    start_epoch: int = 1  # "late SAM": plain steps before this epoch


@dataclass
class LookbehindConfig:
    """Lookbehind-SAM (see skullrec.training.lookbehind); defaults are the paper's."""

    k: int = 2  # inner (ascent, descent) steps per batch
    alpha: float | Literal["adaptive"] = 0.5  # slow-weight step towards the fast weights, in (0, 1]
    rho: float = 0.05  # radius of each ascent step


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpoints."""

    # fam_authors: the FAM authors' public objective (see AUTHORS_FIXED below and docs/explanation/fam.md).
    method: Literal["baseline", "fam", "fam_authors", "sam", "asam", "lookbehind"] = "baseline"
    epochs: int = 200
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    val_every: int = 10  # validate (DSC on each eval split) every N epochs; 0: never
    checkpoint_epochs: list[int] = field(default_factory=lambda: [100, 200])
    deterministic: bool = True
    num_threads: int | None = None  # torch CPU threads (None: torch's default)
    # Speed switches (skullrec.training.speed; docs/explanation/performance.md). amp "auto": bf16 autocast where the
    # hardware has native bf16 (AVX-512 BF16 / AMX CPUs, bf16 GPUs), else float32. compile "auto":
    # torch.compile for single-process runs of >= speed.COMPILE_MIN_STEPS steps; eager if compiling fails.
    amp: Literal["auto", "none", "bf16"] = "auto"
    compile: bool | Literal["auto"] = "auto"


@dataclass
class Config:
    """The whole configuration of one training run."""

    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fam: FamConfig = field(default_factory=FamConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    lookbehind: LookbehindConfig = field(default_factory=LookbehindConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        # Several alternatives (e.g. a number or 'adaptive'): name them all, not only the first.
        alternatives = [errors[0]] + [e.removeprefix(f"{key}: ") for e in errors[1:]]
        raise ConfigError(", or ".join(alternatives) if errors else f"{key}: invalid value {short_repr(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {short_repr(value)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {short_repr(value)}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {short_repr(value)}")
        return _from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {short_repr(value)}")
        return value
    if tp is float:
        # YAML 1.1 (PyYAML) reads 1e-3 (no dot) as a string; a number written that way is still a number.
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {short_repr(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {short_repr(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {short_repr(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {short_repr(value)}")
        return value
    return value


def _from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            shown = key if isinstance(key, str) and len(key) <= 60 and key.isprintable() else short_repr(key, 60)
            raise ConfigError(f"{prefix}{shown}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _check_type(f"{prefix}{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _optimisation_checks(train: Any) -> list[tuple[str, bool, str]]:
    """The range checks that every ``train:`` section (autoencoder and stage 2) shares."""
    return [
        ("train.epochs", train.epochs >= 1, "must be >= 1"),
        ("train.batch_size", train.batch_size >= 1, "must be >= 1"),
        ("train.lr", train.lr > 0, "must be > 0"),
        ("train.checkpoint_epochs", all(e >= 1 for e in train.checkpoint_epochs), "epochs must be >= 1"),
        ("train.num_threads", train.num_threads is None or train.num_threads >= 1, "must be >= 1"),
        _upper("train.num_threads", train.num_threads, "num_threads"),
        _upper("train.batch_size", train.batch_size, "batch_size"),
        _upper("train.epochs", train.epochs, "epochs"),
        _upper("train.checkpoint_epochs", max(train.checkpoint_epochs, default=None), "epochs"),
    ]


def check_ranges(checks: list[tuple[str, bool, str]], prefix: str = "") -> None:
    """Raise ConfigError ``prefix + key: message`` for the first (key, ok, message) whose ok is False."""
    for key, ok, msg in checks:
        if not ok:
            raise ConfigError(f"{prefix}{key}: {msg}")


# Upper bounds of sizes, counts and thread numbers, in one place; validated wherever a value comes from (YAML,
# --set, checkpoint metadata, a run's config.yaml). Each is far above any setting skullrec uses (largest
# shipped: model.size 64, channels 160, grid 128, box 128 mm) but below what would make an allocator fail
# with a traceback after minutes (channels 10^8, a 2048^3 stage-2 grid) or torch's thread pool crash
# (num_threads 100000: a segfault). The parameter count is checked where the network is known (nets).
LIMITS: dict[str, int | float] = {
    "size": 512,  # model.size and net.grid: voxels per edge of the network's input
    "channels": 4096,  # every entry of model.channels and net.channels
    "latent_size": 4096,  # model.latent_size
    "stages": 9,  # entries of model.strides / net.strides (2**9 = 512)
    "num_res_units": 16,  # net.num_res_units
    "box_mm": 1000.0,  # net.box_mm, in (0, 1000] mm (a skull is at most ~320 mm across)
    "num_threads": 1024,  # train.num_threads
    "batch_size": 4096,  # train.batch_size
    "epochs": 1_000_000,  # train.epochs and every epoch count (checkpoint_epochs, val_every, start_epoch, ...)
    "samples": 1024,  # fam.samples, lookbehind.k
    "seed": 2**63 - 1,  # seed (torch.manual_seed takes at most 64 bits)
    # weights of one network (1 GiB as float32; the default stage 1 and stage 2 have about 1 M), counted from
    # its shapes on torch's meta device (skullrec.nets.autoencoder.check_parameter_count) before building it
    "parameters": 1 << 28,
}


def _upper(key: str, value: int | float | None, limit: str) -> tuple[str, bool, str]:
    """The range check ``value <= LIMITS[limit]`` for :func:`check_ranges` (None passes: not set)."""
    return key, value is None or value <= LIMITS[limit], f"must be <= {LIMITS[limit]}, got {short_repr(value)}"


def _channels(key: str, values: list[int]) -> list[tuple[str, bool, str]]:
    """A channel list: 1 to LIMITS['stages'] + 1 entries, each in 1..LIMITS['channels']."""
    hi = LIMITS["channels"]
    return [
        (key, 1 <= len(values) <= LIMITS["stages"] + 1, f"needs 1 to {LIMITS['stages'] + 1} entries, got {len(values)}"),
        (key, all(v >= 1 for v in values), f"every entry must be >= 1, got {short_repr(values)}"),
        (key, all(v <= hi for v in values), f"every entry must be <= {hi}, got {short_repr(values)}"),
    ]


def _strides(key: str, strides: list[int]) -> list[tuple[str, bool, str]]:
    """Strides: at most LIMITS['stages'] entries, each 1 or 2 (a 0 divides by zero, a 3 breaks the shapes)."""
    return [
        (key, len(strides) <= LIMITS["stages"], f"at most {LIMITS['stages']} entries, got {len(strides)}"),
        (key, all(st in (1, 2) for st in strides), f"every entry must be 1 or 2, got {short_repr(strides)}"),
    ]


def validate(cfg: Config) -> Config:
    """Range checks that types alone cannot express; returns ``cfg``."""
    # Sizes first, so that the divisibility checks below never compute 2**(a huge length).
    check_ranges([
        ("seed", 0 <= cfg.seed <= LIMITS["seed"], f"must be in 0..{LIMITS['seed']}, got {short_repr(cfg.seed)}"),
        ("model.size", 2 <= cfg.model.size <= LIMITS["size"], f"must be in 2..{LIMITS['size']}, got {short_repr(cfg.model.size)}"),
        *_strides("model.strides", cfg.model.strides),
        *_channels("model.channels", cfg.model.channels),
        ("model.latent_size", 1 <= cfg.model.latent_size <= LIMITS["latent_size"],
         f"must be in 1..{LIMITS['latent_size']}, got {short_repr(cfg.model.latent_size)}"),
        _upper("train.val_every", cfg.train.val_every, "epochs"),
        _upper("sam.start_epoch", cfg.sam.start_epoch, "epochs"),
        _upper("fam.every", cfg.fam.every, "epochs"),
        _upper("fam.samples", cfg.fam.samples, "samples"),
        _upper("lookbehind.k", cfg.lookbehind.k, "samples"),
    ])
    checks = [
        ("model.size", cfg.model.size % (2 ** len(cfg.model.strides)) == 0, "must be divisible by 2**len(strides)"),
        ("model.channels", len(cfg.model.channels) == len(cfg.model.strides), "needs one entry per stride"),
        ("fam.lam", cfg.fam.lam >= 0, f"must be >= 0, got {cfg.fam.lam}"),
        ("fam.samples", cfg.fam.samples >= 1, "must be >= 1"),
        ("fam.every", cfg.fam.every >= 1, "must be >= 1"),
        ("fam.layers", len(cfg.fam.layers) >= 1, "name at least one Linear layer"),
        ("sam.rho", cfg.sam.rho > 0, "must be > 0"),
        ("sam.start_epoch", cfg.sam.start_epoch >= 1, "must be >= 1"),
        ("lookbehind.k", cfg.lookbehind.k >= 1, "must be >= 1"),
        ("lookbehind.alpha", cfg.lookbehind.alpha == "adaptive" or 0 < cfg.lookbehind.alpha <= 1, "must be in (0, 1] or 'adaptive'"),
        ("lookbehind.rho", cfg.lookbehind.rho > 0, "must be > 0"),
        *_optimisation_checks(cfg.train),
        ("train.val_every", cfg.train.val_every >= 0, "must be >= 0"),
        ("data.max_train_cases", cfg.data.max_train_cases is None or cfg.data.max_train_cases >= 1, "must be >= 1"),
        ("data.val_fraction", 0.0 <= cfg.data.val_fraction < 1.0, "must be in [0, 1)"),
        ("data.val_fraction", cfg.data.val_fraction == 0.0 or cfg.train.val_every > 0, "needs train.val_every > 0 (it chooses best.safetensors on validation epochs)"),
        ("data.max_eval_cases", cfg.data.max_eval_cases is None or cfg.data.max_eval_cases >= 1, "must be >= 1"),
        ("sam.eta", cfg.sam.eta >= 0, "must be >= 0"),
        ("train.weight_decay", cfg.train.weight_decay >= 0, "must be >= 0"),
    ]
    check_ranges(checks)
    if cfg.train.method in FAM_METHODS and cfg.fam.lam == 0:
        raise ConfigError(f"fam.lam: method '{cfg.train.method}' needs lam > 0 (use method 'baseline' for lam = 0)")
    if cfg.train.method == "sam" and cfg.sam.adaptive:
        raise ConfigError("sam.adaptive: adaptive SAM is method 'asam' (train.method=asam), not 'sam'")
    if cfg.train.method not in FAM_METHODS and cfg.fam.lam != 0:
        # A silently ignored lambda would make a mislabelled run; say which method applies it.
        raise ConfigError(f"fam.lam: only methods fam and fam_authors use lam, got lam {cfg.fam.lam} with method '{cfg.train.method}'")
    return cfg


FAM_METHODS = ("fam", "fam_authors")
# What method fam_authors fixes (the authors' public code, kampmichael/RelativeFlatnessAndGeneralization,
# skullrec/run_training_SkullRec.py + FAMloss.py): a two-channel softmax Dice loss, the penalty
# ||W||_F * Tr(H) with Tr(H) a detached constant and not shaped. The loss scaling (80 * DiceLoss with
# reduction "sum", the trace of that unscaled sum) is AUTHORS_LOSS_SCALE, applied by the trainer.
AUTHORS_FIXED: dict[tuple[str, str], str] = {
    ("model", "loss"): "softmax_dice",
    ("fam", "norm"): "frobenius",
    ("fam", "gradient"): "detached",
    ("fam", "trace"): "signed",
}
AUTHORS_LOSS_SCALE = 80.0


def _fix_authors_keys(values: dict[str, Any]) -> None:
    """For train.method fam_authors, set the keys it fixes; a conflicting explicit value is an error."""
    train = values.get("train")
    if not isinstance(train, dict) or train.get("method") != "fam_authors":
        return
    for (section, key), fixed in AUTHORS_FIXED.items():
        node = values.setdefault(section, {})
        if not isinstance(node, dict):
            return  # the type check reports the malformed section
        if key in node and node[key] != fixed:
            raise ConfigError(f"{section}.{key}: method fam_authors fixes it to {fixed!r}, got {short_repr(node[key])}")
        node[key] = fixed


def _require_mapping(values: Any) -> None:
    """ConfigError unless ``values`` is a mapping or None (a config stored as a list, a number, ...)."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"expected a mapping of sections, got {type(values).__name__} {short_repr(values, 40)}")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain mapping."""
    _require_mapping(values)
    values = copy.deepcopy(values or {})  # _fix_authors_keys fills keys in; never in the caller's mapping
    _fix_authors_keys(values)
    return validate(_from_dict(Config, values))


# A config is a few hundred YAML nodes; these bound what a crafted one costs before it is built. An alias
# (``*a``) is a reference, cheap to load, but everything that walks the result (validation, deepcopy, an error
# message, json.dumps) pays for every expansion: nine levels of nine aliases are 9^9 = 387 M nodes from a few
# hundred bytes (a "billion laughs" document). So the node graph is measured with aliases expanded (each node
# once, memoised) before anything is constructed.
MAX_YAML_BYTES = 1 << 20  # a config file or --set value
MAX_YAML_NODES = 100_000  # nodes with every alias expanded
MAX_YAML_DEPTH = 64  # nesting of sequences and mappings


def _yaml_extent(root: yaml.Node) -> None:
    """ConfigError when the node graph under ``root``, aliases expanded, exceeds the node or depth bound or is recursive."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    started: set[int] = set()  # entered and not finished: meeting one again is a cycle (``&a [*a]``)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: a deep document cannot exhaust Python's recursion limit here
        node, finished = stack.pop()
        key = id(node)
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        if finished:
            started.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_YAML_NODES:
                raise ConfigError(f"more than {MAX_YAML_NODES} values once its aliases are expanded; refused")
            if depth[key] > MAX_YAML_DEPTH:
                raise ConfigError(f"nested more than {MAX_YAML_DEPTH} levels deep; refused")
            continue
        if key in size:
            continue
        if key in started:
            raise ConfigError("an alias refers to the value that contains it (a recursive structure); refused")
        started.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load(text)`` with its size bounded (bytes, nodes with aliases expanded, depth); ConfigError beyond.

    Malformed YAML raises ``yaml.YAMLError`` as safe_load does; an integer over Python's 4300-digit
    conversion limit is a ConfigError too.
    """
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{len(text)} characters; a config is at most {MAX_YAML_BYTES}")
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # PyYAML composes nested collections recursively
            raise ConfigError(f"nested more than {MAX_YAML_DEPTH} levels deep; refused") from None
        if node is None:
            return None
        _yaml_extent(node)
        try:
            return loader.construct_document(node)
        except ValueError as exc:  # int('1' * 5000): Python refuses such conversions
            raise ConfigError(f"unreadable value ({str(exc)[:80]})") from None
    finally:
        loader.dispose()


_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml_text(raw)
        except yaml.YAMLError:
            value = raw
        except ConfigError as exc:
            raise ConfigError(f"--set {key.strip()}: {exc}") from None
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads 1e-5 as a string (it wants 1.0e-5); Python's repr of small lambdas is 1e-05.
            value = float(value)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: '{part}' is not a section")
        node[parts[-1]] = value
    return values


def read_yaml(path: str | Path | None, overrides: list[str] | None = None, what: str = "config file") -> dict[str, Any]:
    """The mapping in a YAML config file (empty when ``path`` is None) with ``--set`` overrides applied."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such {what}")
        if path.stat().st_size > MAX_YAML_BYTES:  # before reading it: a config is a few kB
            raise ConfigError(f"{path}: {path.stat().st_size} bytes; a {what} is at most {MAX_YAML_BYTES}")
        try:
            values = load_yaml_text(path.read_text()) or {}
        except yaml.YAMLError as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"{path}: invalid YAML ({first[:200]})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (not UTF-8); expected a YAML {what}") from None
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return apply_overrides(values, overrides or [])


def _load(parse: typing.Callable[[dict[str, Any]], Any], path: str | Path | None, overrides: list[str] | None) -> Any:
    """``parse(read_yaml(path, overrides))``, its ConfigError prefixed with the file name."""
    values = read_yaml(path, overrides)
    try:
        return parse(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


# Keys added after configs were first stored in run folders and checkpoints, with the value every
# stored config written before them implicitly had. They apply to *stored* configs only
# (:func:`upgrade_stored`): a new config file without the key gets today's default instead.
LEGACY_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("model", "loss"): "sigmoid_dice",
    # Runs stored before the speed switches trained float32, eagerly: resuming one continues the same way.
    ("train", "amp"): "none",
    ("train", "compile"): False,
}


def upgrade_stored(values: dict[str, Any]) -> dict[str, Any]:
    """Fill the keys of :data:`LEGACY_DEFAULTS` that a stored config (run folder, checkpoint) lacks; in place."""
    if not isinstance(values, dict):
        return values  # config_from_dict reports a stored config that is not a mapping
    for path, value in LEGACY_DEFAULTS.items():
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(path[-1], value)
    return values


def load_stored_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Like :func:`load_config` for a config a run wrote (``runs/NAME/config.yaml``): legacy keys filled in."""
    return _load(lambda values: config_from_dict(upgrade_stored(values)), path, overrides)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides and validate."""
    return _load(config_from_dict, path, overrides)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory stores)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# the experiment (skullrec experiment): a sweep of training runs


@dataclass
class MethodSpec:
    """One arm of the sweep: a label and config overrides for the training config."""

    name: str
    method: str = "baseline"
    lam: float = 0.0
    set: list[str] = field(default_factory=list)  # extra --set overrides for this arm
    # The seeds this arm trains (None: all of the experiment's). A subset lets a costly arm run fewer seeds
    # than the core comparison when time is short; the tables say how many seeds each row has.
    seeds: list[int] | None = None

    def trains_seed(self, seed: int) -> bool:
        """Whether this arm trains the experiment's ``seed``."""
        return self.seeds is None or seed in self.seeds


@dataclass
class ExperimentConfig:
    """A sweep over methods and seeds on one data set."""

    name: str = "experiment"
    out: str = "results/experiment"
    base_config: str = "configs/baseline.yaml"  # training config every run starts from
    data_root: str = "data/synthetic"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 200
    checkpoint_epochs: list[int] = field(default_factory=lambda: [100, 200])
    max_train_cases: int | None = None
    max_eval_cases: int | None = None
    eval_splits: list[str] = field(default_factory=lambda: ["eval_set1", "eval_set2"])
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec(name="baseline")])
    set: list[str] = field(default_factory=list)  # overrides applied to every run
    hd95: str = "max"
    targets: list[str] = field(default_factory=lambda: ["skull", "implant"])  # scored from one reconstruction
    collapse_threshold: float = 0.95  # flag runs whose mean pairwise reconstruction DSC exceeds this
    reference: str | None = "baseline"  # method the others are compared with, seed by seed (vs_reference.*)
    synth_if_missing: dict[str, Any] | None = None  # e.g. {n_train: 100, n_eval: 20, seed: 0}
    # Reference predictors scored beside the methods (rows "ref:NAME"): mean_shape, input, nearest
    # (skullrec.experiment.references). They need no training.
    references: list[str] = field(default_factory=list)
    # How runs are trained: "processes" (one `skullrec train` subprocess per run, --jobs at a time) or
    # "batched" (runs that differ only in their seed trained together in this process, vmap over stacked
    # weights, skullrec.training.batched; baseline runs only, the others still as processes).
    jobs_mode: str = "processes"
    # Batched runs' forward call: "auto" (vmap on a GPU; on a CPU a loop over the models, bit-for-bit the
    # runs trained alone), "vmap" (one grouped convolution per layer: faster on a CPU at 16^3-32^3, slower
    # at 64^3, not bit-for-bit) or "loop". skullrec.training.batched.default_forward.
    batched_forward: str = "auto"

    def row_methods(self) -> list[str]:
        """Method labels of Table 2's rows: the trained methods, then the references."""
        return [m.name for m in self.methods] + [f"ref:{r}" for r in self.references]


JOBS_MODES = ("processes", "batched")
BATCHED_FORWARDS = ("auto", "vmap", "loop")
# The reference predictors of skullrec.experiment.references, by name.
REFERENCES = ("mean_shape", "input", "nearest")


def load_experiment(path: str | Path, overrides: list[str], scale: float | None) -> ExperimentConfig:
    """Read and validate an experiment YAML; ``scale`` shrinks epochs and case counts."""
    values = read_yaml(path, overrides, what="experiment config")
    try:
        cfg: ExperimentConfig = _from_dict(ExperimentConfig, values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not cfg.methods or not cfg.seeds:
        raise ConfigError(f"{path}: methods and seeds must not be empty")
    check_ranges([
        ("epochs", 1 <= cfg.epochs <= LIMITS["epochs"], f"must be in 1..{LIMITS['epochs']}, got {short_repr(cfg.epochs)}"),
        ("seeds", all(0 <= s <= LIMITS["seed"] for s in cfg.seeds), f"every entry must be in 0..{LIMITS['seed']}, got {short_repr(cfg.seeds)}"),
    ], prefix=f"{path}: ")
    if len({m.name for m in cfg.methods}) != len(cfg.methods):
        raise ConfigError(f"{path}: methods: names must be unique")
    for m in cfg.methods:
        if m.seeds is not None and (not m.seeds or not set(m.seeds) <= set(cfg.seeds)):
            raise ConfigError(f"{path}: methods: {m.name}: seeds must be a non-empty subset of the experiment's seeds "
                              f"{short_repr(cfg.seeds)}, got {short_repr(m.seeds)}")
    if cfg.jobs_mode not in JOBS_MODES:
        raise ConfigError(f"{path}: jobs_mode must be one of {', '.join(JOBS_MODES)}, got {short_repr(cfg.jobs_mode)}")
    if cfg.batched_forward not in BATCHED_FORWARDS:
        raise ConfigError(f"{path}: batched_forward must be one of {', '.join(BATCHED_FORWARDS)}, got {short_repr(cfg.batched_forward)}")
    if cfg.hd95 not in ("max", "pooled"):
        raise ConfigError(f"{path}: hd95 must be max or pooled, got {short_repr(cfg.hd95)}")
    if not cfg.targets or len(set(cfg.targets)) != len(cfg.targets) or not set(cfg.targets) <= {"skull", "implant"}:
        raise ConfigError(f"{path}: targets must be a non-empty list of distinct skull|implant, got {short_repr(cfg.targets)}")
    bad = [r for r in cfg.references if r not in REFERENCES]
    if bad or len(set(cfg.references)) != len(cfg.references):
        raise ConfigError(f"{path}: references must be distinct names from {', '.join(REFERENCES)}, got {short_repr(cfg.references)}")
    if cfg.reference is not None and cfg.reference not in {m.name for m in cfg.methods}:
        raise ConfigError(f"{path}: reference: {short_repr(cfg.reference)} is not one of the methods")
    if any(e > cfg.epochs or e < 1 for e in cfg.checkpoint_epochs):
        raise ConfigError(f"{path}: checkpoint_epochs must lie in 1..epochs")
    if scale is not None:
        if not 0 < scale <= 1:
            raise ConfigError(f"--scale: must be in (0, 1], got {scale}")
        old = cfg.epochs
        cfg.epochs = max(1, round(old * scale))
        cfg.checkpoint_epochs = sorted({max(1, round(e * cfg.epochs / old)) for e in cfg.checkpoint_epochs})
        if cfg.max_train_cases is not None:
            cfg.max_train_cases = max(2, round(cfg.max_train_cases * scale))
    return cfg


# ----------------------------------------------------------------------------------------------
# stage 2 (skullrec train-implant): the full-resolution implant network


@dataclass
class ImplantNetConfig:
    """Stage-2 network and its box (see skullrec.nets.implant_net; validated by validate_stage2)."""

    grid: int = 128  # the box is resampled to grid^3 voxels for the network
    box_mm: float = 128.0  # edge of the cubic box around the defect, in mm
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Stage2TrainConfig:
    """Optimisation of stage 2."""

    epochs: int = 20
    batch_size: int = 1
    lr: float = 1e-3
    bce_weight: float = 1.0  # loss = Dice + bce_weight * BCE (Dice alone is flat on an empty prediction)
    checkpoint_epochs: list[int] = field(default_factory=list)
    num_threads: int | None = None
    # bf16: forward pass under torch.autocast(bfloat16), loss and Adam in fp32 (1.7x faster per
    # 128^3 step on an AVX-512-BF16 CPU: 0.51 vs 0.87 s), but 11x SLOWER where bf16 is emulated (an AMD
    # EPYC without AVX-512 BF16 at 96^3: 9.40 vs 0.85 s). "auto" (the default, as train.amp of stage 1)
    # takes bf16 only where the hardware has it (skullrec.training.speed.resolve_amp). Prediction runs
    # in fp32 either way.
    amp: Literal["auto", "none", "bf16"] = "auto"
    # cosine: lr * (1 + cos(pi * step / total_steps)) / 2 per step (a function of the step alone, so
    # resume is exact); a short CPU run ends on small steps instead of lr's noise.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Training-time left-right mirroring: each sample is mirrored (all channels and the target, array
    # axis 0 of the box: left-right in skullrec's canonical voxel order) with probability 0.5, drawn per
    # epoch from a (seed, epoch) generator, so resume stays exact. A skull is close to mirror-symmetric,
    # so a mirrored sample is another plausible skull with its defect on the other side: twice the
    # defect positions for the same 80 training skulls. Off by default (configs stored before it trained without).
    flip: bool = False


@dataclass
class Stage2Config:
    """A ``skullrec train-implant`` run."""

    data: str = "data/stage2"  # a folder from skullrec prepare-implant
    seed: int = 0
    out: str = "runs/implant"
    net: ImplantNetConfig = field(default_factory=ImplantNetConfig)
    train: Stage2TrainConfig = field(default_factory=Stage2TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_stage2(cfg: Stage2Config) -> Stage2Config:
    """Range checks, the bounds of :data:`LIMITS` included; ConfigError naming the key."""
    check_ranges([
        ("seed", 0 <= cfg.seed <= LIMITS["seed"], f"must be in 0..{LIMITS['seed']}, got {short_repr(cfg.seed)}"),
        ("net.grid", 1 <= cfg.net.grid <= LIMITS["size"], f"must be in 1..{LIMITS['size']}, got {short_repr(cfg.net.grid)}"),
        ("net.box_mm", 0 < cfg.net.box_mm <= LIMITS["box_mm"], f"must be in (0, {LIMITS['box_mm']:g}] mm, got {short_repr(cfg.net.box_mm)}"),
        *_strides("net.strides", cfg.net.strides),
        ("net.strides", len(cfg.net.strides) >= 1, "needs at least one entry"),
        *_channels("net.channels", cfg.net.channels),
        ("net.num_res_units", 0 <= cfg.net.num_res_units <= LIMITS["num_res_units"],
         f"must be in 0..{LIMITS['num_res_units']}, got {short_repr(cfg.net.num_res_units)}"),
    ])
    div = 2 ** len(cfg.net.strides)
    checks = [
        ("net.grid", cfg.net.grid >= div and cfg.net.grid % div == 0, f"must be a multiple of 2**len(strides) = {div}"),
        ("net.channels", len(cfg.net.channels) == len(cfg.net.strides) + 1, "needs one entry more than strides"),
        *_optimisation_checks(cfg.train),
        ("train.bce_weight", cfg.train.bce_weight >= 0, "must be >= 0"),
    ]
    check_ranges(checks)
    return cfg


def stage2_config_from_dict(values: dict[str, Any]) -> Stage2Config:
    """Build and validate a Stage2Config from a mapping (unknown keys and wrong types are ConfigErrors)."""
    _require_mapping(values)
    return validate_stage2(_from_dict(Stage2Config, values or {}))


def load_stage2_config(path: str | Path | None, overrides: list[str] | None = None) -> Stage2Config:
    """Read a stage-2 YAML config (defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    return _load(stage2_config_from_dict, path, overrides)
