import subprocess
import sys


def test_import_does_not_load_torch():
    code = "import sys, dlnest_jupyter; from dlnest_jupyter import DLNestError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_programming_model_names_are_exported():
    code = ("import dlnest_jupyter as d; import torch; "
            "print(d.Model.__name__, d.Dataset.__name__, d.LifeCycle.__name__, callable(d.load), callable(d.analyze))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["Model", "Dataset", "LifeCycle", "True", "True"]


def test_no_exported_name_is_shadowed_by_a_submodule():
    # importing dlnest_jupyter.X sets the package attribute X to the module, hiding a lazy function X
    import importlib.util

    import dlnest_jupyter

    shadowed = [n for n in dlnest_jupyter._LAZY if importlib.util.find_spec(f"dlnest_jupyter.{n}") is not None]
    assert shadowed == []
    code = "import dlnest_jupyter as d, dlnest_jupyter.panels; print(d.panel is d.panels.panel)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
