"""Recipe: a validated description of a compression run, with YAML in/out and named presets."""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from .errors import RecipeError
from .patterns import SparsitySpec
from .quant import QuantSpec
from .solvers import LinearPlan
from .solvers.lowrank import AdapterSpec
from .solvers.registry import JOINT, PRUNERS, QUANTIZERS


@dataclass(frozen=True)
class QuantConfig:
    method: str = "rtn"  # rtn | gptq
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)


@dataclass(frozen=True)
class AdapterConfig:
    """SLiM low-rank adapter after compression (see solvers/lowrank.py).

    rank: a float in (0, 1] is a fraction of min(out, in); an int is an absolute rank.
    bits: None keeps the factors in the checkpoint's float dtype; 4 quantizes them (symmetric,
    groups of group_size along each factor's reduction dimension). iterations: 1 as in SLiM; more
    alternates compressing W - adapter and refitting. saliency: rms (SLiM) or hessian.
    """

    rank: float | int = 0.1
    bits: int | None = None
    group_size: int | None = 128
    iterations: int = 1
    saliency: str = "rms"

    def spec(self) -> AdapterSpec:
        return AdapterSpec(rank=self.rank, bits=self.bits, group_size=self.group_size,
                           iterations=self.iterations, saliency=self.saliency)


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "wikipedia"
    samples: int = 64
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8


VARIANCE_CORRECTION_MODES = ("std", "mean", "lsq")


@dataclass(frozen=True)
class RecoveryConfig:
    """Accuracy recovery after each linear / decoder layer is compressed.

    variance_correction: false, true (= "std": match each output channel's mean and std to the
    dense layer's on the calibration data), "mean" (match the mean only: a bias) or "lsq"
    (least-squares per-channel scale and shift). finetune_steps: Adam steps per decoder layer on
    its kept weights, masks and codes fixed (0 = off); finetune_lr: step size in relative units (a
    scale or weight moves by about this fraction of itself per step); finetune_batch: calibration
    windows per step. See pipeline/variance_correction.py and pipeline/block_finetune.py.
    """

    variance_correction: bool | str = False
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    finetune_batch: int = 2

    def __post_init__(self):
        vc = self.variance_correction
        if not (isinstance(vc, bool) or vc in VARIANCE_CORRECTION_MODES):
            raise RecipeError(f"variance_correction must be true, false or one of "
                              f"{', '.join(VARIANCE_CORRECTION_MODES)}; got {vc!r}")
        if isinstance(self.finetune_steps, bool) or not isinstance(self.finetune_steps, int) or self.finetune_steps < 0:
            raise RecipeError(f"finetune_steps must be a non-negative integer, got {self.finetune_steps!r}")
        lr = self.finetune_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < float(lr) < 1:
            raise RecipeError(f"finetune_lr must be a number in (0, 1), got {lr!r}")
        if isinstance(self.finetune_batch, bool) or not isinstance(self.finetune_batch, int) or self.finetune_batch < 1:
            raise RecipeError(f"finetune_batch must be a positive integer, got {self.finetune_batch!r}")

    @property
    def variance_mode(self) -> str | None:
        """The variance-correction mode, or None when off."""
        vc = self.variance_correction
        return ("std" if vc else None) if isinstance(vc, bool) else vc


OVERRIDE_KEYS = ("match", "method", "pattern", "quant", "joint", "options")


def _check_override(o, index: int) -> dict:
    """One entry of ``overrides``, checked: a mapping with a ``match`` glob and known keys."""
    where = f"overrides[{index}]"
    if not isinstance(o, dict):
        raise RecipeError(f"{where} must be a mapping like {{match: '*.down_proj', pattern: dense}}, got {o!r}")
    unknown = sorted(set(o) - set(OVERRIDE_KEYS))
    if unknown:
        raise RecipeError(f"{where} has unknown key(s) {', '.join(unknown)}; known: {', '.join(OVERRIDE_KEYS)}")
    if not isinstance(o.get("match"), str) or not o["match"]:
        raise RecipeError(f"{where} needs 'match': a glob of linear names such as 'model.layers.3.*'")
    if len(o) == 1:
        raise RecipeError(f"{where} changes nothing: give method, pattern, quant, joint or options")
    o = dict(o)
    if "pattern" in o:
        try:
            SparsitySpec.parse(str(o["pattern"]))
        except Exception as exc:
            raise RecipeError(f"{where}: {exc}") from None
        o["pattern"] = str(o["pattern"])
    if "method" in o and o["method"] not in PRUNERS:
        raise RecipeError(f"{where}: unknown pruning method {o['method']!r}; available: {', '.join(sorted(PRUNERS))}")
    if o.get("quant") is not None:
        if not isinstance(o["quant"], dict):
            raise RecipeError(f"{where}: quant must be a mapping (merged onto the recipe's) or null")
        try:
            q = replace(QuantConfig(), **o["quant"])
        except TypeError as exc:
            raise RecipeError(f"{where}: bad quant section: {exc}") from None
        if q.method not in QUANTIZERS:
            raise RecipeError(f"{where}: unknown quantizer {q.method!r}; available: {', '.join(sorted(QUANTIZERS))}")
        try:
            q.spec()
        except Exception as exc:
            raise RecipeError(f"{where}: {exc}") from None
        o["quant"] = dict(o["quant"])
    if "joint" in o and not isinstance(o["joint"], bool):
        raise RecipeError(f"{where}: joint must be true or false")
    if "options" in o:
        if not isinstance(o["options"], dict):
            raise RecipeError(f"{where}: options must be a mapping")
        o["options"] = dict(o["options"])
    return o


@dataclass(frozen=True)
class Recipe:

    """What to do to a model.

    method: pruning method (magnitude, wanda, sparsegpt, ...). pattern: "2:4", "4:8", "50%",
    "50%-matrix" or "dense". quant: None for no quantization. skip: glob patterns of linear
    names (e.g. ``"*.mlp.down_proj"`` or ``"model.layers.0.*"``) left untouched. joint: prune and
    quantize together when the method can (SparseGPT). options: extra solver arguments.
    recovery: variance correction and blockwise fine-tuning (RecoveryConfig).
    overrides: per-linear changes, each ``{match: glob, method/pattern/quant/joint/options: ...}``,
    applied in order to every linear whose name matches (a later match wins); ``quant`` is merged
    onto the quant in force (``null`` removes it); ``pattern: dense`` with ``quant: null`` leaves
    the linear untouched.
    """

    name: str = "custom"
    method: str = "wanda"
    pattern: str = "2:4"
    quant: QuantConfig | None = field(default_factory=QuantConfig)
    joint: bool = True
    true_sequential: bool = False
    skip: tuple[str, ...] = ()
    smoothing: float | None = None  # SmoothQuant alpha; None = no equalization
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    options: dict = field(default_factory=dict)
    adapter: AdapterConfig | None = None  # low-rank adapters fitted on each linear's compression error
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    overrides: tuple = ()  # per-linear changes, see the class docstring

    def __post_init__(self):
        if isinstance(self.overrides, (str, dict)) or not isinstance(self.overrides, (list, tuple)):
            raise RecipeError("overrides must be a list of mappings like {match: '*.down_proj', pattern: dense}")
        object.__setattr__(self, "overrides", tuple(_check_override(o, i) for i, o in enumerate(self.overrides)))
        if not isinstance(self.recovery, RecoveryConfig):
            raise RecipeError(f"recovery must be a RecoveryConfig (a mapping in YAML), got {self.recovery!r}")
        sparsity = SparsitySpec.parse(self.pattern)  # raises on a bad pattern
        if not sparsity.is_dense and self.method not in PRUNERS:
            raise RecipeError(f"unknown pruning method {self.method!r}; available: {', '.join(sorted(PRUNERS))}")
        if self.quant is not None:
            if self.quant.method not in QUANTIZERS:
                raise RecipeError(
                    f"unknown quantizer {self.quant.method!r}; available: {', '.join(sorted(QUANTIZERS))}"
                )
            self.quant.spec()  # raises on bad bits / group size
        if sparsity.is_dense and self.quant is None:
            raise RecipeError("this recipe neither prunes nor quantizes: give a pattern or a quant section")
        if self.smoothing is not None and not 0.0 <= float(self.smoothing) <= 1.0:
            raise RecipeError(f"smoothing alpha must be in [0, 1], got {self.smoothing}")
        if self.calibration.samples < 1 or self.calibration.seq_len < 2:
            raise RecipeError("calibration needs at least one sample of at least two tokens")
        if self.adapter is not None:
            if not isinstance(self.adapter, AdapterConfig):
                raise RecipeError(f"adapter must be an AdapterConfig (a mapping in YAML), got {self.adapter!r}")
            self.adapter.spec()  # raises on a bad rank, bits, iterations or saliency

    @property
    def sparsity(self) -> SparsitySpec:
        return SparsitySpec.parse(self.pattern)

    def plan(self) -> LinearPlan:
        quant = None if self.quant is None else self.quant.spec()
        return LinearPlan(
            prune=self.method,
            sparsity=self.sparsity,
            quantizer=self.quant.method if self.quant else "rtn",
            quant=quant,
            joint=self.joint and self.method in JOINT,
            options=tuple(sorted(self.options.items())),
            adapter=None if self.adapter is None else self.adapter.spec(),
        )

    def plan_for(self, linear_name: str) -> LinearPlan | None:
        """The plan for one linear, or None when it stays untouched (a skip pattern, or overrides
        that leave it dense and unquantized)."""
        if any(fnmatch.fnmatch(linear_name, pat) for pat in self.skip):
            return None
        matching = [o for o in self.overrides if fnmatch.fnmatch(linear_name, o["match"])]
        if not matching:
            return self.plan()
        fields = {"method": self.method, "pattern": self.pattern, "quant": self.quant, "joint": self.joint,
                  "options": dict(self.options)}
        for o in matching:
            for key in ("method", "pattern", "joint"):
                if key in o:
                    fields[key] = o[key]
            if "quant" in o:
                fields["quant"] = None if o["quant"] is None else replace(fields["quant"] or QuantConfig(), **o["quant"])
            if "options" in o:
                fields["options"] = {**fields["options"], **o["options"]}
        if SparsitySpec.parse(fields["pattern"]).is_dense and fields["quant"] is None:
            return None
        try:
            sub = replace(self, **fields, overrides=(), skip=())
        except RecipeError as exc:
            raise RecipeError(f"overrides for {linear_name}: {exc}") from None
        return sub.plan()

    # -- description ------------------------------------------------------------------------
    def describe(self) -> dict[str, str]:
        q = self.quant
        return {
            "method": self.method if not self.sparsity.is_dense else "-",
            "pattern": str(self.sparsity),
            "quant": "-" if q is None else f"{q.method} int{q.bits} " + (f"g{q.group_size}" if q.group_size else "per-channel") + (" sym" if q.symmetric else " asym"),
            "adapter": "-" if self.adapter is None else str(self.adapter.spec()),
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip"] = list(self.skip)
        d["overrides"] = [dict(o) for o in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise RecipeError(f"unknown recipe keys: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        try:
            if d.get("quant") is not None:
                d["quant"] = QuantConfig(**d["quant"])
            if "calibration" in d:
                d["calibration"] = CalibrationConfig(**d["calibration"])
            if "recovery" in d:
                if not isinstance(d["recovery"] or {}, dict):
                    raise RecipeError(f"recipe section recovery must be a mapping, got {d['recovery']!r}")
                d["recovery"] = RecoveryConfig(**(d["recovery"] or {}))
            if d.get("adapter") is not None:
                if not isinstance(d["adapter"], dict):
                    raise RecipeError(f"recipe section adapter must be a mapping (rank, bits, ...), got {d['adapter']!r}")
                d["adapter"] = AdapterConfig(**d["adapter"])
        except TypeError as exc:
            raise RecipeError(f"bad recipe section: {exc}") from None
        if "skip" in d:
            d["skip"] = tuple(d["skip"] or ())
        if isinstance(d.get("overrides"), list) or d.get("overrides", ()) is None:
            d["overrides"] = tuple(d["overrides"] or ())
        return cls(**d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise RecipeError("a recipe YAML file must hold a mapping")
        return cls.from_dict(data)

    def with_(self, **changes) -> "Recipe":
        return replace(self, **changes)


def _int4(method="rtn"):
    return QuantConfig(method=method, bits=4, group_size=128, symmetric=True)


PRESETS: dict[str, Recipe] = {
    "2:4-w4a16": Recipe(name="2:4-w4a16", method="wanda", pattern="2:4", quant=_int4()),
    "50%-w4a16": Recipe(name="50%-w4a16", method="wanda", pattern="50%", quant=_int4()),
    "2:4-w4a16-sparsegpt": Recipe(name="2:4-w4a16-sparsegpt", method="sparsegpt", pattern="2:4", quant=_int4(),
                                  joint=True),
    "50%-w4a16-sparsegpt": Recipe(name="50%-w4a16-sparsegpt", method="sparsegpt", pattern="50%", quant=_int4(),
                                  joint=True),
    # SLiM-style: joint SparseGPT 2:4 + int4, then low-rank adapters of rank 0.1 * min(out, in).
    "2:4-w4a16-sparsegpt-slim": Recipe(name="2:4-w4a16-sparsegpt-slim", method="sparsegpt", pattern="2:4",
                                       quant=_int4(), joint=True, adapter=AdapterConfig(rank=0.1)),
    "2:4-w4a16-sparsegpt-slim-q4": Recipe(name="2:4-w4a16-sparsegpt-slim-q4", method="sparsegpt", pattern="2:4",
                                          quant=_int4(), joint=True, adapter=AdapterConfig(rank=0.1, bits=4)),
    "w4a16-gptq": Recipe(name="w4a16-gptq", method="magnitude", pattern="dense", quant=_int4("gptq")),
    "w4a16": Recipe(name="w4a16", method="magnitude", pattern="dense", quant=_int4()),
    "w8a16": Recipe(name="w8a16", method="magnitude", pattern="dense",
                    quant=QuantConfig(bits=8, group_size=None, symmetric=True)),
    "2:4": Recipe(name="2:4", method="wanda", pattern="2:4", quant=None),
    "2:4-sparsegpt": Recipe(name="2:4-sparsegpt", method="sparsegpt", pattern="2:4", quant=None),
    "4:8": Recipe(name="4:8", method="wanda", pattern="4:8", quant=None),
    "50%": Recipe(name="50%", method="wanda", pattern="50%", quant=None),
}


def get_recipe(name_or_path: str | Recipe) -> Recipe:
    """A named preset, or a YAML file."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        return Recipe.from_yaml(path.read_text())
    raise RecipeError(f"unknown recipe {name_or_path!r}; presets: {', '.join(PRESETS)}, or a YAML file")
