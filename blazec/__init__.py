"""blazec: a torch.compile backend for Mixture-of-Experts models.

``torch.compile(model, backend="blaze")`` finds naive MoE dispatch code in the
Dynamo graph, rewrites it into index-based blaze ops, and compiles the result
with Inductor. README.md ("Layout") and docs/ describe the data flow.
"""

__version__ = "0.1.0"

from blazec.config import BlazeConfig, BlazeOptionError  # noqa: E402

__all__ = ["BlazeConfig", "BlazeOptionError", "__version__"]
