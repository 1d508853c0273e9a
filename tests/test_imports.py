"""Importing jaxscale is cheap: heavy and optional packages load when a feature needs them, not before; a
missing optional package is named together with the extra that installs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OPTIONAL = ["matplotlib", "scipy", "tokenizers", "pyarrow", "datasets"]  # the plot, scaling, data, hf extras
HEAVY = ["jax", "flax", "optax", "orbax", "tensorstore"]


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def loaded_after(code: str) -> list[str]:
    """The top-level packages of OPTIONAL + HEAVY that a fresh interpreter holds after running `code`."""
    result = run_python(f"import json, sys\n{code}\n"
                        f"print(json.dumps(sorted({{m.partition('.')[0] for m in sys.modules}})))")
    assert result.returncode == 0, result.stderr
    return sorted(set(json.loads(result.stdout.splitlines()[-1])) & {*OPTIONAL, *HEAVY})


@pytest.mark.parametrize("code", ["import jaxscale", "import jaxscale.data",
                                  "import jaxscale.training.curves, jaxscale.cost.estimate, jaxscale.scaling.sweep"])
def test_package_and_light_modules_load_neither_jax_nor_optional_packages(code):
    assert loaded_after(code) == []


def test_config_and_cli_load_no_optional_package():
    code = ("import jaxscale\njaxscale.load_config('gpt2-124m', ['mesh=tpu-v5e-256'])\n"
            "from jaxscale.cli import build_parser\nbuild_parser().parse_args(['train'])")
    assert not set(loaded_after(code)) & set(OPTIONAL)


def test_training_loads_jax_on_first_use():
    assert {"jax", "orbax"} <= set(loaded_after("from jaxscale import train"))


@pytest.mark.parametrize("hidden, code, extra", [
    ("matplotlib", "from jaxscale.training.curves import curves_figure; curves_figure([])", "plot"),
    ("scipy", "import jaxscale.scaling.fit", "scaling"),
    ("tokenizers", "from jaxscale.data import load_tokenizer; load_tokenizer('tok.json')", "data"),
])
def test_a_missing_optional_package_names_its_extra(hidden, code, extra):
    # sys.modules[name] = None makes `import name` fail as it does where the package is not installed
    probe = (f"import sys\nsys.modules[{hidden!r}] = None\nfrom jaxscale.extras import MissingDependency\n"
             f"try:\n    {code}\nexcept MissingDependency as e:\n    print(e)\n")
    result = run_python(probe)
    assert f"needs {hidden}, which is not installed: pip install 'jaxscale[{extra}]'" in result.stdout, \
        result.stdout + result.stderr
