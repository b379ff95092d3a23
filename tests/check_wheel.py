"""`make wheel-check`: run outside the checkout with the installed wheel's python; imports every
public name of bear and bear_kernels (and bear_kernels.transformers'), checks the versions and
the typing marker, and exits non-zero with the first failure."""

import importlib
import importlib.metadata
import sys
from pathlib import Path

import bear
import bear_kernels

assert "site-packages" in bear.__file__, f"bear comes from {bear.__file__}, not the wheel"
version = importlib.metadata.version("bear-rec")
assert bear.__version__ == bear_kernels.__version__ == version, (bear.__version__, version)
for package in (bear, bear_kernels):
    assert (Path(package.__file__).parent / "py.typed").is_file(), package.__name__
    for name in package.__all__:
        getattr(package, name)
transformers_names = ("BEARForCausalLMLoss", "apply_bear_loss", "bear_compute_loss_func")
hf = importlib.import_module("bear_kernels.transformers")
for name in transformers_names:
    getattr(hf, name)
print(f"bear-rec {version}: {len(bear.__all__) + len(bear_kernels.__all__)} names import")
sys.exit(0)
