"""Training configuration: TOML files read with tomllib and checked into typed dataclasses.

Every table and key is listed below with its default; anything else in a file is an error, so a typo
never silently falls back to a default. The recipes in nn_numba/configs/ ship with the package and load
by name (`default`, `best`, ...) from any folder.
"""

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NNError
from .files import NotAFileError, open_regular


class ConfigError(NNError):
    pass


@dataclass
class Model:
    sizes: list[int] = field(default_factory=lambda: [784, 250, 250, 10])


@dataclass
class Data:
    dir: str = ""  # used after --data-dir and $NN_NUMBA_DATA; empty: the per-user cache
    val_split: float = 0.1  # fraction of the 60,000 training images held out for model selection
    shuffle: bool = True


@dataclass
class Optim:
    name: str = "adam"  # sgd | momentum | adam
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0  # L2 on the weights W (not the biases)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    reduction: str = "mean"  # mean | sum (the original design sums the loss over the batch)


@dataclass
class Schedule:
    name: str = "constant"  # constant | step | cosine
    warmup_epochs: float = 0.0
    step_epochs: int = 10  # step: multiply by gamma every step_epochs epochs
    gamma: float = 0.1
    min_lr: float = 0.0  # cosine: the rate it decays to
    plan_epochs: int = 0  # the epochs warm-up and decay are laid out over; 0: [train] epochs (docs/training.md)


@dataclass
class Augment:
    """Random distortions of each training digit (augment.py); every field 0 means off.

    shift: max integer translation per axis in pixels, uniform in [-shift, shift], zero fill.
    rotate: max rotation in degrees, uniform in [-rotate, rotate] (positive = counter-clockwise on screen).
    scale: max relative scaling, factor uniform in [1 - scale, 1 + scale] (> 1 enlarges the digit).
    elastic_alpha: elastic displacement strength in pixels: no displacement exceeds it, the RMS one is
        about alpha / 3.5 (augment.elastic_grid).
    elastic_sigma: smoothness of the elastic field in pixels: the spacing of the random control grid.
    """

    shift: int = 0
    rotate: float = 0.0
    scale: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0

    @property
    def enabled(self) -> bool:
        return self.shift > 0 or self.rotate > 0 or self.scale > 0 or self.elastic_alpha > 0

    def active(self) -> dict[str, float]:
        """The settings in effect (elastic_sigma only with elastic_alpha)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v and (k != "elastic_sigma" or self.elastic_alpha)}


@dataclass
class Train:
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    threads: int = 0  # 0 = all cores
    out: str = "runs"  # run folders go to OUT/<timestamp>/


@dataclass
class Config:
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    optim: Optim = field(default_factory=Optim)
    schedule: Schedule = field(default_factory=Schedule)
    augment: Augment = field(default_factory=Augment)
    train: Train = field(default_factory=Train)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML (tomllib can read it back)."""
        out = []
        for table, values in self.to_dict().items():
            out.append(f"[{table}]")
            for key, v in values.items():
                out.append(f"{key} = {_toml_value(v)}")
            out.append("")
        return "\n".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):  # a TOML basic string: control characters must be escaped
        return '"' + "".join(c if c >= " " and c not in '"\\\x7f' else
                             (f"\\{c}" if c in '"\\' else f"\\u{ord(c):04x}") for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


# Allowed values and ranges, checked after the types. (table, key): (low, high) or a set of choices.
_CHOICES = {("optim", "name"): {"sgd", "momentum", "adam"}, ("optim", "reduction"): {"sum", "mean"},
            ("schedule", "name"): {"constant", "step", "cosine"}}
_RANGES = {
    ("data", "val_split"): (0.0, 0.5), ("optim", "lr"): (0.0, 10.0), ("optim", "momentum"): (0.0, 1.0),
    ("optim", "weight_decay"): (0.0, 1.0), ("optim", "beta1"): (0.0, 1.0), ("optim", "beta2"): (0.0, 1.0),
    ("optim", "eps"): (1e-30, 1.0), ("schedule", "warmup_epochs"): (0.0, 1e4),
    ("schedule", "step_epochs"): (1, 10**6), ("schedule", "gamma"): (0.0, 1.0), ("schedule", "min_lr"): (0.0, 10.0),
    ("schedule", "plan_epochs"): (0, 100_000),
    ("augment", "shift"): (0, 14), ("augment", "rotate"): (0.0, 180.0), ("augment", "scale"): (0.0, 0.9),
    ("augment", "elastic_alpha"): (0.0, 10.0), ("augment", "elastic_sigma"): (2.0, 100.0),
    ("train", "epochs"): (1, 100_000), ("train", "batch_size"): (1, 60_000), ("train", "seed"): (0, 2**63 - 1),
    ("train", "threads"): (0, 1024),
}
_EXCLUSIVE_LOW = {("optim", "lr"), ("optim", "eps")}
_EXCLUSIVE_HIGH = {("optim", "beta1"), ("optim", "beta2")}  # Adam divides by 1 - beta**t
MAX_FILE = 1 << 20  # a config is a few hundred bytes: refuse to read /dev/zero or a 10 GB log into memory
MAX_PARAMS = 50_000_000  # 200 MB per copy of the weights; training keeps four (weights, grad, Adam m, v)
MAX_ACTS = 1 << 28  # floats of activations per mini-batch (batch_size x hidden widths): 1 GB
SHIPPED = Path(__file__).parent / "configs"  # installed with the package; the repository's configs/ links here


def shipped_names() -> list[str]:
    """The configs that ship with the package, by name: default, best, no-augment, seed.

    NAME.toml files only: the folder also holds sweep files (NAME.sweep.toml, docs/sweep.md).
    """
    order = ["default", "best", "no-augment", "seed"]
    names = [p.stem for p in SHIPPED.glob("*.toml") if "." not in p.stem]
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def config_path(name_or_path: str | Path) -> Path:
    """A config file: the path if it is a file, else the shipped config of that name (`default`, ...)."""
    path = Path(name_or_path)
    if str(name_or_path) in shipped_names() and not path.is_file():
        return SHIPPED / f"{name_or_path}.toml"
    return path


def load_config(path: str | Path) -> Config:
    """Read and check a TOML config: a file or the name of a shipped one (`default`, `best`, ...).

    Every problem is a one-line ConfigError naming the file and key.
    """
    path = config_path(path)
    try:
        f, size = open_regular(path)
        with f:
            data = f.read(min(size, MAX_FILE) + 1)  # no 1 MB buffer for a 300-byte file
        if len(data) > MAX_FILE:
            raise ConfigError(f"{path}: larger than {MAX_FILE // 1024} KB, not a config file "
                              "(a config is TOML, see `nn-numba configs default`)")
        text = data.decode("utf-8-sig")  # a byte order mark (Windows editors write one) is not TOML
    except FileNotFoundError:
        raise ConfigError(f"no such config file {path}: give a path or one of: {', '.join(shipped_names())}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except NotAFileError as e:
        raise ConfigError(f"{path}: {e.strerror}, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is TOML, see `nn-numba configs default`)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # e.g. a = [[[[... nested thousands deep
        raise ConfigError(f"{path}: not valid TOML: values nested too deeply") from None
    return from_dict(raw, str(path))


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    cfg = Config()
    for table, values in raw.items():
        if table not in _tables():
            raise ConfigError(f"{source}: unknown table [{table}] (known: {', '.join(_tables())})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{table}' must be a table like [{table}]")
        section = getattr(cfg, table)
        known = {f.name: f for f in dataclasses.fields(section)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key '{key}' in [{table}] (known: {', '.join(known)})")
            setattr(section, key, _typed(f"{source}: [{table}] {key}", value, type(getattr(section, key))))
    check(cfg, source)
    return cfg


def with_values(cfg: Config, values: dict[str, Any], source: str = "config") -> Config:
    """A copy of `cfg` with dotted keys set ({"optim.lr": 0.01, ...}), checked like a file."""
    d = cfg.to_dict()
    for dotted, value in values.items():
        table, _, key = dotted.partition(".")
        if table not in d or key not in d[table]:
            raise ConfigError(f"{source}: unknown config key '{dotted}' (keys are TABLE.KEY, e.g. optim.lr)")
        d[table][key] = value
    return from_dict(d, source)


def _tables() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _typed(where: str, value: Any, want: type) -> Any:
    if want is list:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where} must be a list of whole numbers, like [784, 250, 250, 10]")
        return value
    if want is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, not {value!r}")
        return value
    if want is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, not {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    if "\x00" in value:  # every string here is a path or a name: the OS refuses NUL
        raise ConfigError(f"{where} must not contain a NUL character")
    return value


def check(cfg: Config, source: str = "config") -> None:
    """Impossible values: a ConfigError naming the key. Also used after command-line overrides."""
    for (table, key), allowed in _CHOICES.items():
        v = getattr(getattr(cfg, table), key)
        if v not in allowed:
            raise ConfigError(f"{source}: [{table}] {key} = {v!r} is not one of {', '.join(sorted(allowed))}")
    for (table, key), (lo, hi) in _RANGES.items():
        v = getattr(getattr(cfg, table), key)
        low_ok = v > lo if (table, key) in _EXCLUSIVE_LOW else v >= lo
        high_ok = v < hi if (table, key) in _EXCLUSIVE_HIGH else v <= hi
        if not (low_ok and high_ok):
            rng = ("(" if (table, key) in _EXCLUSIVE_LOW else "[") + f"{lo}, {hi}" + \
                (")" if (table, key) in _EXCLUSIVE_HIGH else "]")
            raise ConfigError(f"{source}: [{table}] {key} = {v!r} is out of range {rng}")
    sizes = cfg.model.sizes
    if len(sizes) < 2 or len(sizes) > 65:
        raise ConfigError(f"{source}: [model] sizes needs 2 to 65 entries, got {len(sizes)}")
    if sizes[0] != 784 or sizes[-1] != 10:
        raise ConfigError(f"{source}: [model] sizes must start at 784 (28x28 pixels) and end at 10 (digits) "
                          f"for MNIST, got {sizes}")
    if any(not 1 <= n <= 100_000 for n in sizes):
        raise ConfigError(f"{source}: [model] sizes must each be between 1 and 100000, got {sizes}")
    n = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    if n > MAX_PARAMS:
        raise ConfigError(f"{source}: [model] sizes {sizes} make {n:,} parameters, more than this trainer's "
                          f"{MAX_PARAMS:,}: use narrower layers")
    if cfg.train.batch_size * sum(sizes[1:]) > MAX_ACTS:
        raise ConfigError(f"{source}: [train] batch_size {cfg.train.batch_size} x {sum(sizes[1:])} neurons needs "
                          f"more than {MAX_ACTS:,} activations per mini-batch: use a smaller batch_size")
    for table, key in (("data", "dir"), ("train", "out")):
        v = getattr(getattr(cfg, table), key)
        if "\x00" in v or not _utf8(v):
            raise ConfigError(f"{source}: [{table}] {key} = {v!r} is not a usable path")


def _utf8(v: str) -> bool:
    try:
        v.encode("utf-8")
        return True
    except UnicodeEncodeError:  # e.g. --out given as bytes that are not UTF-8 (surrogate escapes)
        return False


OVERRIDES = {"epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("optim", "lr"),
             "seed": ("train", "seed"), "threads": ("train", "threads"), "out": ("train", "out")}


def apply_overrides(cfg: Config, **over: Any) -> Config:
    """Command-line flags (the keys of OVERRIDES; None: not given) over the file's values, checked again."""
    return with_values(cfg, {".".join(OVERRIDES[k]): v for k, v in over.items() if v is not None}, "command line")
