"""Fitting big models: the compiled step's memory checked before anything is allocated (a limit forced low with
train.memory_limit_gb, since a CPU has none), the optimizer state in host memory, and `jaxscale plan`."""
import dataclasses

import jax
import numpy as np
import pytest
from helpers import assert_same, make_config, reference, run

import jaxscale
from jaxscale.cli import main
from jaxscale.config import load_config
from jaxscale.planner.candidates import apply, candidates, of_config
from jaxscale.planner.estimate import estimate
from jaxscale.planner.plan import rank
from jaxscale.planner.rates import find_kind, rates_for
from jaxscale.training import build_trainer
from jaxscale.training.language_model import lm_batch_spec
from jaxscale.training.memory_check import DoesNotFit

QUIET = ["train.progress=false", "train.eval_every=0", "train.log_every=1"]


def test_a_step_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", *[a for s in [f"run_dir={run_dir}", "train.memory_limit_gb=0.01", "train.steps=2",
                                        *QUIET] for a in ("--set", s)]])
    error = capsys.readouterr().err
    assert code == 2
    assert "default does not fit: the compiled step needs" in error and "more than the 10.0 MB available " \
           "(train.memory_limit_gb). Nothing was allocated" in error, error
    suggestions = [line.strip() for line in error.splitlines() if line.startswith("  --set")]
    assert len(suggestions) == 3 and all("predicted" in s for s in suggestions), error
    assert not run_dir.exists()  # no lock, no config, no checkpoint


@pytest.mark.slow  # 1-2 minutes on the shared 2-core CPU machine
def test_the_nearest_plan_it_suggests_trains_under_the_limit(tmp_path):
    config = load_config("default", [f"run_dir={tmp_path}", "train.memory_limit_gb=0.01", *QUIET])
    with pytest.raises(DoesNotFit) as refused:
        jaxscale.train(config)
    first = next(line for line in str(refused.value).splitlines() if line.startswith("  --set"))
    flags = first.split("(predicted")[0].replace("--set", "").split()
    config = load_config("default", [f"run_dir={tmp_path}", "train.memory_limit_gb=0.01", "train.steps=2",
                                     *QUIET, *flags])
    assert [row["step"] for row in jaxscale.train(config).metrics] == [1, 2]


def offloaded(layout: dict, **train):
    config = make_config("gpt2", layout)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **{"offload_optimizer": True,
                                                                                  **train}))


def test_offload_places_the_moments_in_host_memory_and_the_rest_on_the_devices():
    trainer = build_trainer(offloaded(dict(data=2, fsdp=2, tensor=2)), jax.devices())
    opt = trainer.shardings.opt_state
    moments = [s for s, a in zip(jax.tree.leaves(opt), jax.tree.leaves(trainer.abstract_state().opt_state))
               if a.ndim]
    assert moments and {s.memory_kind for s in moments} == {"pinned_host"}
    assert {s.memory_kind for s in jax.tree.leaves(opt)} == {"pinned_host", "device"}  # step counts: device
    assert {s.memory_kind for s in jax.tree.leaves(trainer.shardings.params)} == {"device"}
    # each moment sharded like its parameter
    assert [s.spec for s in moments[:len(moments) // 2]] == [s.spec for s in jax.tree.leaves(trainer.shardings.params)]


def test_offloaded_master_parameters_are_in_host_memory_sharded_as_on_the_devices():
    on_devices = build_trainer(offloaded(dict(data=2, fsdp=2, tensor=2)), jax.devices()).shardings.params
    trainer = build_trainer(offloaded(dict(data=2, fsdp=2, tensor=2), offload_params=True), jax.devices())
    params = jax.tree.leaves(trainer.shardings.params)
    assert {s.memory_kind for s in params} == {"pinned_host"}
    assert [s.spec for s in params] == [s.spec for s in jax.tree.leaves(on_devices)]
    state = trainer.init_state()
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.params)} == {"pinned_host"}
    # the compiled step gives them back in host memory
    compiled = trainer.train_step.lower(state, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.data_sharding),
        lm_batch_spec(trainer.config))).compile()
    assert {s.memory_kind for s in jax.tree.leaves(compiled.output_shardings[0].params)} == {"pinned_host"}


@pytest.mark.slow  # 1-1.5 minutes a layout
@pytest.mark.parametrize("layout", [{}, dict(data=2, fsdp=2, tensor=2)])
def test_optimizer_state_in_host_memory_trains_as_on_the_device(layout):
    config = offloaded(layout)
    n = int(np.prod(list(layout.values()) or [1]))
    losses, params = run(config, jax.devices()[:n])
    ref_losses, ref_params = reference("gpt2")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, ref_params)


@pytest.mark.slow  # 20-30 s a layout
@pytest.mark.parametrize("layout, train", [({}, dict(offload_optimizer=False, offload_params=True)),
                                           (dict(data=2, fsdp=2, tensor=2), dict(offload_params=True))])
def test_master_parameters_in_host_memory_train_as_on_the_device(layout, train):
    n = int(np.prod(list(layout.values()) or [1]))
    assert_same(run(offloaded(layout, **train), jax.devices()[:n]), reference("gpt2"))


@pytest.mark.slow  # about 40 s
def test_the_offloaded_parameters_compute_copy_is_the_compute_dtype_cast_of_grad_reduce_dtype_compute():
    """In bfloat16 the forward and backward pass read the parameters cast once, as grad_reduce_dtype=compute
    casts them: the same numbers."""
    def bf16(**train):
        config = make_config("gpt2", {})
        return dataclasses.replace(config, train=dataclasses.replace(config.train, compute_dtype="bfloat16",
                                                                     **train))

    assert_same(run(bf16(offload_params=True, offload_optimizer=True), jax.devices()[:1]),
                run(bf16(grad_reduce_dtype="compute"), jax.devices()[:1]))


@pytest.mark.slow  # 1-2 minutes each
@pytest.mark.parametrize("offload", [["train.offload_optimizer=true"],
                                     ["train.offload_optimizer=true", "train.offload_params=true"]])
def test_offloaded_state_is_saved_and_restored_in_host_memory(tmp_path, offload):
    config = load_config("default", [f"run_dir={tmp_path}", "train.steps=2", *offload, "mesh.data=2",
                                     "mesh.fsdp=4", *QUIET])
    first = jaxscale.train(config)
    trainer = build_trainer(config)
    restored = trainer.restore()
    assert restored.metadata.step == 2
    moments = [x for x in jax.tree.leaves(restored.state.opt_state) if x.ndim]
    assert moments and {x.sharding.memory_kind for x in moments} == {"pinned_host"}
    params = {x.sharding.memory_kind for x in jax.tree.leaves(restored.state.params)}
    assert params == {"pinned_host" if config.train.offload_params else "device"}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(restored.state),
                 jax.device_get(first.state))
    trainer.close()


def llama_8b(seq_len=2048, batch=8, *more):
    return load_config("default", ["model.preset=llama-8b", f"model.seq_len={seq_len}",
                                   f"train.batch_size={batch}", *more])


def test_analytic_memory_orders_the_remat_policies_and_offload():
    config = llama_8b()
    rates = rates_for("h200")
    layout = {c.remat: c for c in candidates(config, 1) if c.microbatches == 1 and not c.offload_optimizer}
    memory = {remat: estimate(config, c, rates).device_bytes for remat, c in layout.items()}
    # offload keeps on the device what full keeps; the named values go to the host
    assert memory["offload:qkv,attention_out,mlp_hidden"] == memory["full"] < memory["save:attention_out"] \
        < memory["save:qkv,attention_out,mlp_hidden"] < memory["none"], memory
    on_host = estimate(config, dataclasses.replace(layout["full"], offload_optimizer=True), rates)
    assert on_host.device_bytes < memory["full"] and on_host.host_bytes > 0 and on_host.host_s > 0
    both = estimate(config, dataclasses.replace(layout["full"], offload_optimizer=True, offload_params=True), rates)
    # the device keeps a bf16 copy (2 bytes a parameter) of the float32 master parameters (4), moved three times
    params = config.model.total_params()
    m = config.model
    largest = m.n_layers * m.d_model * m.d_ff  # the stacked MLP weights: the largest of the 8b shape's arrays
    assert on_host.device_bytes - both.device_bytes == pytest.approx(2 * params - 4 * largest)
    assert both.host_bytes - on_host.host_bytes == 4 * params
    assert both.host_s - on_host.host_s == pytest.approx(3 * 4 * params / rates.host_bytes_per_s)


def test_the_8b_shape_fits_one_h200_only_with_the_optimizer_state_offloaded():
    ranked = rank(llama_8b(), 1, rates_for("H200"))
    top = ranked[0]
    assert top.fits and top.estimate.candidate.offload_optimizer
    assert not any(r.fits for r in ranked if not r.estimate.candidate.offload_optimizer)
    assert top.estimate.device_bytes <= find_kind("h200").hbm_bytes


def test_a_12b_llama_fits_one_h200_only_with_the_master_parameters_offloaded():
    ranked = rank(llama_8b(2048, 8, "model.n_layers=52"), 1, rates_for("h200"))
    assert ranked[0].fits and ranked[0].estimate.candidate.offload_params
    assert not any(r.fits for r in ranked if not r.estimate.candidate.offload_params)
    assert ranked[0].estimate.candidate.flags().endswith("--set train.offload_params=true")


def plan_table(capsys, check: int) -> list[str]:
    assert main(["plan", "default", "--devices", "8", "--device-kind", "cpu", "--check", str(check),
                 "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("8 x cpu: step time at a float32 matmul measured on this CPU"), out
    rows = [line for line in out if line.lstrip().startswith(("1 ", "2 ", "3 "))]
    assert len(rows) == 3 and all("--set mesh.data=" in row and " MB " in row for row in rows), out
    return rows


def test_plan_prints_its_table(capsys):
    assert all(" - " in row for row in plan_table(capsys, check=0))  # nothing compiled


@pytest.mark.slow  # about 3 minutes
def test_plan_compiles_its_top_choice_and_plan_auto_trains_it(tmp_path, capsys):
    rows = plan_table(capsys, check=1)
    assert rows[0].count(" MB ") == 2 and " - " in rows[1]  # estimated and compiled memory of the first only
    config = load_config("default", [f"run_dir={tmp_path}", "plan=auto", "train.steps=2", *QUIET])
    result = jaxscale.train(config)
    assert [row["step"] for row in result.metrics] == [1, 2]
    chosen = of_config(result.config, result.config.mesh.sizes())  # the layout was set: no -1 left to fill
    assert chosen in candidates(config, 8)


def test_a_plan_flag_other_than_auto_and_an_unknown_kind_are_refused():
    with pytest.raises(jaxscale.ConfigError, match=r"plan='best'; use plan=auto"):
        load_config("default", ["plan=best"])
    with pytest.raises(jaxscale.ConfigError, match=r"--device-kind z9: not in the hardware catalog; known: .*h200"):
        find_kind("z9")


def test_the_check_logs_the_bytes_where_there_is_no_limit_and_advises_where_there_is_no_planner(caplog):
    import logging

    import jax.numpy as jnp

    from jaxscale.training.memory_check import check_step_memory

    compiled = jax.jit(lambda x: x @ x).lower(jnp.ones((256, 256))).compile()
    with caplog.at_level(logging.INFO, logger="jaxscale"):
        memory = check_step_memory(compiled, jax.devices()[0], 0, "toy", lambda limit: pytest.fail("planned"))
    assert memory.argument_bytes == 256 * 256 * 4 and "the compiled step needs 0.5 MB per device" in caplog.text
    with pytest.raises(DoesNotFit, match=r"toy does not fit: .* more than the 0.0 MB available "
                                         r"\(train.memory_limit_gb\)\. Nothing was allocated\. To fit: shard more"):
        check_step_memory(compiled, jax.devices()[0], 1e-6, "toy", lambda limit: None)


def test_the_printed_flags_give_the_layout_they_describe():
    config = load_config("default", ["model.n_layers=4"])
    for c in candidates(config, 8)[::37]:
        flagged = load_config("default", ["model.n_layers=4", *c.overrides()])
        planned = apply(config, c)
        assert flagged.mesh.sizes() == planned.mesh.sizes() and flagged.train == planned.train, c
        assert flagged.pipeline == planned.pipeline, c


def test_full_remat_recomputes_one_forward_pass_of_the_layers():
    config = load_config("default", ["model.preset=gpt2-350m"])
    rates = rates_for("h200")
    layout = {c.remat: c for c in candidates(config, 1) if c.microbatches == 1 and not c.offload_optimizer}
    none, full = estimate(config, layout["none"], rates), estimate(config, layout["full"], rates)
    m = config.model
    layers_forward = 2 * (m.matmul_params() - m.padded_vocab * m.d_model) + 4 * m.n_layers * m.d_model * m.seq_len
    extra = layers_forward * none.tokens_per_step / rates.flops_per_s
    assert full.compute_s - none.compute_s == pytest.approx(extra, rel=1e-9)



def test_the_host_update_is_a_host_computation_of_the_step_and_needs_the_moments_on_the_host():
    trainer = build_trainer(offloaded({}, offload_params=True, offload_update="host"), jax.devices()[:1])
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.data_sharding),
                         lm_batch_spec(trainer.config))
    assert '_xla_compute_type = "host"' in trainer.train_step.lower(trainer.abstract_state(), batch).as_text()
    with pytest.raises(jaxscale.ConfigError, match="train.offload_update=host computes the update where the "
                                                   "optimizer state lives.*add --set train.offload_optimizer=true"):
        load_config("default", ["train.offload_update=host"])
    with pytest.raises(jaxscale.ConfigError, match="train.offload_update='cpu'; choose device"):
        load_config("default", ["train.offload_update=cpu", "train.offload_optimizer=true"])


@pytest.mark.slow  # 15-30 s a layout
@pytest.mark.parametrize("layout", [{}, dict(data=2, fsdp=2, tensor=2)])
@pytest.mark.parametrize("params", [False, True])
def test_the_update_computed_in_host_memory_trains_as_on_the_device(layout, params):
    n = int(np.prod(list(layout.values()) or [1]))
    config = offloaded(layout, offload_params=params, offload_update="host")
    assert_same(run(config, jax.devices()[:n]), reference("gpt2"))


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_the_clipping_that_keeps_memory_kinds_clips_as_optax_does(max_norm):
    import optax

    from jaxscale.training.optimizer import clip_by_global_norm

    grads = {"w": jax.random.normal(jax.random.key(0), (8, 4)), "b": jax.random.normal(jax.random.key(1), (4,))}
    ours, _ = clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)
    norm = float(optax.tree.norm(grads))
    assert float(optax.tree.norm(ours)) == pytest.approx(min(norm, max_norm), rel=1e-6)


def test_the_roofline_hides_the_catalogs_fraction_of_the_collectives_behind_compute():
    config = load_config("default", ["model.preset=gpt2-350m", "train.batch_size=64"])
    layout = next(c for c in candidates(config, 8) if c.fsdp == 8 and c.microbatches == 1 and c.remat == "none"
                  and not c.host_offload)
    rates = rates_for("h200")
    assert rates.collective_overlap == 0.0  # no overlap measured on it yet: the sum
    plain = estimate(config, layout, rates)
    assert plain.step_s == plain.compute_s + plain.collective_s + plain.host_s and plain.collective_s > 0
    full = estimate(config, layout, dataclasses.replace(rates, collective_overlap=1.0))
    assert full.step_s == pytest.approx(max(full.compute_s, full.collective_s) + full.host_s)
    half = estimate(config, layout, dataclasses.replace(rates, collective_overlap=0.5))
    assert half.step_s == pytest.approx(plain.step_s - 0.5 * min(plain.compute_s, plain.collective_s))


def test_a_measured_overlap_in_the_catalog_reaches_the_planner(tmp_path, monkeypatch):
    path = tmp_path / "hardware.yaml"
    path.write_text("accelerators:\n  h200:\n    collective_overlap: 0.6\n")
    monkeypatch.setenv("JAXSCALE_HARDWARE", str(path))
    assert rates_for("h200").collective_overlap == 0.6
