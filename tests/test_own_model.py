"""Bring your own Flax model: NNX and Linen modules with Flax's own sharding annotations, the user's loss and
data, through the same sharded step as the built-in decoder.

Equivalence tolerances are those of test_equivalence (float32, 3 AdamW steps at 1e-3): losses within 1e-5
relative, parameters within 1e-4 absolute.
"""
import json
import logging

import jax
import numpy as np
import pytest
from own_models import (
    RULES,
    Blobs,
    LinenNet,
    NNXNet,
    StackedNet,
    batches,
    classification_loss,
    staged_classification_loss,
)

import jaxscale
from jaxscale.config import load_config
from jaxscale.errors import ConfigError
from jaxscale.model import nnx_model
from jaxscale.training import build_trainer
from jaxscale.training.language_model import lm_batch_spec
from jaxscale.training.optimizer import weight_decay_mask
from jaxscale.training.step import model_flops

STEPS, BATCH = 3, 16
MODELS = {"nnx": lambda: (lambda rngs: NNXNet(rngs)), "linen": LinenNet}
MESHES = {"data=8": ["mesh.data=8"], "fsdp=8": ["mesh.data=1", "mesh.fsdp=8"],
          "tensor=8": ["mesh.data=1", "mesh.tensor=8"],
          "2x2x2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}


def config(*extra: str):
    return load_config(None, ["optimizer.learning_rate=1e-3", "optimizer.warmup_steps=0", f"train.steps={STEPS}",
                              f"train.batch_size={BATCH}", "train.compute_dtype=float32", *RULES, *extra])


def trainer_for(kind: str, mesh: list[str], devices: int):
    data = batches(STEPS, BATCH)
    return build_trainer(config(*mesh), jax.devices()[:devices], model=MODELS[kind](),
                         loss_fn=classification_loss, example_batch=data[0]), data


def run(kind: str, mesh: list[str], devices: int):
    trainer, data = trainer_for(kind, mesh, devices)
    state, losses = trainer.init_state(), []
    for batch in data:
        state, metrics = trainer.train_step(state, jax.device_put(batch, trainer.data_sharding))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("mesh", MESHES)
def test_user_models_train_the_same_on_every_layout(kind, mesh):
    ref_losses, ref_params = run(kind, ["mesh.data=1"], 1)
    losses, params = run(kind, MESHES[mesh], 8)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, ref_params)


@pytest.mark.parametrize("kind", MODELS)
def test_parameters_are_sharded_as_their_flax_annotations_say(kind):
    trainer, _ = trainer_for(kind, MESHES["2x2x2"], 8)
    params = trainer.init_state().params
    kernel = params["w_in"]["kernel"] if kind == "nnx" else params["Dense_0"]["kernel"]
    # (features=16 over fsdp=2, hidden=32 over tensor=2) -> each device holds 8 x 16
    assert kernel.shape == (16, 32)
    assert {s.data.shape for s in kernel.addressable_shards} == {(8, 16)}
    out = params["w_out"]["kernel"] if kind == "nnx" else params["Dense_1"]["kernel"]
    assert {s.data.shape for s in out.addressable_shards} == {(16, 8)}  # hidden over tensor, classes whole


def test_a_flax_activation_constraint_reaches_the_compiled_program():
    trainer, data = trainer_for("linen", ["mesh.data=1", "mesh.tensor=8"], 8)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.data_sharding) for k, v in data[0].items()}
    text = trainer.train_step.lower(trainer.abstract_state(), abstract).as_text()
    # nn.with_logical_constraint(h, ("batch", "hidden")) with hidden -> tensor: the (16, 32) activation pinned
    assert any("sharding_constraint" in line and '{"tensor"}' in line and "16x32" in line for line in text.splitlines())


def test_a_logical_name_without_a_rule_is_named_with_the_key_to_add():
    cfg = load_config(None, ["sharding.params.features=fsdp", "sharding.params.classes=null"])
    with pytest.raises(ConfigError, match=r"parameter w_in/bias dimension 0 is named 'hidden', which has no rule in sharding.params; "
                                          r"add one, e.g. --set sharding.params.hidden=null"):
        build_trainer(cfg, jax.devices()[:1], model=lambda rngs: NNXNet(rngs), loss_fn=classification_loss)


def test_a_rule_no_parameter_uses_is_refused_with_a_close_match():
    cfg = config("sharding.params.hiden=tensor")
    with pytest.raises(ConfigError, match=r"sharding.params.hiden: no parameter.*did you mean sharding.params.hidden"):
        build_trainer(cfg, jax.devices()[:1], model=lambda rngs: NNXNet(rngs), loss_fn=classification_loss)


def test_unannotated_parameters_are_replicated_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="jaxscale"):
        trainer, _ = trainer_for("nnx", MESHES["2x2x2"], 8)
    warnings = [r.message for r in caplog.records if "carry no partitioning names" in r.message]
    assert len(warnings) == 1 and "2 parameters" in warnings[0] and "scale, w_out/bias." in warnings[0]
    scale = trainer.init_state().params["scale"]
    assert all(s.data.shape == (32,) for s in scale.addressable_shards)


def test_decay_mask_follows_rank_and_metadata_not_names():
    model = nnx_model(lambda rngs: NNXNet(rngs), classification_loss)
    mask = weight_decay_mask(model, no_decay=[])
    assert mask["w_in"]["kernel"] and mask["w_out"]["kernel"]
    assert not mask["w_in"]["bias"] and not mask["scale"]
    assert not weight_decay_mask(model, no_decay=["w_out/*"])["w_out"]["kernel"]
    builtin = jaxscale.model.Model.build(jaxscale.model.ModelConfig.from_preset("tiny")).flax
    mask = weight_decay_mask(builtin, no_decay=[])
    assert not mask["embed"] and not mask["positions"]  # tagged weight_decay=False by the model
    assert mask["blocks"]["wqkv"] and not mask["blocks"]["attn_norm"]  # (layers, d) is a stacked vector


def test_train_with_user_model_loss_and_data_writes_its_metrics(tmp_path):
    cfg = config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=30", "train.log_every=10",
                 "train.eval_every=30", "train.eval_batches=2", "optimizer.learning_rate=1e-2",
                 f"run_dir={tmp_path}", "train.progress=false")
    result = jaxscale.train(cfg, model=lambda rngs: NNXNet(rngs, dropout=0.1), loss_fn=classification_loss,
                            data=Blobs(512), eval_data=Blobs(64, seed=5))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    assert [r["step"] for r in trained] == [1, 10, 20, 30]
    assert all("accuracy" in r for r in trained) and trained[-1]["accuracy"] > 0.5
    assert trained[-1]["tokens"] == 30 * BATCH  # examples, for a batch without tokens
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 1 and evals[0]["eval_accuracy"] > 0.5
    logits = result.trained_model()(Blobs(64, seed=5).x)
    assert logits.shape == (64, 8)


def builtin_flops(mesh: list[str], devices: int, scan_unroll: int):
    cfg = load_config(None, ["train.batch_size=16", f"train.scan_unroll={scan_unroll}", *mesh])
    trainer = build_trainer(cfg, jax.devices()[:devices])
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.data_sharding)
             for k, v in lm_batch_spec(cfg).items()}
    flops, loops = model_flops(trainer.model, cfg, trainer.mesh, trainer.shardings, batch,
                               trainer.plan.per_device_batch)
    return flops / (cfg.model.flops_per_token() * cfg.train.batch_size * cfg.model.seq_len), loops


@pytest.mark.parametrize("mesh", [["mesh.data=1"], MESHES["2x2x2"]])
def test_xla_flops_count_matches_the_analytic_count_of_the_builtin_decoder(mesh):
    """6N + 12 L d T counts matmuls only; XLA also counts the elementwise work (norms, GELU, softmax, the
    cross entropy over the vocabulary): 5.1% more on one device for this tiny model. On a mesh each tensor rank
    repeats the elementwise work on activations it holds whole: 8.2% more on 2 x 2 x 2. With the layers in a
    loop XLA counts the loop's body once, and `model_flops` says the program loops (MFU then warns)."""
    devices = 1 if mesh == ["mesh.data=1"] else 8
    ratio, loops = builtin_flops(mesh, devices, scan_unroll=4)  # the default model's 4 layers, unrolled
    assert 1.0 < ratio < 1.12 and not loops
    ratio, loops = builtin_flops(mesh, devices, scan_unroll=1)
    assert ratio < 0.5 and loops


def test_a_config_can_add_a_mesh_axis_for_its_own_rules():
    mesh = ["mesh.data=2", "mesh.axes.mixer=4", "sharding.params.hidden=mixer",
            "sharding.activations.hidden=mixer"]
    trainer, _ = trainer_for("nnx", mesh, 8)
    assert dict(trainer.mesh.shape) == {"data": 2, "pipeline": 1, "fsdp": 1, "expert": 1, "context": 1, "mixer": 4,
                                        "tensor": 1}
    kernel = trainer.init_state().params["w_in"]["kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 8)}  # hidden=32 over mixer=4
    losses, params = run("nnx", mesh, 8)
    ref_losses, ref_params = run("nnx", ["mesh.data=1"], 1)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, ref_params)


@pytest.mark.parametrize("bad, message", [
    ("mesh.axes.fsdp=2", r"mesh.axes.fsdp: an added axis needs a name of its own"),
    ("sharding.params.hidden=mixer", r"'mixer' is not a mesh axis; .*or add it: mesh.axes.mixer=SIZE"),
])
def test_bad_added_axes_are_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        build_trainer(config(bad), jax.devices()[:1], model=lambda rngs: NNXNet(rngs), loss_fn=classification_loss)


STACKED_RULES = ["sharding.params.hidden_in=null", "sharding.params.layers=pipeline"]


@pytest.mark.parametrize("schedule", [["pipeline.schedule=gpipe"],
                                      ["pipeline.schedule=circular", "pipeline.repeats=2"],
                                      ["pipeline.schedule=1f1b"],
                                      pytest.param(["pipeline.schedule=interleaved_1f1b", "pipeline.repeats=2"],
                                                   marks=pytest.mark.slow),
                                      pytest.param(["pipeline.schedule=zb1p"], marks=pytest.mark.slow)])
def test_a_user_model_with_stacked_blocks_is_staged_by_the_pipeline(schedule):
    """GPipe and circular with the model's own loss on its output; 1F1B and zb1p with its loss in
    run_layers_and_loss."""
    loss_fn = staged_classification_loss if schedule[0].endswith(("1f1b", "zb1p")) else classification_loss

    def losses_and_params(mesh, devices):
        data = batches(STEPS, BATCH)
        run_config = config(*mesh, *STACKED_RULES, *schedule)
        trainer = build_trainer(run_config, jax.devices()[:devices],
                                model=lambda rngs: StackedNet(rngs, run_config.pipeline), loss_fn=loss_fn)
        state, losses = trainer.init_state(), []
        for batch in data:
            state, metrics = trainer.train_step(state, jax.device_put(batch, trainer.data_sharding))
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state.params), trainer

    ref_losses, ref_params, _ = losses_and_params(["mesh.data=1"], 1)
    losses, params, trainer = losses_and_params(["mesh.data=2", "mesh.pipeline=2", "mesh.tensor=2",
                                                 "pipeline.microbatches=4"], 8)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, ref_params)
    stacked = trainer.init_state().params["blocks"]["lin"]["kernel"]  # (layers=4, 32, 32), layers over stages
    assert {s.data.shape for s in stacked.addressable_shards} == {(2, 32, 16)}


def test_a_user_model_that_does_not_run_its_layers_through_run_layers_is_refused_on_a_pipeline_mesh():
    run_config = config("mesh.data=4", "mesh.pipeline=2", *STACKED_RULES)
    trainer = build_trainer(run_config, jax.devices(), model=lambda rngs: StackedNet(rngs, run_config.pipeline,
                                                                                     staged=False),
                            loss_fn=classification_loss)
    batch = jax.device_put(batches(1, BATCH)[0], trainer.data_sharding)
    with pytest.raises(ConfigError, match=r"never ran its layers through jaxscale.parallel.run_layers"):
        trainer.train_step(trainer.init_state(), batch)


def test_a_user_model_whose_loss_is_outside_run_layers_is_refused_by_1f1b():
    run_config = config("mesh.data=4", "mesh.pipeline=2", "pipeline.schedule=1f1b", *STACKED_RULES)
    trainer = build_trainer(run_config, jax.devices(), model=lambda rngs: StackedNet(rngs, run_config.pipeline),
                            loss_fn=classification_loss)
    batch = jax.device_put(batches(1, BATCH)[0], trainer.data_sharding)
    with pytest.raises(ConfigError, match=r"pipeline\.schedule=1f1b runs each microbatch's loss inside the "
                                          r"schedule.*jaxscale\.parallel\.run_layers_and_loss"):
        trainer.train_step(trainer.init_state(), batch)


def test_trainer_save_and_restore_for_a_loop_of_ones_own(tmp_path):
    trainer, data = trainer_for("nnx", [f"run_dir={tmp_path}"], 1)
    state = trainer.init_state()
    state, _ = trainer.train_step(state, jax.device_put(data[0], trainer.data_sharding))
    trainer.save(state)
    trainer.wait()
    restored = trainer.restore()
    assert restored.metadata.step == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), jax.device_get(state))
    trainer.close()


def test_random_bits_loops_do_not_count_as_a_looping_model():
    """Dropout's random bits come from loops over integers; only loops over floating-point work are reported."""
    trainer, data = trainer_for("nnx", ["mesh.data=1"], 1)
    model = nnx_model(lambda rngs: NNXNet(rngs, dropout=0.5), classification_loss)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.data_sharding) for k, v in data[0].items()}
    flops, loops = model_flops(model, trainer.config, trainer.mesh, trainer.shardings, batch, 1)
    assert flops > 0 and not loops
