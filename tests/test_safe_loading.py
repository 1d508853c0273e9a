"""Nothing jaxscale reads can run code: no pickle (nor the libraries built on it), YAML only through the safe
loader, NumPy files without pickled objects. Checked on the syntax tree of every module of the package and of
experiments/, so an alias or a `from pickle import load` is caught as well as the plain call."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
ALWAYS_UNSAFE = {"torch.load", "pandas.read_pickle", "pd.read_pickle", "yaml.unsafe_load", "yaml.unsafe_load_all",
                 "yaml.full_load", "yaml.full_load_all"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "yaml.SafeLoader", "yaml.CSafeLoader"}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """'file:line: what' for every import of a pickle-family module and every call that can unpickle."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("numpy.load", "np.load"):
                allow = keywords.get("allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{where}: {name}(..., allow_pickle={ast.unparse(allow)})")
            elif name in ALWAYS_UNSAFE:
                found.append(f"{where}: {name}(...)")
            elif name in ("yaml.load", "yaml.load_all"):
                loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
                if loader is None or dotted(loader) not in SAFE_YAML_LOADERS:
                    found.append(f"{where}: {name}(...) without the SafeLoader")
    return found


def test_the_package_and_the_experiments_load_nothing_unsafely():
    files = sorted((REPO / "jaxscale").rglob("*.py")) + sorted((REPO / "experiments").rglob("*.py"))
    assert len(files) > 50
    found = [hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))]
    assert found == [], "loads that can run code:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "import pickle\npickle.load(f)",
    "from pickle import loads as l\nl(b)",
    "import dill",
    "import joblib.numpy_pickle",
    "torch.load('model.bin')",
    "yaml.load(text)",
    "yaml.load(text, Loader=yaml.Loader)",
    "yaml.load(text, yaml.FullLoader)",
    "yaml.full_load(text)",
    "np.load(path, allow_pickle=True)",
    "numpy.load(path, allow_pickle=flag)",
    "pd.read_pickle(path)",
])
def test_the_check_finds_each_kind_of_unsafe_load(source):
    assert unsafe_loads(source)


@pytest.mark.parametrize("source", [
    "yaml.safe_load(text)",
    "yaml.load(text, Loader=yaml.SafeLoader)",
    "yaml.load(text, yaml.CSafeLoader)",
    "np.load(path, mmap_mode='r', allow_pickle=False)",
    "np.load(path)",
    "json.loads(text)",
])
def test_safe_loads_pass_the_check(source):
    assert unsafe_loads(source) == []
