"""The hardware catalog: built-in figures, device-kind matching, user overrides and their validation."""
import textwrap

import pytest

from jaxscale.cost.catalog import (
    NUMBER_FIELDS,
    CatalogError,
    accelerator_for_device_kind,
    get_accelerator,
    load_catalog,
    peak_flops_for_device_kind,
)


def write(tmp_path, text, name="hw.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_builtin_catalog_has_the_documented_peaks_and_sources():
    catalog = load_catalog()
    expected_peaks = {"tpu-v4": 275e12, "tpu-v5e": 197e12, "tpu-v5p": 459e12, "tpu-v6e": 918e12,
                      "a100-80gb": 312e12, "h100-sxm": 989e12, "h200": 989e12, "b200": 2250e12}
    for key, peak in expected_peaks.items():
        assert catalog[key].peak_bf16_flops == peak, key
    assert catalog["cpu"].peak_bf16_flops is None
    for accelerator in catalog.values():
        for field in NUMBER_FIELDS:  # every figure given is sourced, every price dated
            if getattr(accelerator, field) is not None:
                assert accelerator.sources[field].strip(), (accelerator.key, field)
        if accelerator.price_usd_per_chip_hour is not None:
            assert accelerator.price_date


@pytest.mark.parametrize("device_kind, key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA B200", "b200"), ("TPU v4", "tpu-v4"), ("TPU v5 lite", "tpu-v5e"), ("TPU v5", "tpu-v5p"),
    ("TPU v5p", "tpu-v5p"), ("TPU v6 lite", "tpu-v6e"), ("cpu", "cpu"),
])
def test_device_kinds_map_to_entries(device_kind, key):
    assert accelerator_for_device_kind(device_kind).key == key


def test_peak_for_mfu_is_none_on_cpu_and_unknown_hardware():
    assert peak_flops_for_device_kind("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_device_kind("TPU v5 lite") == 197e12
    assert peak_flops_for_device_kind("cpu") is None
    assert peak_flops_for_device_kind("NVIDIA H100 PCIe") is None  # a different chip, with a lower peak


def test_user_file_overrides_fields_and_adds_entries(tmp_path, monkeypatch):
    path = write(tmp_path, """
        accelerators:
          h100-sxm:
            price_usd_per_chip_hour: 1.85
            price_date: "2026-11"
          my-gpu:
            name: Lab GPU
            device_kinds: ["NVIDIA H100 PCIe"]
            peak_bf16_flops: 756e12
            hbm_bytes: 80e9
            hbm_bytes_per_s: 2.0e12
            interconnect_bytes_per_s: null
            tdp_watts: 350
            price_usd_per_chip_hour: null
            price_date: null
    """)
    catalog = load_catalog(path)
    h100 = catalog["h100-sxm"]
    assert h100.price_usd_per_chip_hour == 1.85 and h100.price_date == "2026-11"
    assert h100.sources["price_usd_per_chip_hour"] == f"user catalog {path}"
    assert h100.peak_bf16_flops == 989e12 and h100.tdp_watts == 700  # untouched fields keep the built-in values
    assert "nvidia.com" in h100.sources["peak_bf16_flops"]
    mine = catalog["my-gpu"]
    assert mine.peak_bf16_flops == 756e12 and mine.tdp_watts == 350  # "756e12" read as a number, not a string
    assert set(catalog) >= {"tpu-v5p", "b200", "cpu"}  # built-in entries stay
    assert accelerator_for_device_kind("NVIDIA H100 PCIe", catalog).key == "my-gpu"
    assert load_catalog()["h100-sxm"].price_usd_per_chip_hour != 1.85  # the built-in catalog is not changed

    monkeypatch.setenv("JAXSCALE_HARDWARE", path)  # the environment variable works like --catalog
    assert load_catalog()["my-gpu"].name == "Lab GPU"
    assert peak_flops_for_device_kind("NVIDIA H100 PCIe") == 756e12


@pytest.mark.parametrize("body, message", [
    ("h100-sxm:\n    tdp_wats: 500\n", "entry 'h100-sxm', field 'tdp_wats': unknown field; did you mean 'tdp_watts'?"),
    ("h100-sxm:\n    tdp_watts: -5\n", "entry 'h100-sxm', field 'tdp_watts': must be a positive number or null"),
    ("h100-sxm:\n    hbm_bytes: lots\n", "entry 'h100-sxm', field 'hbm_bytes': must be a number or null, got 'lots'"),
    ("h100-sxm:\n    device_kinds: ['NVIDIA (H100']\n", "entry 'h100-sxm', field 'device_kinds': 'NVIDIA (H100' is not"),
    ("h100-sxm:\n    price_date: null\n", "entry 'h100-sxm', field 'price_date': a price needs the date"),
    ("h100-sxm: 5\n", "entry 'h100-sxm': must be a mapping of fields"),
    ("new-chip:\n    name: X\n    peak_bf16_flops: 1e15\n", "entry 'new-chip': missing field(s) device_kinds"),
    ("h200:\n    collective_overlap: 1.5\n", "entry 'h200', field 'collective_overlap': the fraction of the "
                                           "collectives' time hidden behind compute, in (0, 1] (null: none), got 1.5"),
])
def test_bad_user_entries_name_the_entry_and_field(tmp_path, body, message):
    path = write(tmp_path, "accelerators:\n  " + body)
    with pytest.raises(CatalogError) as error:
        load_catalog(path)
    assert message in str(error.value)
    assert path in str(error.value)


def test_bad_file_shapes_are_reported(tmp_path):
    with pytest.raises(CatalogError, match="single key 'accelerators'"):
        load_catalog(write(tmp_path, "h100-sxm: {}\n", "a.yaml"))
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(write(tmp_path, "accelerators: [\n", "b.yaml"))
    with pytest.raises(CatalogError, match="cannot read it"):
        load_catalog(str(tmp_path / "missing.yaml"))


def test_a_broken_user_catalog_does_not_stop_training(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSCALE_HARDWARE", write(tmp_path, "accelerators: 3\n"))
    assert peak_flops_for_device_kind("NVIDIA H100 80GB HBM3") is None  # MFU just goes unreported


def test_unknown_hardware_name_suggests_the_closest():
    with pytest.raises(CatalogError, match="did you mean 'h100-sxm'"):
        get_accelerator("h100sxm", load_catalog())


def test_estimate_with_a_catalog_that_is_not_utf8_names_the_file_and_the_flag(tmp_path, capsys):
    from jaxscale.cli import main

    path = tmp_path / "latin1.yaml"
    path.write_bytes("accelerators:\n  h100-sxm:\n    name: H100 café\n".encode("latin-1"))
    assert main(["estimate", "gpt2-124m", "--tokens", "1e9", "--hardware", "h100-sxm", "--chips", "8",
                 "--catalog", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"hardware catalog {path} (the file given by --catalog or $JAXSCALE_HARDWARE): not UTF-8 text" in err
    assert "Traceback" not in err
