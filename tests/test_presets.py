"""Presets ship inside the package: found by name from any directory; a project's own YAML files still work."""
import pytest

from jaxscale.cli import main
from jaxscale.config import load_config
from jaxscale.errors import ConfigError
from jaxscale.presets import INSTALLED, known_presets, list_presets


def test_presets_are_found_by_name_from_an_unrelated_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("gpt2-124m", ["mesh=tpu-v5e-256"])
    assert config.model.d_model == 768 and config.mesh.fsdp == 16
    assert known_presets("experiments")["default"] == INSTALLED / "experiments" / "default.yaml"


def test_own_presets_in_the_working_directory_come_first_and_paths_still_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "meshes").mkdir()
    (tmp_path / "experiments" / "default.yaml").write_text("# Mine.\ntrain:\n  steps: 7\n")
    (tmp_path / "meshes" / "pairs.yaml").write_text("# Two by rest.\ndata: -1\nfsdp: 2\n")
    assert load_config(None).train.steps == 7  # ./experiments/default.yaml hides the installed one
    assert load_config(None, ["mesh=pairs"]).mesh.fsdp == 2
    own = tmp_path / "elsewhere.yaml"
    own.write_text("train:\n  steps: 3\nmesh: gpu-1\n")
    assert load_config(str(own)).train.steps == 3
    listing = list_presets()
    assert f"default    Mine.  [{tmp_path / 'experiments' / 'default.yaml'}]" in listing
    assert "pairs          Two by rest." in listing
    with pytest.raises(ConfigError, match=r"no mesh named 'nowhere'; known: cpu-8, .*pairs"):
        load_config(None, ["mesh=nowhere"])


def test_jaxscale_presets_prints_one_described_line_per_preset(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = sorted(p.stem for p in INSTALLED.glob("*/*.yaml"))
    described = sorted(line.split()[0] for line in lines if line.startswith("  "))
    assert described == shipped and len(shipped) >= 11
    assert "  tpu-v5e-2x256  Two TPU v5e slices of 256 chips joined by the data-center network (multislice)." in lines
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines if line.startswith("  "))  # a text on each


@pytest.mark.parametrize("experiment, params", [("llama-1b", 1_235_814_400), ("llama-3b", 3_212_749_824),
                                                ("llama3-8b", 8_030_261_248)])
def test_llama_experiments_have_the_published_shapes(experiment, params):
    """The parameter counts of Llama 3.2 1B and 3B and Llama 3 8B as published (their safetensors' sizes)."""
    model = load_config(experiment).model
    assert model.total_params() == params and model.vocab_size == 128256 and model.n_kv_heads == 8
    assert (model.rope_scaling is not None) == model.tie_embeddings == (experiment != "llama3-8b")
