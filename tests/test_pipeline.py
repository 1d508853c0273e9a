"""Pipeline parallelism: layer stages over the `pipeline` mesh axis change where work runs, not the numbers.

Training runs are compared with a single device exactly as in test_equivalence.py, with its tolerances
(float32, 3 AdamW steps at learning rate 1e-3): losses and gradient norms within 1e-5 relative, parameters
within 1e-4 absolute. A pipeline only reorders floating-point sums (a weight's gradient is summed over
microbatches and iterations); measured over all cases here, slow ones included: losses and gradient norms
within 4e-7 relative, parameters within 1e-5. Parameters are compared leaf by leaf in their stored
(model-depth) order, so a pipeline run's parameters and checkpoints are the same model as a single device's.

Without a mesh the schedule runs all its stages on one device, which checks its arithmetic for several
stage / microbatch / repeat / remat combinations without compiling a training step: forward within 1e-5
absolute of a plain scan over the layers (measured: 2.4e-7), gradients within 1e-5 of each weight's largest
gradient (measured: 5.5e-7).
"""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same, batches, run
from helpers import make_config as equivalence_config

from jaxscale.config import Config, MeshConfig, TrainConfig, load_config, validate
from jaxscale.errors import ConfigError
from jaxscale.model import Model, ModelConfig
from jaxscale.model.transformer import layer
from jaxscale.parallel import (
    PipelineConfig,
    bubble_fraction,
    describe_plan,
    outer_rules,
    pipelined_layers,
    plan_from_config,
    plan_pipeline,
)
from jaxscale.parallel.pipeline import next_stage
from jaxscale.training import build_trainer

# ----------------------------------------------------------------------------------------------------------
# Which layers each stage runs


def test_chunks_cover_the_model_in_depth_order_and_stages_stay_balanced():
    for n_layers in range(1, 20):
        for stages, repeats in ((2, 1), (4, 1), (2, 2), (4, 2), (2, 3), (8, 1)):
            if n_layers < stages * repeats:
                continue
            plan = plan_pipeline(n_layers, stages, microbatches=stages, repeats=repeats)
            slots = plan.slot_layers()  # (repeats, stages, per chunk); chunk r * stages + s in depth order
            in_run_order = slots.reshape(-1)
            assert list(in_run_order[in_run_order >= 0]) == list(range(n_layers))
            assert plan.layers_per_chunk == -(-n_layers // (stages * repeats))
            per_stage = (slots >= 0).sum(axis=(0, 2))
            assert per_stage.max() - per_stage.min() <= 1, (n_layers, stages, repeats, per_stage)


def test_circular_stage_holds_every_stages_th_chunk():
    slots = plan_pipeline(8, stages=2, microbatches=2, repeats=2).slot_layers()
    assert slots[:, 0].tolist() == [[0, 1], [4, 5]]  # stage 0: chunks 0 and 2
    assert slots[:, 1].tolist() == [[2, 3], [6, 7]]  # stage 1: chunks 1 and 3


def test_bubble_fraction():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 4, repeats=2) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 16) == pytest.approx(3 / 19)
    assert bubble_fraction(1, 8) == 0
    assert plan_pipeline(8, 4, 8, 2).bubble == pytest.approx(bubble_fraction(4, 8, 2))


def test_describe_plan_shows_each_stages_layers_and_padding():
    table = describe_plan(plan_pipeline(5, stages=4, microbatches=8))
    assert "4 stages (gpipe), 8 microbatches, 11 iterations, bubble 27.3%" in table
    rows = [line.split() for line in table.splitlines()[2:]]
    assert rows == [["0", "2", "0", "0-1"], ["1", "1", "1", "2"], ["2", "1", "1", "3"], ["3", "1", "1", "4"]]
    table = describe_plan(plan_pipeline(8, stages=2, microbatches=4, repeats=2))
    assert table.splitlines()[2].split() == ["0", "4", "0", "0-1,", "4-5"]
    assert "2 stages (interleaved_1f1b, 2 repeats)" in describe_plan(plan_pipeline(8, 2, 4, 2), "interleaved_1f1b")
    assert "bubble 7.7%" in describe_plan(plan_pipeline(8, 2, 4), "zb1p")  # (p - 1) / (3 m + p - 1)


# ----------------------------------------------------------------------------------------------------------
# The schedule's arithmetic, all stages on one device


@functools.cache
def layer_stack(n_layers: int):
    """A tiny Llama's layer function and weights, an input batch packed from several documents, and the
    value and gradient of a test function of a plain scan over the layers."""
    cfg = ModelConfig.from_preset("tiny-llama", seq_len=16, n_layers=n_layers)
    stack = Model.build(cfg).init(jax.random.key(0))["blocks"]

    def apply_layer(x, p, segment_ids):
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        return layer(cfg, p, x, positions, segment_ids, jnp.float32)

    x = jax.random.normal(jax.random.key(1), (8, 16, cfg.d_model))
    segments = jnp.asarray(1 + np.cumsum(np.random.default_rng(0).random((8, 16)) < 0.2, axis=1), jnp.int32)
    plain = jax.jit(lambda s: jax.lax.scan(lambda x, p: (apply_layer(x, p, segments), None), x, s)[0])
    return apply_layer, stack, x, segments, plain(stack), value_and_grad(plain, stack)


def value_and_grad(forward, stack):
    return jax.jit(jax.value_and_grad(lambda s: jnp.sum(jnp.sin(forward(s)))))(stack)


SCHEDULES = [  # on 6 layers: layers, stages, microbatches, repeats, remat, iterations unrolled
    (6, 3, 4, 1, "none", False),
    (6, 4, 8, 1, "dots", False),  # padding: stages of 2, 2, 1, 1 layers
    (6, 2, 2, 2, "none", False),  # circular with padding, each microbatch straight back to stage 0
    (6, 2, 8, 2, "full", False),  # circular with padding; microbatches wait at stage 0 between repeats
    (6, 3, 4, 1, "none", True),

]
SLOW_SCHEDULES = [(6, 2, 8, 2, "none", True), (6, 2, 4, 3, "dots", False), (6, 3, 8, 1, "full", False), (6, 3, 4, 2, "dots", True)]


@pytest.mark.parametrize("n_layers,stages,microbatches,repeats,remat,unrolled",
                         SCHEDULES + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_SCHEDULES])
def test_schedule_matches_a_plain_scan(n_layers, stages, microbatches, repeats, remat, unrolled):
    apply_layer, stack, x, segments, expected_out, (expected_value, expected) = layer_stack(n_layers)
    plan = plan_pipeline(n_layers, stages, microbatches, repeats, unrolled)

    def pipelined(stack):
        return pipelined_layers(apply_layer, stack, x, segments, plan, remat)

    value, grads = value_and_grad(pipelined, stack)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(pipelined)(stack), expected_out, atol=1e-5)
    for name in expected:
        scale = float(jnp.max(jnp.abs(expected[name])))
        np.testing.assert_allclose(grads[name], expected[name], atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("stages,microbatches,repeats", [(2, 4, 1), (2, 2, 2)])  # 5 layers: padding slots
def test_schedule_carries_totals_beside_the_activations(stages, microbatches, repeats):
    """x as a pair (activations, totals): every microbatch starts from the given totals, each layer adds a
    mean over the microbatch's rows, and the schedule returns the microbatches' totals averaged, the whole
    batch's. The objective is nonlinear in the totals, so a sum or a single microbatch's would not match the
    plain scan's value and gradients."""
    keys = jax.random.split(jax.random.key(2), 2)
    stack = {"w": 0.5 * jax.random.normal(keys[0], (5, 8, 8))}
    x = jax.random.normal(keys[1], (8, 4, 8))
    start = (x, {"square": jnp.ones(()), "per_feature": jnp.zeros((8,))})

    def apply_layer(carry, p, _):
        x, totals = carry
        y = jnp.tanh(x @ p["w"])
        return y, {"square": totals["square"] + jnp.mean(y ** 2),
                   "per_feature": totals["per_feature"] + jnp.mean(y, axis=(0, 1))}

    def objective(layers):
        def f(stack):
            y, totals = layers(stack)
            return jnp.sum(jnp.sin(y)) + totals["square"] ** 2 + jnp.sum(totals["per_feature"] ** 2), totals

        return jax.jit(jax.value_and_grad(f, has_aux=True))(stack)

    plan = plan_pipeline(5, stages, microbatches, repeats)
    (value, totals), grads = objective(lambda s: pipelined_layers(apply_layer, s, start, None, plan))
    (want, want_totals), want_grads = objective(
        lambda s: jax.lax.scan(lambda carry, p: (apply_layer(carry, p, None), None), start, s)[0])
    np.testing.assert_allclose(value, want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), totals, want_totals)
    np.testing.assert_allclose(grads["w"], want_grads["w"], atol=1e-5 * float(jnp.max(jnp.abs(want_grads["w"]))))


def test_unrolled_schedule_compiles_without_loops():
    """pipeline.unroll writes the iterations out (with the chunk's layers unrolled too, no loop is left), so
    nothing is stacked per iteration; the looped schedule keeps its loop."""
    apply_layer, stack, x, segments, _, _ = layer_stack(6)

    def hlo(unrolled: bool) -> str:
        plan = plan_pipeline(6, 3, 4, 1, unrolled)
        return jax.jit(jax.grad(lambda s: jnp.sum(pipelined_layers(apply_layer, s, x, segments, plan, "none",
                                                                   unroll=2)))).lower(stack).as_text()

    assert "stablehlo.while" not in hlo(True)
    assert "stablehlo.while" in hlo(False)


# ----------------------------------------------------------------------------------------------------------
# Training on a pipeline mesh against a single device


def make_config(style: str, n_layers: int, mesh: dict, pipeline: PipelineConfig | None = None, *,
                remat: str = "none", microbatches: int = 1, replicate_layers: bool = False) -> Config:
    config = equivalence_config(style, mesh, microbatches)
    config.model = dataclasses.replace(config.model, n_layers=n_layers)
    config.train.remat = remat
    config.pipeline = pipeline or PipelineConfig()
    if replicate_layers:  # n_layers not divisible by the stages: every rank keeps the whole stack
        config.sharding.params["layers"] = None
    return config


def devices_for(mesh: dict) -> list:
    return jax.devices()[:int(np.prod(list(mesh.values())))]


_reference: dict = {}


def reference(style: str, n_layers: int):
    if (style, n_layers) not in _reference:
        _reference[style, n_layers] = run(make_config(style, n_layers, {}), jax.devices()[:1])
    return _reference[style, n_layers]


def circular(microbatches: int, repeats: int = 2) -> PipelineConfig:
    return PipelineConfig(schedule="circular", microbatches=microbatches, repeats=repeats)


# name: style, layers, mesh, pipeline settings, extra settings
CASES = {  # the default suite's; SLOW_CASES run with -m slow
    "data2-tensor2-p2-circular-uneven": ("llama", 6, dict(data=2, tensor=2, pipeline=2), circular(4), {}),
    "1f1b-p2": ("gpt2", 8, dict(pipeline=2), PipelineConfig(schedule="1f1b", microbatches=4), {}),
}
SLOW_CASES = {
    "gpipe-p8": ("gpt2", 8, dict(pipeline=8), None, {}),  # default settings: gpipe, one microbatch per stage
    "circular-p2-remat-dots-accumulation": ("gpt2", 8, dict(pipeline=2), circular(4),
                                            dict(remat="dots", microbatches=2)),
    "fsdp2-p4-remat-full": ("gpt2", 8, dict(fsdp=2, pipeline=4), PipelineConfig(microbatches=4),
                            dict(remat="full")),
    "circular-p2-unrolled": ("gpt2", 8, dict(pipeline=2),
                             PipelineConfig(schedule="circular", microbatches=4, unroll=True), {}),
    "uneven-6-layers-on-4-stages": ("llama", 6, dict(pipeline=4), PipelineConfig(microbatches=4),
                                    dict(replicate_layers=True)),
    "gpipe-p2": ("gpt2", 8, dict(pipeline=2), PipelineConfig(microbatches=4), {}),
    "gpipe-p2-llama": ("llama", 6, dict(pipeline=2), PipelineConfig(microbatches=4), dict(remat="dots")),
    "circular-p4": ("gpt2", 8, dict(pipeline=4), circular(8), {}),
    "circular-p8": ("gpt2", 16, dict(pipeline=8), circular(8), {}),
    "circular-p2-3-repeats": ("llama", 6, dict(pipeline=2), circular(4, repeats=3), {}),
    "uneven-5-layers-circular": ("gpt2", 5, dict(pipeline=2), circular(2), dict(replicate_layers=True)),
    "data2-p4-remat-dots": ("gpt2", 8, dict(data=2, pipeline=4), PipelineConfig(microbatches=4),
                            dict(remat="dots")),
    "fsdp2-tensor2-p2-circular-remat-full": ("llama", 6, dict(fsdp=2, tensor=2, pipeline=2), circular(4),
                                             dict(remat="full")),
    "data2-p4-gpipe-unrolled-accumulation": ("gpt2", 8, dict(data=2, pipeline=4),
                                             PipelineConfig(microbatches=4, unroll=True), dict(microbatches=2)),
    "interleaved-1f1b-p2": ("gpt2", 8, dict(pipeline=2),
                            PipelineConfig(schedule="interleaved_1f1b", microbatches=4), {}),
    "1f1b-data2-tensor2-p2-accumulation": ("llama", 6, dict(data=2, tensor=2, pipeline=2),
                                           PipelineConfig(schedule="1f1b", microbatches=4),
                                           dict(microbatches=2)),
    "1f1b-uneven-6-layers-on-4-stages": ("llama", 6, dict(pipeline=4),
                                         PipelineConfig(schedule="1f1b", microbatches=4),
                                         dict(replicate_layers=True)),
    "zb1p-p4": ("llama", 8, dict(pipeline=4), PipelineConfig(schedule="zb1p", microbatches=4), {}),
    "zb1p-data2-p2-accumulation": ("gpt2", 8, dict(data=2, pipeline=2), PipelineConfig(schedule="zb1p", microbatches=4),
                                   dict(microbatches=2)),
    "interleaved-1f1b-fsdp2-p2-3-repeats": ("llama", 6, dict(fsdp=2, pipeline=2),
                                            PipelineConfig(schedule="interleaved_1f1b", microbatches=4,
                                                           repeats=3), {}),
}


@pytest.mark.parametrize("name", list(CASES) + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW_CASES])
def test_pipeline_matches_single_device(name):
    style, n_layers, mesh, pipeline, extra = {**CASES, **SLOW_CASES}[name]
    config = make_config(style, n_layers, mesh, pipeline, **extra)
    assert_same(run(config, devices_for(mesh)), reference(style, n_layers))


def test_1f1b_evaluation_runs_the_layers_forward_only_and_gives_the_loss():
    """Without a gradient (the eval step) the 1F1B loss runs the layers as GPipe does: the same loss as one
    device."""
    config = make_config("gpt2", 8, dict(pipeline=2), PipelineConfig(schedule="1f1b", microbatches=4))
    single = build_trainer(make_config("gpt2", 8, {}), jax.devices()[:1])
    trainer = build_trainer(config, devices_for(dict(pipeline=2)))
    batch = batches(config)[0]
    want = single.eval_step(single.init_state().params, jax.device_put(batch, single.data_sharding))["loss"]
    got = trainer.eval_step(trainer.init_state().params, jax.device_put(batch, trainer.data_sharding))["loss"]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def compiled_train_step(config: Config, mesh: dict):
    """The trainer on the devices `mesh` needs, its initial state, the test batches placed for it, and the
    train step compiled for them."""
    trainer = build_trainer(config, devices_for(mesh))
    state = trainer.init_state()
    steps = [jax.device_put(b, trainer.data_sharding) for b in batches(config)]
    return trainer, state, steps, trainer.train_step.lower(state, steps[0]).compile()


def test_four_stages_hold_their_layers_pass_activations_by_collective_permute_and_match_one_device():
    """GPipe, pipeline=4: each device keeps only its stage's layers; only activations pass between stages."""
    config = make_config("gpt2", 8, dict(pipeline=4), PipelineConfig(microbatches=8))
    trainer, state, steps, train_step = compiled_train_step(config, dict(pipeline=4))
    for name, weights in state.params["blocks"].items():
        for shard in weights.addressable_shards:
            stage = int(np.argwhere(trainer.mesh.devices == shard.device)[0][1])  # mesh axis 1 is `pipeline`
            assert shard.data.shape == (8 // 4, *weights.shape[1:]), name
            assert shard.index[0] == slice(2 * stage, 2 * stage + 2), (name, shard.device)

    hlo = train_step.as_text()
    assert re.search(r"collective-permute(-start)?\(", hlo), "no collective-permute between stages"
    # The only gathers are of activations (rows of length x embed), moving the batch between the
    # embedding/head, which are split over the pipeline ranks, and stage 0. GPipe never gathers layer weights.
    gathered = re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", hlo)
    assert all(shape.endswith(f",{config.model.seq_len},{config.model.d_model}") for shape in gathered), gathered

    losses = []
    for batch in steps:
        state, metrics = train_step(state, batch)
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    assert_same((losses, jax.device_get(state.params)), reference("gpt2", 8))


@pytest.mark.slow  # over 15 s; the default suite stays near 15 minutes
def test_each_schedule_iteration_passes_activations_once_forward_and_once_backward():
    """Unrolled, pipeline=4: one collective-permute of the activation buffer per iteration in the forward pass
    and one in the backward pass. (Autodiff's transpose of jnp.roll made two of the backward one here, four on
    GPU.)"""
    config = make_config("gpt2", 8, dict(pipeline=4),
                         PipelineConfig(schedule="circular", microbatches=8, unroll=True))
    hlo = compiled_train_step(config, dict(pipeline=4))[-1].as_text()
    rows = config.train.batch_size // config.pipeline.microbatches
    buffer = f"[1,{rows},{config.model.seq_len},{config.model.d_model}]"
    permutes = re.findall(r"= \w+(\[[\d,]*\])\S* collective-permute(?:-start)?\(", hlo)
    iterations = plan_from_config(config.pipeline, config.model.n_layers, stages=4).iterations
    assert permutes.count(buffer) == 2 * iterations, (permutes.count(buffer), iterations)


def test_the_stage_shift_and_its_gradient_are_rolls():
    x = jnp.arange(24.0).reshape(4, 3, 2)
    np.testing.assert_array_equal(next_stage(x), jnp.roll(x, 1, axis=0))
    weights = jnp.linspace(-1.0, 1.0, 24).reshape(4, 3, 2)
    grad = jax.grad(lambda x: jnp.sum(next_stage(x) * weights))(x)
    np.testing.assert_array_equal(grad, jnp.roll(weights, -1, axis=0))


def test_work_outside_the_stages_is_split_over_the_pipeline_ranks():
    """The embedding, head and loss take the pipeline ranks as extra batch shards where the rows divide."""
    from jaxscale.mesh import build_mesh

    mesh = build_mesh(MeshConfig(data=2, pipeline=4), jax.devices()[:8])
    rules = {"batch": ["data", "fsdp"], "embed": None}
    assert outer_rules(rules, mesh, rows=8)["batch"] == ["data", "fsdp", "pipeline"]
    assert outer_rules(rules, mesh, rows=6) is rules  # 6 rows per batch shard do not split 4 ways
    assert outer_rules({"batch": "data"}, mesh, rows=8)["batch"] == ["data", "pipeline"]
    listed = {"batch": ["pipeline", "data"]}
    assert outer_rules(listed, mesh, rows=8) is listed  # the user's own order is kept
    flat = build_mesh(MeshConfig(data=8), jax.devices()[:8])
    assert outer_rules(rules, flat, rows=8) is rules


def test_run_layers_on_a_pipeline_mesh_needs_the_settings_and_notes_each_plan():
    """The schedule reaches run_layers as an argument only; each plan it makes is noted for the trainer's check
    that the model staged something."""
    from jaxscale.mesh import build_mesh
    from jaxscale.parallel import run_layers
    from jaxscale.sharding import activation_rules
    from jaxscale.trace_notes import recording

    mesh = build_mesh(MeshConfig(data=1, pipeline=2), jax.devices()[:2])
    stack, x = {"w": jnp.ones((4, 3, 3))}, jnp.ones((4, 3))

    def forward(settings):
        return run_layers(lambda x, layer, _: x @ layer["w"], stack, x, settings=settings)

    with activation_rules(mesh, {"layers": "pipeline"}), recording("pipeline") as planned:
        with pytest.raises(ConfigError, match=r"mesh\.pipeline=2, but run_layers got no pipeline settings.*"
                                              r"pass settings=config\.pipeline"):
            jax.eval_shape(lambda: forward(None))
        assert planned == []
        with recording("pipeline") as nested:  # blocks nest: both get the note
            jax.eval_shape(lambda: forward(PipelineConfig(schedule="circular", microbatches=2)))
    assert planned == nested == ["circular"]
    with recording("pipeline") as unstaged:  # no mesh: a scan, nothing to stage
        np.testing.assert_allclose(forward(None), x @ stack["w"][0] @ stack["w"][1] @ stack["w"][2] @ stack["w"][3])
    assert unstaged == []


@pytest.mark.slow
def test_batch_over_the_pipeline_axis_outside_the_stages():
    """A batch rule that lists `pipeline` itself, in an order of the user's, gives the same result."""
    config = make_config("gpt2", 8, dict(pipeline=4), PipelineConfig(microbatches=4))
    config.sharding.activations["batch"] = ["data", "pipeline", "fsdp"]
    assert_same(run(config, devices_for(dict(pipeline=4))), reference("gpt2", 8))


# ----------------------------------------------------------------------------------------------------------
# Bad pipeline settings fail before compiling


@pytest.mark.parametrize("setup,message", [
    (dict(microbatches=2), r"pipeline\.microbatches=2 is fewer than the 4 pipeline stages"),
    (dict(microbatches=6), r"microbatches=6 must divide the 16 rows .*microbatches=4 or 8 or 16 would work"),
    (dict(batch=6, data=2), r"pipeline\.microbatches=4 must divide the 3 rows .*try train\.batch_size=8"),
    (dict(n_layers=3), r"model\.n_layers=3 is fewer than mesh\.pipeline x repeats = 4 x 1 = 4 layer chunks"),
    (dict(n_layers=6, schedule="circular", microbatches=4),
     r"model\.n_layers=6 is fewer than .* = 8 layer chunks; use fewer stages or fewer pipeline\.repeats"),
    (dict(n_layers=6), r"model\.n_layers=6 does not split evenly over mesh\.pipeline=4.*sharding\.params\."),
    (dict(schedule="interleaved_1f1b", microbatches=6, batch=24),
     r"pipeline\.microbatches=6 with the interleaved 1F1B schedule must be a multiple of the 4 .*"
     r"pipeline\.microbatches=8"),
])
def test_bad_pipeline_settings_name_the_keys(setup, message):
    settings = dict(setup)
    n_layers, batch, data = settings.pop("n_layers", 8), settings.pop("batch", 16), settings.pop("data", 1)
    model = ModelConfig.from_preset("tiny", n_layers=n_layers)
    config = Config(model=model, mesh=MeshConfig(data=data, pipeline=4), train=TrainConfig(batch_size=batch),
                    pipeline=PipelineConfig(**settings))
    with pytest.raises(ConfigError, match=message):
        validate(config, 4 * data)


@pytest.mark.parametrize("override,message", [
    ("pipeline.schedule=zero_bubble", r"pipeline\.schedule='zero_bubble'; choose one of gpipe, circular, 1f1b, "
                                      r"interleaved_1f1b"),
    ("pipeline.repeats=1", r"pipeline\.repeats=1 with pipeline\.schedule=circular: it needs repeats >= 2 "
                           r"\(one repeat is gpipe\)"),
    ("pipeline.microbatches=0", r"pipeline\.microbatches=0 must be >= 1"),
])
def test_bad_pipeline_values_fail_when_loaded(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override] + (["pipeline.schedule=circular"] if "repeats" in override else []))


def test_pipeline_settings_load_from_overrides():
    config = load_config(None, ["mesh.pipeline=2", "mesh.data=1", "pipeline.schedule=circular",
                                "pipeline.microbatches=8", "pipeline.repeats=2"])
    assert config.pipeline == PipelineConfig(schedule="circular", microbatches=8, repeats=2)
    assert validate(config, 2)["pipeline"] == 2
