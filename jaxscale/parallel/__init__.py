"""Parallelism beyond sharding rules: pipeline stages over the `pipeline` mesh axis (GPipe, circular, 1F1B);
expert parallelism (`experts`) and context parallelism (`context`) live in their own modules."""
from jaxscale.parallel.one_f_one_b import run_layers_and_loss
from jaxscale.parallel.pipeline import (
    active_plan,
    outer_rules,
    pipelined_layers,
    run_layers,
    split_microbatches,
)
from jaxscale.parallel.plan import (
    PipelineConfig,
    PipelinePlan,
    bubble_fraction,
    describe_plan,
    plan_from_config,
    plan_pipeline,
)

__all__ = ["PipelineConfig", "PipelinePlan", "active_plan", "bubble_fraction", "describe_plan",
           "outer_rules", "pipelined_layers", "run_layers", "plan_from_config", "plan_pipeline",
           "run_layers_and_loss", "split_microbatches"]
