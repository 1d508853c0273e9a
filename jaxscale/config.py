"""Typed experiment configuration: YAML file + `--set KEY=VALUE` overrides -> checked dataclasses.

Every check that can be made without compiling is made here (or in `validate`, once the device count is known),
so a bad config fails in a second with a message naming the key, the value and what would work.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from jaxscale.data import DataConfig, DataError
from jaxscale.errors import ConfigError, check_range
from jaxscale.model.config import ModelConfig, preset_values
from jaxscale.model.hf_config import resolve_init_from
from jaxscale.model.run_source import RUN_PREFIX, resolve_run_init_from
from jaxscale.observe.profile import ProfileConfig
from jaxscale.observe.stragglers import StragglerConfig
from jaxscale.observe.trackers import TrackingConfig
from jaxscale.parallel.plan import ONE_F_ONE_B_SCHEDULES, PipelineConfig, plan_from_config, schedule_table
from jaxscale.posttrain.config import PosttrainConfig
from jaxscale.presets import KINDS, find_preset, known_presets
from jaxscale.remat import parse_remat
from jaxscale.run_files import run_path

if TYPE_CHECKING:
    from etils import epath

MESH_AXES = ("data", "pipeline", "fsdp", "expert", "context", "tensor")  # outermost (slowest links) to innermost (fastest)
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes that split the batch (by the default rules)


@dataclass
class MeshConfig:
    """Sizes of the logical mesh axes. One axis may be -1: it takes the devices left over.

    `dcn_*` is the part of an axis that crosses slices / hosts (slow links); the rest stays inside a slice or
    host (ICI / NVLink). Total axis size = in-slice part x dcn part. `axes` adds named axes of a model's own
    (e.g. `moe_group: 4`) for rule tables to map onto; they sit between expert and tensor and stay inside a slice.
    `expert` holds a mixture-of-experts model's experts, a share on each rank, and splits the batch like data
    elsewhere (tokens reach their experts by all-to-all). `context` splits each sequence (long contexts):
    attention gathers the keys and values of the whole sequence or passes them round the ranks
    (model.context_attention, jaxscale.parallel.context).
    """

    data: int = -1
    pipeline: int = 1
    fsdp: int = 1
    expert: int = 1
    context: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_pipeline: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_context: int = 1
    dcn_tensor: int = 1
    axes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        for name, size in self.axes.items():
            if name in MESH_AXES or not str(name).isidentifier():
                raise ConfigError(f"mesh.axes.{name}: an added axis needs a name of its own (letters, digits, _), "
                                  f"not one of {', '.join(MESH_AXES)}, which are set as mesh.{name}")
            if not isinstance(size, int) or isinstance(size, bool):
                raise ConfigError(f"mesh.axes.{name}={size!r} must be an integer (or -1: the devices left over)")

    def names(self) -> tuple[str, ...]:
        """Outermost (slowest links) to innermost (fastest)."""
        return ("data", "pipeline", "fsdp", "expert", "context", *self.axes, "tensor")

    def sizes(self) -> dict[str, int]:
        return {a: self.axes[a] if a in self.axes else getattr(self, a) for a in self.names()}

    def dcn_sizes(self) -> dict[str, int]:
        return {a: 1 if a in self.axes else getattr(self, f"dcn_{a}") for a in self.names()}


# Logical axis -> mesh axis (or list of mesh axes, or None = replicated). Parameters and activations get
# separate tables: FSDP shards parameters over `fsdp` along `embed`, while activations are split over the batch.
DEFAULT_PARAM_RULES: dict[str, Any] = {
    # The embedding table (vocab, embed) splits its leading dimension over fsdp too, so that it is gathered and
    # its gradient reduce-scattered without transposes (as the layer weights, which keep `embed` first).
    "vocab": ["tensor", "fsdp"],
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": "pipeline",  # the stacked layer weights: each pipeline rank holds its stages' share
    "expert": "expert",  # a mixture-of-experts layer's experts
    "norm": None,
    "position": None,
}
DEFAULT_ACTIVATION_RULES: dict[str, Any] = {
    "batch": list(BATCH_AXES),
    "length": "context",
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
}


@dataclass
class ShardingConfig:
    params: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARAM_RULES))
    activations: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ACTIVATION_RULES))

    def __post_init__(self):
        # A table in an experiment or `--set sharding.params.embed=...` changes the rules it names; the others keep
        # their defaults (map a name to null to replicate it).
        self.params = {**DEFAULT_PARAM_RULES, **self.params}
        self.activations = {**DEFAULT_ACTIVATION_RULES, **self.activations}


@dataclass
class OptimizerConfig:
    learning_rate: float = 6e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio at the last step
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global norm; 0 disables clipping
    # Weight decay: matrices decay, vectors and scalars don't (a stacked `layers` dimension doesn't count); a
    # parameter's metadata `weight_decay=True/False` overrides that, and these path patterns (fnmatch, e.g.
    # "*/embedding", "blocks/w_*") override both.
    no_decay: list[str] = field(default_factory=list)
    decay_embeddings: bool = False  # the built-in model's token and position tables decay only if this is true

    def __post_init__(self):
        check_range("optimizer.learning_rate", self.learning_rate, 0, low_open=True)
        check_range("optimizer.warmup_steps", self.warmup_steps, 0)
        check_range("optimizer.min_lr_ratio", self.min_lr_ratio, 0, 1,
                    note=" (the final learning rate as a fraction of the peak)")
        for key in ("b1", "b2"):
            check_range(f"optimizer.{key}", getattr(self, key), 0, 1, high_open=True)
        check_range("optimizer.eps", self.eps, 0, low_open=True,
                    note=" (Adam divides by sqrt(v) + eps, and v is 0 where a gradient always is)")
        check_range("optimizer.weight_decay", self.weight_decay, 0)
        check_range("optimizer.grad_clip", self.grad_clip, 0, note=" (0 turns clipping off)")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global, in sequences
    microbatches: int = 1  # gradient accumulation: the global batch is split into this many sequential pieces
    seed: int = 0
    remat: str = "none"  # none | dots | full | save:NAMES | offload:NAMES (jaxscale.remat)
    scan_unroll: int = 1  # layers per scan iteration: 1 = compile time flat in depth; n_layers = fastest on GPU
    param_dtype: str = "float32"
    compute_dtype: str = "auto"  # auto = bfloat16 on GPU/TPU, float32 on CPU
    # The built-in decoder's projections and dense MLPs: compute (in the compute dtype) or fp8 (float8 operands,
    # scaled per tensor every step: jaxscale.kernels.fp8; NVIDIA Hopper or newer, and the CPU; refused on TPUs)
    matmul_dtype: str = "compute"
    # What gradients are summed across devices in. "compute": all of them in the compute dtype. "float32": those
    # the step computes in float32 (norms, biases, the embedding lookup's sums) in float32; a bf16 matmul's weight
    # gradient leaves the matmul in bf16 and XLA sums its per-device parts there in either setting (as the
    # compiled GPU step shows), and FSDP gathers weights already cast to the compute dtype. The optimizer
    # works in float32 either way.
    grad_reduce_dtype: str = "float32"
    log_every: int = 10
    eval_every: int = 200  # 0 disables evaluation
    eval_batches: int = 4
    progress: bool = True
    elastic: bool = False  # on another device count: refit the mesh; microbatches keep the per-device batch
    # The memory one device may use, in GB (1e9 bytes); 0: the device's own (its runtime's limit, else the
    # hardware catalog's; none on a CPU). A compiled step that needs more is refused before anything is allocated.
    memory_limit_gb: float = 0.0
    offload_optimizer: bool = False  # keep the Adam moments in host memory (pinned_host), moved in for the update
    # keep the master (float32) parameters in host memory; a compute-dtype copy comes to the devices for the
    # forward and backward pass
    offload_params: bool = False
    # where the update of host-resident state runs: device (moved in and back out) or host (XLA's host compute)
    offload_update: str = "device"

    def __post_init__(self):
        check_range("train.steps", self.steps, 1)
        check_range("train.batch_size", self.batch_size, 1,
                    note=" (sequences per step, a multiple of mesh.data x mesh.fsdp x train.microbatches)")
        check_range("train.microbatches", self.microbatches, 1, note=" (1: no gradient accumulation)")
        # JAX keys hold 32 bits of the seed: a larger one would start from the same weights as a smaller one
        check_range("train.seed", self.seed, 0, 2**32 - 1)
        check_range("train.scan_unroll", self.scan_unroll, 1, note=" (1: a rolled loop over layers)")
        check_range("train.log_every", self.log_every, 1)
        check_range("train.memory_limit_gb", self.memory_limit_gb, 0, note=" (0: the device's own memory)")
        check_range("train.eval_every", self.eval_every, 0, note=" (0 turns evaluation off)")
        if self.eval_every and self.eval_batches < 1:
            raise ConfigError(f"train.eval_batches={self.eval_batches} must be >= 1 while evaluation is on "
                              f"(train.eval_every={self.eval_every}); or set train.eval_every=0 to turn it off")
        if self.offload_update not in ("device", "host"):
            raise ConfigError(f"train.offload_update={self.offload_update!r}; choose device (the offloaded state "
                              f"moved in for the update) or host (the update computed in host memory)")
        if self.offload_update == "host" and not self.offload_optimizer:
            raise ConfigError("train.offload_update=host computes the update where the optimizer state lives, in "
                              "host memory, but it is on the devices: add --set train.offload_optimizer=true, or "
                              "use train.offload_update=device")
        if self.grad_reduce_dtype not in ("float32", "compute"):
            raise ConfigError(f"train.grad_reduce_dtype={self.grad_reduce_dtype!r}; choose float32 or compute")
        try:
            parse_remat(self.remat)
        except ValueError as e:
            raise ConfigError(f"train.remat={self.remat!r}: {e}") from None
        if self.matmul_dtype not in ("compute", "fp8"):
            raise ConfigError(f"train.matmul_dtype={self.matmul_dtype!r}; choose compute (matmuls in "
                              f"train.compute_dtype) or fp8 (float8 projections and MLPs, on Hopper GPUs)")
        for key in ("param_dtype", "compute_dtype"):
            if getattr(self, key) not in ("auto", "float32", "bfloat16", "float16") or (
                    key == "param_dtype" and self.param_dtype == "auto"):
                raise ConfigError(f"train.{key}={getattr(self, key)!r}; choose float32, bfloat16"
                                  + (", float16 or auto" if key == "compute_dtype" else " or float16"))


@dataclass
class CheckpointConfig:
    """When and where the full training state is saved, and whether a run continues from it."""

    dir: str = ""  # empty: <run_dir>/checkpoints
    every_steps: int = 1000  # save when the step is a multiple of this; 0: never by step count
    every_minutes: float = 10.0  # save when this long has passed since the last save; 0: never by time
    keep_last: int = 3  # the newest checkpoints kept
    keep_every: int = 0  # also kept for good: checkpoints whose step is a multiple of this; 0: none
    resume: bool = True  # continue from the newest good checkpoint in dir
    overwrite: bool = False  # with resume=false: delete the checkpoints already in dir instead of refusing
    async_save: bool = True  # write in the background; training pauses only to copy the state to host memory
    time_check_every: int = 10  # several processes agree on time-based saves every this many steps

    def __post_init__(self):
        for key in ("every_steps", "every_minutes", "keep_every"):
            check_range(f"checkpoint.{key}", getattr(self, key), 0, note=" (0 turns it off)")
        check_range("checkpoint.keep_last", self.keep_last, 1,
                    note=": the newest checkpoint is the one a restart continues from")
        check_range("checkpoint.time_check_every", self.time_check_every, 1)


@dataclass
class GuardsConfig:
    """Bad updates: a non-finite loss or gradient norm, or a loss spike, never reach the parameters."""

    # What a bad update (non-finite or spike) triggers. skip: it is dropped inside the step. rollback: also
    # restore the newest checkpoint and replay from there without the offending batch.
    on_nonfinite: str = "skip"
    spike_factor: float = 0.0  # a loss above spike_factor x its running average is a spike; 0: no spike check
    spike_window: int = 100  # steps in the running (exponential) average; spikes are checked after this many
    max_rollbacks: int = 3  # stop with an error after this many rollbacks to the same checkpoint
    # stop (exit code 3) after this many updates skipped in a row: the run is not recovering by itself
    max_consecutive_skips: int = 10
    # For testing only: the loss and gradients of this step (numbered as in metrics.jsonl) become NaN inside
    # the jitted step, a real fault through the real path. 0: never.
    inject_nan_at_step: int = 0

    def __post_init__(self):
        if self.on_nonfinite not in ("skip", "rollback"):
            raise ConfigError(f"guards.on_nonfinite={self.on_nonfinite!r}; choose skip or rollback")
        if self.spike_factor != 0:
            check_range("guards.spike_factor", self.spike_factor, 1, low_open=True,
                        note=" (e.g. 2.0), or 0 to turn the spike check off")
        check_range("guards.spike_window", self.spike_window, 1)
        check_range("guards.max_rollbacks", self.max_rollbacks, 1)
        check_range("guards.inject_nan_at_step", self.inject_nan_at_step, 0, note=" (0: never)")
        check_range("guards.max_consecutive_skips", self.max_consecutive_skips, 1)


@dataclass
class Config:
    name: str = "default"
    run_dir: str = ""  # empty: runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    posttrain: PosttrainConfig = field(default_factory=PosttrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # jaxscale/observe/
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    stragglers: StragglerConfig = field(default_factory=StragglerConfig)
    plan: str = ""  # auto: lay the run out as `jaxscale plan` ranks first for these devices

    def __post_init__(self):
        if self.plan not in ("", "auto"):
            raise ConfigError(f"plan={self.plan!r}; use plan=auto (the layout `jaxscale plan` ranks first), or "
                              f"leave it out to lay the run out yourself")

    def resolved_run_dir(self) -> epath.Path:
        """The run directory: a local directory or a gs:// URL (jaxscale.run_files)."""
        return run_path(self.run_dir or f"runs/{self.name}", "run_dir")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# Loading


def find_yaml(name_or_path: str, folder: str) -> Path:
    """A path to a YAML file, or a preset name: ./<folder>/NAME.yaml, then jaxscale's own (jaxscale.presets)."""
    kind = KINDS[folder]
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ConfigError(f"{kind} {name_or_path!r}: give the name of a preset or a path to a .yaml file")
    path = Path(name_or_path)
    try:
        if path.suffix in (".yaml", ".yml") or path.is_file():
            if not path.exists():
                raise ConfigError(f"{kind} file {path} does not exist")
            return path
        found = find_preset(name_or_path, folder)
    except OSError as e:  # e.g. a name too long for the file system
        raise ConfigError(f"{kind} {name_or_path!r}: {e.strerror or e}") from e
    if found is None:
        raise ConfigError(f"no {kind} named {name_or_path!r}; known: {', '.join(known_presets(folder)) or 'none'} "
                          f"(`jaxscale presets` describes them; or give a path to a .yaml file)")
    return found


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def apply_override(raw: dict, assignment: str) -> None:
    """`a.b.c=value` sets raw['a']['b']['c'] = yaml-parsed value."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like KEY=VALUE, e.g. train.steps=100")
    key, _, text = assignment.partition("=")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {assignment!r}: cannot parse value {text!r}: {e}") from e
    if isinstance(value, int) and ":" in text:  # YAML 1.1 reads 3:30 as 210 (base 60); a step range was meant
        value = text.strip()
    *parents, leaf = key.strip().split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {p} is a value, not a section")
    node[leaf] = value


def load_config(experiment: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Experiment name (in experiments/) or YAML path, then overrides, into a checked Config."""
    raw: dict = read_yaml(find_yaml(experiment or "default", "experiments"))
    raw.setdefault("name", Path(experiment or "default").stem)
    if any(o.split("=", 1)[0].strip() in ("model.preset", "model.init_from") for o in overrides):
        raw["model"] = {}  # a preset or checkpoint on the command line replaces the experiment's model section
    for o in overrides:
        if o.startswith("mesh.") and isinstance(raw.get("mesh"), str):  # a key inside a preset: expand it first
            raw["mesh"] = read_yaml(find_yaml(raw["mesh"], "meshes"))
        apply_override(raw, o)
    model = raw.get("model")
    if isinstance(model, dict) and "preset" in model:  # preset values first, the experiment's own keys win
        raw["model"] = {**preset_values(model.pop("preset")), **model}
    if isinstance(raw.get("model"), dict) and raw["model"].get("init_from"):  # the shape from its config
        init_from = str(raw["model"]["init_from"])
        raw["model"] = (resolve_run_init_from if init_from.startswith(RUN_PREFIX) else resolve_init_from)(raw["model"])
    mesh = raw.get("mesh")
    if isinstance(mesh, str):  # a mesh preset name; `--set mesh=gpu-8` works too
        raw["mesh"] = read_yaml(find_yaml(mesh, "meshes"))
    elif isinstance(mesh, dict) and "preset" in mesh:
        raw["mesh"] = {**read_yaml(find_yaml(mesh.pop("preset"), "meshes")), **mesh}
    config = from_dict(Config, raw, "")
    config.model = config.model.resolved()
    return config


def from_dict(cls, raw: dict, prefix: str):
    """Build dataclass `cls` from `raw`, rejecting unknown keys and wrong types with the dotted key named."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if not isinstance(key, str):  # YAML reads `1:`, `null:`, `? x` as keys of other types
            raise ConfigError(f"config key {key!r} in {prefix.rstrip('.') or 'the config'} is not a name; "
                              f"known keys: {', '.join(names)}")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = coerce(hints[key], value, prefix + key)
    try:
        return cls(**kwargs)
    except DataError as e:  # DataConfig's own checks: a configuration problem like any other here
        raise ConfigError(str(e)) from e


def coerce(tp, value, key: str):
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {coerce(key_type, k, f"a key of {key}"): coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return list(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 6e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")


def save_config(config: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# Checks that need the device count


def batch_shards(sizes: dict[str, int]) -> int:
    """Into how many parts the default rules split the batch: mesh.data x mesh.fsdp x mesh.expert."""
    return sizes["data"] * sizes["fsdp"] * sizes.get("expert", 1)  # sizes of a mesh written before the axis


def resolve_mesh_sizes(mesh: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with the one -1 filled in; their product must equal the device count."""
    sizes = mesh.sizes()
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise ConfigError(f"mesh sizes must be positive or -1 (fill), got {bad}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got mesh.{' and mesh.'.join(fill)}")
    fixed = 1
    for s in sizes.values():
        if s != -1:
            fixed *= s
    if fill:
        if n_devices % fixed:
            raise ConfigError(f"mesh.{fill[0]}=-1 cannot fill {n_devices} devices: the other axes multiply to "
                              f"{fixed}, which does not divide {n_devices}")
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"mesh {sizes} has {fixed} devices but {n_devices} are present; make the product "
                          f"{n_devices} or set one axis to -1, e.g. --set mesh.data=-1")
    for a, dcn in mesh.dcn_sizes().items():
        if dcn < 1 or sizes[a] % dcn:
            raise ConfigError(f"mesh.dcn_{a}={dcn} must be >= 1 and divide mesh.{a}={sizes[a]}")
    return sizes


def validate(config: Config, n_devices: int, builtin_model: bool = True) -> dict[str, int]:
    """Everything that can be wrong before compiling; returns the resolved mesh sizes. `builtin_model`: the
    run trains the built-in decoder that config.model describes (else a user's model, which it doesn't)."""
    sizes = resolve_mesh_sizes(config.mesh, n_devices)
    m, t = config.model, config.train
    if builtin_model:
        for name, count in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads), ("model.d_ff", m.d_ff)):
            if count % sizes["tensor"]:
                raise ConfigError(f"{name}={count} is not divisible by mesh.tensor={sizes['tensor']}; "
                                  f"choose a tensor size that divides it")
        if m.moe is not None:
            m.moe.check_mesh(sizes, config.pipeline.schedule)
        if sizes["context"] > 1 and m.seq_len % (2 * sizes["context"]):
            raise ConfigError(f"model.seq_len={m.seq_len} must be a multiple of 2 x mesh.context = "
                              f"{2 * sizes['context']}: each context rank holds two of 2 x context equal chunks")
        if sizes["context"] > 1 and sizes["pipeline"] > 1:
            raise ConfigError("mesh.context > 1 with mesh.pipeline > 1 is not supported yet; use one of them")
    shards = batch_shards(sizes)
    if t.batch_size % (shards * t.microbatches):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by mesh.data x mesh.fsdp x "
                          f"mesh.expert x train.microbatches = {sizes['data']} x {sizes['fsdp']} x "
                          f"{sizes['expert']} x {t.microbatches}; "
                          f"try train.batch_size={shards * t.microbatches * max(1, t.batch_size // (shards * t.microbatches))}")
    if sizes["pipeline"] > 1 and builtin_model:
        stages = sizes["pipeline"]
        staged, layers = m.staged_layers, f"model.n_layers={m.n_layers}"
        if staged != m.n_layers:  # a mixture of experts is staged in groups of moe.every layers
            layers = f"{layers} in groups of model.moe.every={m.moe.every} ({staged} groups)"
        plan = plan_from_config(config.pipeline, staged, stages, layers)  # microbatches, layers against stages
        if config.pipeline.schedule in ONE_F_ONE_B_SCHEDULES:  # interleaved: microbatches against stages
            schedule_table(config.pipeline.schedule, stages, plan.microbatches, plan.repeats)
        rule = config.sharding.params.get("layers")
        if staged % stages and "pipeline" in (rule if isinstance(rule, list) else [rule]):
            raise ConfigError(f"{layers} does not split evenly over mesh.pipeline="
                              f"{stages}, so sharding.params.layers={rule!r} cannot shard the stacked layer "
                              f"weights; choose {'n_layers' if staged == m.n_layers else 'n_layers / moe.every'} "
                              f"divisible by {stages}, or set "
                              f"sharding.params.layers=null (every pipeline rank then keeps all layers; the "
                              f"stages still split the work)")
        rows = t.batch_size // (shards * t.microbatches)  # per batch shard and accumulation step
        if rows % plan.microbatches:
            fits = " or ".join(str(c) for c in range(stages, rows + 1) if rows % c == 0)
            raise ConfigError(f"pipeline.microbatches={plan.microbatches} must divide the {rows} rows each "
                              f"batch shard gets per step (train.batch_size={t.batch_size} / mesh.data x "
                              f"mesh.fsdp x mesh.expert x train.microbatches = {shards} x {t.microbatches}); "
                              + (f"pipeline.microbatches={fits} would work" if fits else
                                 f"try train.batch_size={shards * t.microbatches * plan.microbatches}"))
    for table_name, table in (("sharding.params", config.sharding.params),
                              ("sharding.activations", config.sharding.activations)):
        for logical, target in table.items():
            targets = target if isinstance(target, list) else [target]
            for ax in targets:
                if ax is not None and ax not in config.mesh.names():
                    raise ConfigError(f"{table_name}.{logical}={target!r}: {ax!r} is not a mesh axis; "
                                      f"use one of {', '.join(config.mesh.names())} or null (or add it: "
                                      f"mesh.axes.{ax}=SIZE)")
    return sizes
