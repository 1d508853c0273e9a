"""`jaxscale estimate`: the arithmetic against hand calculations, the HBM check, MFU from a run, the CLI."""
import json

import pytest

from jaxscale.cli import main
from jaxscale.config import load_config
from jaxscale.cost.catalog import Accelerator, load_catalog
from jaxscale.cost.estimate import EstimateError, cheapest, estimate_training, fastest
from jaxscale.cost.memory import activation_bytes_per_chip, state_shard_count, training_memory
from jaxscale.training.events import measured_mfu

ROUND_CHIP = Accelerator(key="round", name="Round numbers", device_kinds=("round",), peak_bf16_flops=1e15,
                         hbm_bytes=80e9, hbm_bytes_per_s=None, interconnect_bytes_per_s=None, tdp_watts=600.0,
                         price_usd_per_chip_hour=3.0, price_date="2026-01", sources={})


def test_estimate_matches_a_hand_calculation():
    # 6e9 FLOPs/token x 1e10 tokens = 6e19 FLOPs. 100 chips x 1e15 FLOP/s x MFU 0.5 = 5e16 FLOP/s -> 1200 s.
    # chip-hours = 100 x 1200 / 3600 = 33.33; cost = 33.33 x $3 = $100;
    # energy = 33.33 chip-h x 600 W x PUE 1.2 = 24 kWh; CO2e = 24 kWh x 500 g/kWh = 12 kg.
    e = estimate_training(6e9, 1e10, ROUND_CHIP, chips=100, mfu=0.5, pue=1.2, grid_gco2_per_kwh=500)
    assert e.total_flops == pytest.approx(6e19)
    assert e.seconds == pytest.approx(1200)
    assert e.chip_hours == pytest.approx(100 / 3)
    assert e.cost_usd == pytest.approx(100)
    assert e.energy_kwh == pytest.approx(24)
    assert e.co2e_kg == pytest.approx(12)


def test_estimate_without_tdp_or_price_reports_unknown_and_refuses_without_peak():
    catalog = load_catalog()
    tpu = estimate_training(1e9, 1e9, catalog["tpu-v5p"], chips=8, mfu=0.4)
    assert tpu.energy_kwh is None and tpu.co2e_kg is None  # Google publishes no per-chip TDP
    assert tpu.cost_usd == pytest.approx(tpu.chip_hours * catalog["tpu-v5p"].price_usd_per_chip_hour)
    with pytest.raises(EstimateError, match="no peak_bf16_flops"):
        estimate_training(1e9, 1e9, catalog["cpu"], chips=1, mfu=0.4)
    with pytest.raises(EstimateError, match="MFU must be in"):
        estimate_training(1e9, 1e9, ROUND_CHIP, chips=1, mfu=45)


def test_cheapest_and_fastest():
    catalog = load_catalog()
    estimates = [estimate_training(6e9, 1e10, catalog[k], chips=64, mfu=0.4) for k in ("a100-80gb", "b200", "tpu-v5e")]
    assert fastest(estimates).hardware == "b200"  # highest peak at equal chips and MFU
    cost_per_flop = {e.hardware: e.cost_usd for e in estimates}
    assert cheapest(estimates).hardware == min(cost_per_flop, key=cost_per_flop.get)


def test_memory_state_sharding_and_activations_by_hand():
    mesh = {"data": 4, "pipeline": 1, "fsdp": 8, "tensor": 2}
    assert state_shard_count(mesh, zero3=False) == 16  # fsdp x tensor x pipeline
    assert state_shard_count(mesh, zero3=True) == 64  # every chip
    # 256 sequences over data x fsdp = 32 shards -> 8 per chip; 2 microbatches -> 4 at a time; 4 x 1024 = 4096
    # tokens. Per layer 4096 x 512 x (10 + 24/2) = 46,137,344 B; 8 layers -> 369,098,752 B; logits
    # 4 x 4096 x 1000 / 2 = 8,192,000 B. Total 377,290,752 B.
    act = activation_bytes_per_chip(seq_len=1024, d_model=512, n_layers=8, vocab_size=1000, batch_size=256,
                                    mesh_sizes=mesh, microbatches=2)
    assert act == pytest.approx(377_290_752)
    # Full remat keeps 2 bytes x tokens x d per layer, plus one layer's working set and the logits.
    full = activation_bytes_per_chip(1024, 512, 8, 1000, 256, mesh, 2, remat="full")
    assert full == pytest.approx(2 * 4096 * 512 * 8 + 46_137_344 + 8_192_000)
    m = training_memory(params=1_000_000_000, state_shards=16, activation_bytes=act, hbm_bytes=80e9)
    assert m.state_bytes_per_chip == pytest.approx(1e9)  # 16 B/param x 1e9 / 16 chips
    assert m.fits is True
    assert training_memory(10_000_000_000, 1, act, 80e9).fits is False  # 160 GB of state on one chip
    assert training_memory(1, 1, 0, None).fits is None  # HBM unknown


def write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_mfu_from_a_run_is_the_median_of_non_null_values(tmp_path):
    write_metrics(tmp_path / "run", [
        {"step": 1, "loss": 5.0, "mfu": None},  # the compile step has no timing
        {"step": 10, "loss": 4.0, "mfu": 0.30}, {"step": 20, "loss": 3.5, "mfu": 0.50},
        {"step": 20, "eval_loss": 3.6},  # evaluation rows carry no mfu
        {"step": 30, "loss": 3.2, "mfu": 0.40}, {"step": 40, "loss": 3.1, "mfu": 0.35},
    ])
    assert measured_mfu(tmp_path / "run") == pytest.approx(0.375)  # median of 0.30, 0.35, 0.40, 0.50
    write_metrics(tmp_path / "cpu_run", [{"step": 10, "loss": 4.0, "mfu": None}])
    assert measured_mfu(tmp_path / "cpu_run") is None


def test_cli_estimate_uses_the_experiment_and_names_cheapest_and_fastest(capsys):
    code = main(["estimate", "default", "--tokens", "1e9", "--hardware", "h100-sxm", "--chips", "8",
                 "--compare", "tpu-v5p,a100-80gb"])
    out = capsys.readouterr().out
    assert code == 0
    model = load_config("default").model
    assert f"{model.flops_per_token() * 1e9:.3g}" in out  # training FLOPs = FLOPs/token x tokens
    assert "0.400 (default: no --mfu or --from-run given)" in out
    assert "TDP is an upper bound" in out
    assert "fits in 80 GB HBM" in out
    assert "fastest:  h100-sxm" in out  # the highest peak of the three at the same chips and MFU
    catalog = load_catalog()  # at equal MFU the cheapest run is the lowest price per peak FLOP/s
    usd_per_flop = {k: catalog[k].price_usd_per_chip_hour / catalog[k].peak_bf16_flops
                    for k in ("h100-sxm", "tpu-v5p", "a100-80gb")}
    assert f"cheapest: {min(usd_per_flop, key=usd_per_flop.get)} " in out
    assert out.count("\n  ") >= 10  # the detailed block, then a table row per hardware


def test_cli_estimate_json_with_mfu_from_run(tmp_path, capsys):
    write_metrics(tmp_path / "run", [{"step": 10, "mfu": 0.2}, {"step": 20, "mfu": 0.3}, {"step": 30, "mfu": 0.6}])
    code = main(["estimate", "default", "--set", "train.batch_size=64", "--tokens", "2e9", "--hardware", "tpu-v5e",
                 "--chips", "16", "--from-run", str(tmp_path / "run"), "--zero3", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    (estimate,) = report["estimates"]
    config = load_config("default", ["train.batch_size=64"])
    assert estimate["mfu"] == pytest.approx(0.3)
    assert "median" in report["mfu_source"]
    assert estimate["total_flops"] == pytest.approx(config.model.flops_per_token() * 2e9)
    assert estimate["seconds"] == pytest.approx(estimate["total_flops"] / (16 * 197e12 * 0.3))
    assert estimate["memory"]["state_shards"] == 16  # --zero3: all chips
    assert estimate["memory"]["state_bytes_per_chip"] == pytest.approx(config.model.total_params() * 16 / 16)


def test_cli_estimate_errors_are_messages_not_tracebacks(capsys):
    assert main(["estimate", "default", "--tokens", "1e9", "--hardware", "h100", "--chips", "8"]) == 2
    assert "unknown hardware 'h100'" in capsys.readouterr().err
    assert main(["estimate", "default", "--tokens", "1e9", "--chips", "8"]) == 2
    assert "give --hardware" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--tokens", "nan"], "tokens and FLOPs/token must be positive and finite, got nan"),
    (["--tokens", "inf"], "tokens and FLOPs/token must be positive and finite, got inf"),
    (["--pue", "nan"], "PUE is total facility power over IT power, so >= 1 and finite; got nan"),
    (["--grid-gco2-per-kwh", "inf"], "grid carbon intensity must be >= 0 and finite, got inf"),
    (["--mfu", "0.3", "--from-run", "runs/x"], "--mfu and --from-run both set the MFU; give one of them"),
    (["--from-run", "no/such/run"], "no/such/run does not exist: give the run directory of a jaxscale train run"),
])
def test_cli_estimate_refuses_non_finite_figures_and_contradicting_flags(capsys, flags, message):
    args = ["estimate", "default", "--tokens", "1e9", "--hardware", "h100-sxm", "--chips", "8", *flags]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_estimate_refuses_an_impossible_measured_mfu(tmp_path, capsys):
    write_metrics(tmp_path / "run", [{"step": 10, "mfu": 2.5}, {"step": 20, "mfu": 3.5}])
    assert main(["estimate", "default", "--tokens", "1e9", "--hardware", "h100-sxm", "--chips", "8",
                 "--from-run", str(tmp_path / "run")]) == 2
    assert f"the median MFU of {tmp_path / 'run'} is 3, outside (0, 1]" in capsys.readouterr().err


def test_cli_estimate_from_a_run_killed_mid_write(tmp_path, capsys):
    write_metrics(tmp_path / "run", [{"step": 10, "mfu": 0.2}, {"step": 20, "mfu": 0.4}])
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 30, "mf')  # the row being written when the run was killed
    assert main(["estimate", "default", "--tokens", "1e9", "--hardware", "h100-sxm", "--chips", "8",
                 "--from-run", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["estimates"][0]["mfu"] == pytest.approx(0.3)


def test_cli_estimate_compares_each_entry_once_and_shows_small_chip_hours(capsys):
    assert main(["estimate", "default", "--tokens", "1e9", "--chips", "8", "--hardware", "b200",
                 "--compare", "h100-sxm,b200,h100-sxm"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("\nhardware "):].splitlines()[2:-2]
    assert [row.split()[0] for row in table] == ["b200", "h100-sxm"]
    chip_hours = load_config("default").model.flops_per_token() * 1e9 / (load_catalog()["b200"].peak_bf16_flops
                                                                         * 0.4 * 3600)
    assert chip_hours < 0.05 and f"chip-hours      {chip_hours:.3g}\n" in out  # not rounded to 0.0
