"""DPO's reference: each preference pair's log-probabilities under the initial model.

posttrain.reference=cached: computed once before training, on the run's mesh, and kept beside the pairs (no
copy of the weights while training). frozen: the state holds a copy of the initial parameters, sharded like
the policy's (no optimizer state), and the train step computes them from it (`reference_log_probs`); the
held-out pairs' values are still computed once here, for the evaluation step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxscale.platforms import devices_platform
from jaxscale.posttrain.losses import pair_log_probs
from jaxscale.posttrain.rows import PreferencePairs
from jaxscale.training.batches import batch_shard, to_global
from jaxscale.training.language_model import model_options
from jaxscale.training.step import on_device, tracing_model


def reference_log_probs(model, options: dict):
    """(reference params, batch) -> {"reference_chosen", "reference_rejected"}: the frozen reference's
    log-probabilities of the batch's pairs, inside the train step."""

    def compute(params, batch):
        reference = model.bind(params)
        reference.eval()
        chosen, rejected, _ = pair_log_probs(reference, batch, options)
        return {"reference_chosen": chosen, "reference_rejected": rejected}

    return compute


def attach_reference(trainer, *pair_sets: PreferencePairs | None) -> None:
    """Each pair's reference log-probabilities under the initial model (the seed's, or model.init_from's),
    computed on the trainer's mesh with the parameters sharded as in training, then kept with the pairs. The
    initial model is the same on every start, so a resumed run gets the same values."""
    config, mesh = trainer.config, trainer.mesh
    options = model_options(config, devices_platform(mesh.devices))

    def log_probs(params, batch):
        with tracing_model(config, mesh, trainer.plan.per_device_batch):
            model = trainer.model.bind(on_device(params, trainer.shardings.params))  # train.offload_params
            model.eval()
            chosen, rejected, _ = pair_log_probs(model, batch, options)
            return jnp.stack([chosen, rejected], -1)

    compute = jax.jit(log_probs, in_shardings=(trainer.shardings.params, trainer.data_sharding),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))
    params = trainer.init_state().params
    size = config.train.batch_size
    shard = batch_shard(trainer.data_sharding, size)
    rows = size // shard["shard_count"]
    for pairs in (p for p in pair_sets if p is not None):
        values = []
        for start in range(0, len(pairs), size):
            # this process's rows of the chunk; past the end, the last pair again (its values are dropped)
            mine = [min(start + shard["shard_index"] * rows + i, len(pairs) - 1) for i in range(rows)]
            batch = {k: np.stack([pairs[i][k] for i in mine]) for k in pairs[0] if k.endswith(("tokens", "mask"))}
            values.append(np.asarray(jax.device_get(compute(params, to_global(batch, trainer.data_sharding, size)))))
        pairs.attach_reference(np.concatenate(values)[:len(pairs)])
    del params
