"""autoprune: search per-layer pruning policies for PyTorch models under a resource budget.

    import autoprune
    task = autoprune.LoaderTask.classification(train_loader, val_loader)
    result = autoprune.search(model, task, budgets={"flops": "50%"}, agent="random", trials=20)
    pruned = autoprune.apply(model, result.policy, task)
"""

from autoprune.api import apply, search
from autoprune.config import SearchConfig
from autoprune.errors import CandidateError, InputError, ParameterError
from autoprune.evaluator import Evaluation, Evaluator
from autoprune.layers import register_pruner, unregister_pruner
from autoprune.policy import Policy
from autoprune.runner import SearchOutcome
from autoprune.task import ImageClassificationTask, LoaderTask, Task

__version__ = "0.1.0"

__all__ = [
    "CandidateError",
    "Evaluation",
    "Evaluator",
    "ImageClassificationTask",
    "InputError",
    "LoaderTask",
    "ParameterError",
    "Policy",
    "SearchConfig",
    "SearchOutcome",
    "Task",
    "__version__",
    "apply",
    "register_pruner",
    "search",
    "unregister_pruner",
]
