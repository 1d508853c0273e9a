"""Bad configs fail before anything compiles, with a message naming the key, the value and the fix."""
import pytest

from jaxscale.config import Config, MeshConfig, TrainConfig, load_config, validate
from jaxscale.errors import ConfigError
from jaxscale.model import ModelConfig


def test_default_experiment_loads_and_overrides_apply():
    config = load_config(None, ["train.steps=7", "mesh.fsdp=2", "optimizer.learning_rate=1e-4",
                                "sharding.params.embed=[fsdp, data]"])
    assert config.train.steps == 7 and config.mesh.fsdp == 2
    assert config.optimizer.learning_rate == pytest.approx(1e-4)
    assert config.sharding.params["embed"] == ["fsdp", "data"]
    assert config.sharding.params["mlp"] == "tensor" and config.sharding.params["layers"] == "pipeline"


def test_a_partial_rule_table_keeps_the_other_default_rules():
    config = load_config(None, ["sharding.params.mlp=[tensor, fsdp]", "sharding.activations.vocab=null"])
    assert config.sharding.params["mlp"] == ["tensor", "fsdp"]
    assert config.sharding.params["embed"] == "fsdp" and config.sharding.params["heads"] == "tensor"
    assert config.sharding.activations["vocab"] is None
    assert config.sharding.activations["batch"] == ["data", "fsdp", "expert"]


def test_model_preset_and_mesh_preset():
    config = load_config("gpt2-124m", ["model.seq_len=512"])
    assert (config.model.d_model, config.model.n_layers, config.model.seq_len) == (768, 12, 512)
    assert config.model.tie_embeddings and config.model.d_ff == 3072
    assert config.model.matmul_params() == 12 * 12 * 768 * 768 + 50304 * 768
    config = load_config(None, ["mesh=cpu-8"])
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (2, 2, 2)
    config = load_config("gpt2-124m", ["mesh.data=-1"])  # a key inside the experiment's mesh preset
    assert (config.mesh.data, config.mesh.fsdp) == (-1, 1)
    config = load_config(None, ["model.preset=tiny-llama"])
    assert config.model.style == "llama" and config.model.n_kv_heads == 2


@pytest.mark.parametrize("override,message", [
    (["train.stepz=3"], r"unknown config key train\.stepz; did you mean train\.steps"),
    (["train.steps=many"], r"train\.steps must be int, got 'many'"),
    (["model.style=bert"], r"model\.style='bert'; choose gpt2 or llama"),
    (["model.n_heads=5"], r"d_model=128 must be divisible by model\.n_heads=5"),
    (["model.preset=gpt9"], r"model\.preset='gpt9' is unknown; choose one of"),
    (["mesh=nowhere"], r"no mesh named 'nowhere'; known: .*cpu-8"),
    (["train.steps"], r"must look like KEY=VALUE"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_unknown_experiment_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"no experiment named 'nope'; known: .*default"):
        load_config("nope")


def config_with(mesh: dict, batch=16, microbatches=1, **model) -> Config:
    return Config(model=ModelConfig.from_preset("tiny", **model), mesh=MeshConfig(**mesh),
                  train=TrainConfig(batch_size=batch, microbatches=microbatches))


@pytest.mark.parametrize("config,devices,message", [
    (config_with(dict(data=2, fsdp=2)), 8, r"has 4 devices but 8 are present.*mesh\.data=-1"),
    (config_with(dict(data=-1, fsdp=3)), 8, r"mesh\.data=-1 cannot fill 8 devices"),
    (config_with(dict(data=-1, fsdp=-1)), 8, r"only one mesh axis may be -1"),
    (config_with(dict(data=1, tensor=8)), 8, r"model\.n_heads=4 is not divisible by mesh\.tensor=8"),
    (config_with(dict(data=8), batch=12), 8, r"train\.batch_size=12 must be divisible by .* 8 x 1 x 1"),
    (config_with(dict(data=2, fsdp=2), batch=16, microbatches=8), 4, r"train\.batch_size=16 must be divisible"),
    (config_with(dict(data=4, dcn_data=3)), 4, r"mesh\.dcn_data=3 must be >= 1 and divide mesh\.data=4"),
])
def test_impossible_layouts_fail_before_compiling(config, devices, message):
    with pytest.raises(ConfigError, match=message):
        validate(config, devices)


def test_unknown_mesh_axis_in_rules():
    config = config_with(dict(data=1))
    config.sharding.params["mlp"] = "model"
    with pytest.raises(ConfigError, match=r"sharding\.params\.mlp='model': 'model' is not a mesh axis"):
        validate(config, 1)


@pytest.mark.parametrize("key", ["vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                 "d_ff"])
@pytest.mark.parametrize("value", [0, -2])
def test_non_positive_model_sizes_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"model\.{key}={value} must be >= 1"):
        load_config(None, [f"model.{key}={value}"])


def test_unset_kv_heads_and_d_ff_take_their_defaults():
    config = load_config(None, ["model.n_kv_heads=null", "model.d_ff=null"])
    assert config.model.n_kv_heads == config.model.n_heads == 4 and config.model.d_ff == 4 * 128


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=0", r"train\.batch_size=0 must be >= 1 \(sequences per step, a multiple of mesh\.data"),
    ("train.batch_size=-4", r"train\.batch_size=-4 must be >= 1"),
    ("train.steps=-1", r"train\.steps=-1 must be >= 1"),
    ("train.microbatches=0", r"train\.microbatches=0 must be >= 1"),
    ("train.log_every=0", r"train\.log_every=0 must be >= 1"),
    ("train.eval_every=-1", r"train\.eval_every=-1 must be >= 0 \(0 turns evaluation off\)"),
    ("train.eval_batches=0",
     r"train\.eval_batches=0 must be >= 1 while evaluation is on .*train\.eval_every=0 to turn it off"),
    ("train.param_dtype=float64", r"train\.param_dtype='float64'; choose float32, bfloat16 or float16$"),
    ("train.compute_dtype=int8", r"train\.compute_dtype='int8'; choose float32, bfloat16, float16 or auto$"),
])
def test_bad_train_values_name_the_key_and_a_valid_value(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, ["mesh.data=1", override]), 1)


def test_no_eval_batches_are_fine_without_evaluation():
    assert validate(load_config(None, ["mesh.data=1", "train.eval_every=0", "train.eval_batches=0"]), 1)
    assert validate(load_config(None, ["mesh.data=1", "train.param_dtype=float16",
                                       "train.compute_dtype=float16"]), 1)


def test_a_typo_in_a_rule_table_is_caught_once_the_model_is_built(caplog):
    """Rule tables take any logical name (a model of one's own has its own), so a typo is found against the
    model: refused in the parameter table, reported in the activation table (a constraint inside a user's
    model may use a name no parameter has)."""
    import logging

    import jax

    from jaxscale.training import build_trainer

    with pytest.raises(ConfigError, match=r"sharding\.params\.embd: no parameter .*did you mean sharding\.params\.embed\?"):
        build_trainer(load_config(None, ["sharding.params.embd=fsdp"]), jax.devices()[:1])
    with caplog.at_level(logging.WARNING, logger="jaxscale"):
        build_trainer(load_config(None, ["sharding.activations.bach=data"]), jax.devices()[:1])
    assert any("sharding.activations.bach: no parameter" in r.message and "sharding.activations.batch?" in r.message
               for r in caplog.records)


@pytest.mark.parametrize("override,message", [
    ("optimizer.learning_rate=-1", r"optimizer\.learning_rate=-1\.0 must be > 0$"),
    ("optimizer.learning_rate=0", r"optimizer\.learning_rate=0\.0 must be > 0$"),
    ("optimizer.learning_rate=nan", r"optimizer\.learning_rate=nan must be a finite number > 0$"),
    ("optimizer.learning_rate=1e999", r"optimizer\.learning_rate=inf must be a finite number > 0$"),
    ("optimizer.warmup_steps=-1", r"optimizer\.warmup_steps=-1 must be >= 0$"),
    ("optimizer.min_lr_ratio=1.5", r"optimizer\.min_lr_ratio=1\.5 must be in \[0, 1\] \(the final learning"),
    ("optimizer.b1=1", r"optimizer\.b1=1\.0 must be in \[0, 1\)$"),
    ("optimizer.b2=-0.1", r"optimizer\.b2=-0\.1 must be in \[0, 1\)$"),
    ("optimizer.eps=0", r"optimizer\.eps=0\.0 must be > 0 \(Adam divides"),
    ("optimizer.weight_decay=-0.1", r"optimizer\.weight_decay=-0\.1 must be >= 0$"),
    ("optimizer.grad_clip=-1", r"optimizer\.grad_clip=-1\.0 must be >= 0 \(0 turns clipping off\)$"),
    ("train.seed=-1", r"train\.seed=-1 must be in \[0, 4294967295\]$"),
    ("train.seed=4294967296", r"train\.seed=4294967296 must be in \[0, 4294967295\]$"),
    ("train.scan_unroll=0", r"train\.scan_unroll=0 must be >= 1 \(1: a rolled loop over layers\)$"),
    ("train.remat=some", r"train\.remat='some': choose none, dots, full, save:NAMES or offload:NAMES \(NAMES from "
     r"qkv, attention_out, mlp_hidden, comma-separated\)$"),
    ("model.rope_theta=0", r"model\.rope_theta=0\.0 must be > 0$"),
    ("model.norm_eps=-1e-5", r"model\.norm_eps=-1e-05 must be > 0$"),
    ("model.init_std=nan", r"model\.init_std=nan must be a finite number > 0$"),
    ("checkpoint.every_minutes=nan", r"checkpoint\.every_minutes=nan must be a finite number >= 0 \(0 turns"),
    ("checkpoint.keep_last=0", r"checkpoint\.keep_last=0 must be >= 1: the newest checkpoint"),
    ("guards.spike_factor=0.5", r"guards\.spike_factor=0\.5 must be > 1 \(e\.g\. 2\.0\), or 0 to turn"),
    ("guards.spike_factor=nan", r"guards\.spike_factor=nan must be a finite number > 1"),
    ("guards.spike_window=0", r"guards\.spike_window=0 must be >= 1$"),
    ("guards.max_rollbacks=0", r"guards\.max_rollbacks=0 must be >= 1$"),
    ("data.validation_fraction=nan", r"data\.validation_fraction=nan must be a finite number in \[0, 1\)$"),
    ("data.prefetch=-2", r"data\.prefetch=-2 must be >= 0 \(0: no background loading\)$"),
    ("model.init_from=1", r"model\.init_from=1: give hf:<directory> of a Hugging Face model"),  # hypothesis found it
])
def test_out_of_range_values_are_refused_at_load_naming_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_values_at_the_ends_of_their_ranges_load():
    config = load_config(None, ["optimizer.learning_rate=1e-9", "optimizer.b1=0", "optimizer.min_lr_ratio=1",
                                "optimizer.grad_clip=0", "optimizer.warmup_steps=0", "train.seed=4294967295",
                                "guards.spike_factor=0", "checkpoint.every_minutes=0",
                                "data.validation_fraction=0", "data.prefetch=0", "train.eval_every=0"])
    assert config.optimizer.learning_rate == 1e-9 and config.train.seed == 2**32 - 1


def test_an_experiment_or_mesh_file_that_is_not_utf8_is_named(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train:\n  steps: 10  # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text \(invalid continuation byte at byte "
                                          r"\d+\); save it as UTF-8$"):
        load_config(str(latin1))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text"):
        load_config(None, [f"mesh={latin1}"])
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"cannot read .*folder\.yaml: Is a directory"):
        load_config(str(tmp_path / "folder.yaml"))
