"""Smoke test of the installed wheel, run by ``.ci/run`` in an environment without the checkout.

Checks that ``lightning_kr`` is imported from the installed package (not a source tree), that every
subpackage and the ``py.typed`` marker shipped, that the README's first Python example runs as
written, that ``lightning_kr.callbacks`` imports, that ``kr_convert(resnet18())`` trains one step,
and that a ``save_pretrained`` folder loads back exactly.

    python .ci/wheel_smoke.py README.md        # run from a folder outside the checkout
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import re
import sys
import sysconfig

import torch
from torchvision.models import resnet18

import lightning_kr
import lightning_kr.callbacks
from lightning_kr import kr_convert

site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
package = pathlib.Path(lightning_kr.__file__).resolve().parent
if site not in package.parents:
    sys.exit(f"lightning_kr was imported from {package}, not from the installed wheel in {site}")
if not (package / "py.typed").is_file():
    sys.exit("the wheel has no lightning_kr/py.typed marker")
for module in pkgutil.walk_packages(lightning_kr.__path__, "lightning_kr."):
    importlib.import_module(module.name)
print(f"lightning_kr {lightning_kr.__version__} from {package}: every module imports")

readme = pathlib.Path(sys.argv[1]).read_text()
example = re.search(r"```python\n(.*?)```", readme, re.S)
if example is None:
    sys.exit("README.md has no ```python example")
exec(compile(example.group(1), "README.md example", "exec"), {})
print("README example: ran")

torch.manual_seed(0)
model = kr_convert(resnet18(num_classes=10), input_size=32)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
loss = torch.nn.functional.cross_entropy(model(images), labels)
loss.backward()
optimizer.step()
assert torch.isfinite(loss), loss
print(f"kr_convert(resnet18()) trained one step: loss {loss.item():.3f}")

# save_pretrained -> from_pretrained from the installed package (without the [hub] extra the
# local-folder path of KRModel is the one users get).
import tempfile  # noqa: E402

from lightning_kr import KRModel  # noqa: E402
from lightning_kr.models import build_model  # noqa: E402

saved = kr_convert(build_model("resnet18", num_classes=10), input_size=32).eval()
with tempfile.TemporaryDirectory() as folder:
    saved.save_pretrained(folder)
    loaded = KRModel.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(saved(images), loaded(images))
print(f"save_pretrained -> from_pretrained: exact ({type(loaded).__mro__[2].__name__})")
