"""fastkern: Triton kernels for LLM fine-tuning, patched into Hugging Face models per instance.

>>> import fastkern
>>> report = fastkern.patch_model(model)      # doctest: +SKIP
>>> print(report)                             # doctest: +SKIP
>>> fastkern.unpatch_model(model)             # doctest: +SKIP
"""

__version__ = "0.1.0"

from . import ops, runtime  # noqa: E402
from .patching import PatchReport, patch_model, unpatch_model  # noqa: E402
from .offload import offload_checkpoint  # noqa: E402
from .capacity import plan_memory  # noqa: E402

__all__ = ["ops", "runtime", "patch_model", "unpatch_model", "PatchReport", "offload_checkpoint", "plan_memory", "__version__"]
