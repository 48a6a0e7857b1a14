"""Tasks: what a model is trained and judged on, so that any model, data pipeline and metric can be searched.

The evaluator and every agent reach data only through a :class:`Task`. Its lifecycle, in the order the
search calls it::

    task = task.to(device)              # once, by the evaluator: where batches and example inputs live
    task.example_inputs                 # traced by the dependency graph (Space.from_model), the FLOPs
                                        # counter and the latency timer, by torch-pruning's convention:
                                        # model(x), model(*inputs) for a tuple, model(**inputs) for a dict
    task.score(base_model, "val")       # the unpruned model's objective, once per search
    for every candidate:
        batches = task.train_batches(seed, augment=False)   # the same batches for every candidate
        task.forward(model, batch)      # adaptive BN's forward passes (and the data criteria's)
        batches = task.train_batches(seed, augment=True)
        out = task.forward(model, batch); task.loss(out, batch).backward()   # the fine-tune
        task.distill_loss(out, task.forward(teacher, batch), T)              # when distilling
        task.score(model, "val")        # the candidate's objective; {task.metric: value, ...}
    task.score(best_model, "test")      # the final report only: no search reads the test split

``score`` returns one named objective (``task.metric``) with its direction (``task.direction``:
``"maximize"`` for accuracy or mIoU, ``"minimize"`` for a loss), plus any other metrics, which are
recorded beside it. ``train_batches(seed)`` must give the same batches for the same seed, so that
every candidate is trained and judged on equal terms and ``autoprune apply`` rebuilds a trial exactly.

Ready tasks:

* :class:`ImageClassificationTask`: the built-in datasets, held on the device as tensors and batched
  and augmented there (no per-step host work);
* :class:`LoaderTask`: the user's ``torch.utils.data.DataLoader`` objects, loss and score functions,
  streamed (a dataset larger than memory works; worker processes and pinned memory are the loader's);
  :meth:`LoaderTask.classification` builds one for classification in one line.
"""

from __future__ import annotations

import abc
import math
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from autoprune.errors import CandidateError, InputError
from autoprune.inputs import first_sample, primary, tensors, to_device

DIRECTIONS = ("maximize", "minimize")
# objectives shown as percentages: fractions in [0, 1] by their definition
FRACTION_METRICS = frozenset({"accuracy", "top1", "top5", "miou", "iou", "dice", "f1", "precision", "recall",
                              "auc", "map", "pixel_accuracy"})


class Task(abc.ABC):
    """What a model is trained and judged on; see the module docstring for the lifecycle.

    Subclasses implement :attr:`example_inputs`, :meth:`train_batches`, :meth:`loss` and
    :meth:`score`, and set :attr:`metric`, :attr:`direction` and :attr:`name`. :meth:`forward`
    defaults to ``model(batch[0])``; :meth:`to` to returning the task itself.
    """

    metric: str = "score"
    direction: str = "maximize"
    name: str = "task"

    # -- where, and what the graph is traced with ----------------------------------------------
    def to(self, device: torch.device | str) -> Task:
        """This task with its batches and example inputs on ``device``."""
        return self

    @property
    @abc.abstractmethod
    def example_inputs(self) -> Any:
        """Inputs of one or a few samples, on the task's device, that the model is traced and timed with."""

    # -- training batches, forward, loss -------------------------------------------------------
    @abc.abstractmethod
    def train_batches(self, seed: int, *, augment: bool = True) -> Iterator[Any]:
        """Training batches without end, on the task's device: the same ones for the same ``seed``.
        ``augment=False`` asks for plain batches (batch-norm recalibration, the data criteria) where
        the task can tell the two apart."""

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """The model's output on ``batch``; by default ``model(batch[0])``."""
        return model(batch[0])

    @abc.abstractmethod
    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        """The scalar training loss of ``output`` (what :meth:`forward` returned) on ``batch``."""

    def distill_loss(self, output: Any, teacher_output: Any, temperature: float) -> torch.Tensor:
        """Knowledge distillation (Hinton et al., 2015): ``T² · KL(teacher_T ‖ student_T)`` over the
        class dimension (1) of the main predictions, a batch mean. It fits classifiers and per-pixel
        class scores alike; a task with other outputs overrides it."""
        student, teacher = primary(output).float(), primary(teacher_output).float()
        return F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                        reduction="batchmean", log_target=True) * temperature**2

    # -- the objective -------------------------------------------------------------------------
    @abc.abstractmethod
    def score(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        """``{self.metric: value, ...}`` of ``model`` (in eval mode) on ``split``: ``"val"`` for the
        search, ``"test"`` for final reports."""

    def has_split(self, split: str) -> bool:
        """Whether :meth:`score` can read ``split``."""
        return split == "val"

    @property
    def chance(self) -> float | None:
        """The objective on validation of a model that has learnt nothing (a classifier always answering
        the most frequent class), where the task knows it; None otherwise. A search whose candidates all
        score near it cannot tell them apart, and says so."""
        return None

    # -- what the task is ----------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What the scores depend on besides the model (a JSON-able dict): a saved sensitivity scan is
        reused only for the same identity."""
        return {"task": type(self).__name__, "name": self.name, "metric": self.metric, "direction": self.direction}

    def model_kwargs(self) -> dict[str, int]:
        """``in_channels``, ``num_classes`` and ``image_size`` where the task knows them, for building a
        zoo model or a ``file.py:factory`` model for it."""
        return {}

    # -- reading the objective -----------------------------------------------------------------
    @property
    def sign(self) -> float:
        """+1 when the objective is maximised, -1 when it is minimised: ``sign * value`` is "higher is better"."""
        return 1.0 if self.direction == "maximize" else -1.0

    def shortfall(self, reference: float, value: float) -> float:
        """How much worse ``value`` is than ``reference`` (negative when it is better)."""
        return self.sign * (reference - value)

    def error(self, value: float) -> float:
        """AMC's Error of an objective value: ``1 - value`` for a maximised fraction (accuracy, mIoU),
        the value itself for a minimised one (a loss)."""
        return 1.0 - value if self.direction == "maximize" else value

    def format(self, value: float | None) -> str:
        """The objective as people read it: a percentage for fractions such as accuracy."""
        return format_metric(self.metric, value)


def format_metric(metric: str, value: float | None) -> str:
    """A metric's value as people read it: a percentage for fractions such as accuracy or mIoU."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2%}" if metric.lower() in FRACTION_METRICS else f"{value:.4g}"


def check_task(task: Any) -> Task:
    """``task`` itself when it is a usable :class:`Task`; :class:`InputError` naming what is wrong otherwise."""
    if not isinstance(task, Task):
        raise InputError(f"task must be an autoprune.Task (e.g. autoprune.LoaderTask), not {type(task).__name__}")
    if task.direction not in DIRECTIONS:
        raise InputError(f"task direction {task.direction!r}: choose from {', '.join(DIRECTIONS)}")
    if not isinstance(task.metric, str) or not task.metric:
        raise InputError(f"task metric must be a non-empty name, not {task.metric!r}")
    return task


def scores_of(task: Task, result: Any, source: str) -> dict[str, float]:
    """A score function's result as ``{metric: float}``: a number is the objective itself; a mapping must
    hold the objective under ``task.metric``. A candidate whose objective is not finite fails."""
    if isinstance(result, Mapping):
        if task.metric not in result:
            given = ", ".join(map(str, result)) or "nothing"
            raise CandidateError(f"{source} returned no {task.metric!r} among {given}")
        items = dict(result)
    else:
        items = {task.metric: result}
    out: dict[str, float] = {}
    for key, value in items.items():
        try:
            out[str(key)] = float(value.item() if isinstance(value, torch.Tensor) else value)
        except (TypeError, ValueError):
            raise CandidateError(f"{source} returned {key}={value!r}, not a number") from None
    if not math.isfinite(out[task.metric]):
        raise CandidateError(f"{source} returned {task.metric} = {out[task.metric]}")
    return out


# -- classification -------------------------------------------------------------------------------


@torch.no_grad()
def classification_metrics(model: nn.Module, batches, forward: Callable[[nn.Module, Any], Any] | None = None,
                           device: torch.device | None = None) -> dict[str, float]:
    """Top-1 ``accuracy`` and mean cross-entropy ``loss`` over every ``(inputs, labels, ...)`` batch."""
    model.eval()
    device = device or next(model.parameters()).device
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss_sum = torch.zeros((), device=device)
    n = 0
    for batch in batches:
        batch = to_device(batch, device)
        output = forward(model, batch) if forward is not None else model(batch[0])
        logits, labels = primary(output).float(), batch[1]
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        n += len(labels)
    if n == 0:
        return {"accuracy": float("nan"), "loss": float("nan")}
    return {"accuracy": float(correct) / n, "loss": float(loss_sum) / n}


class ImageClassificationTask(Task):
    """Image classification on a built-in dataset (:func:`autoprune.data.load_dataset`), top-1 accuracy.

    The splits live on the task's device as uint8 tensors; batches are gathered, augmented (random crop,
    flips where the dataset allows them) and normalised there in one pass, so a fine-tune step costs
    no host work. The loss is cross-entropy on the main prediction (the first output of a model with
    auxiliary heads); ``score`` reports ``accuracy`` and ``loss``.

    Parameters
    ----------
    data: the dataset's train / val / test splits.
    batch_size: samples per training batch (fine-tune, recalibration, criteria).
    eval_batch_size: samples per scoring batch (None: ``EVAL_BATCH_SIZE``, 1000, on an accelerator and
        ``CPU_EVAL_BATCH_SIZE``, 128, on the CPU, where large batches spill the caches: a validation pass
        over Fashion-MNIST's 6000 images with ResNet-20 on one thread took 6.8 s in batches of 1000 and
        4.1 s in batches of 128).
    device: where the splits and batches live (the evaluator moves the task to its own device).
    """

    metric = "accuracy"
    direction = "maximize"
    EVAL_BATCH_SIZE = 1000
    CPU_EVAL_BATCH_SIZE = 128

    def __init__(self, data, *, batch_size: int = 128, eval_batch_size: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        for label, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is None and label == "eval_batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{label} must be a positive integer, got {value!r}")
        self.data = data
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.device = torch.device(device)
        self.name = data.name
        self._example = torch.zeros(1, data.in_channels, data.image_size, data.image_size, device=self.device)

    def to(self, device: torch.device | str) -> ImageClassificationTask:
        if torch.device(device) == self.device:
            return self
        return ImageClassificationTask(self.data, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                                       device=device)

    @property
    def example_inputs(self) -> torch.Tensor:
        return self._example

    def train_batches(self, seed: int, *, augment: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        loader = self.data.loader("train", self.batch_size, self.device, shuffle=True, augment=augment,
                                  generator=generator, drop_last=len(self.data.train) >= self.batch_size)
        return loader.infinite()

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        return F.cross_entropy(primary(output), batch[1])

    @property
    def scoring_batch_size(self) -> int:
        """Samples per scoring batch on the task's device (``eval_batch_size``, or its default there)."""
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return self.CPU_EVAL_BATCH_SIZE if self.device.type == "cpu" else self.EVAL_BATCH_SIZE

    def score(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        loader = self.data.loader(split, self.scoring_batch_size, self.device)
        return classification_metrics(model, loader, device=self.device)

    def has_split(self, split: str) -> bool:
        return split in ("val", "test")

    @property
    def chance(self) -> float:
        labels = self.data.val.y
        return float(torch.bincount(labels).max()) / len(labels)

    def identity(self) -> dict[str, Any]:
        return {"task": "classification", "dataset": self.data.name, "batch_size": self.batch_size,
                "splits": [len(self.data.train), len(self.data.val)]}

    def model_kwargs(self) -> dict[str, int]:
        return {"in_channels": self.data.in_channels, "num_classes": self.data.num_classes,
                "image_size": self.data.image_size}


# -- the user's DataLoaders -----------------------------------------------------------------------


class LoaderTask(Task):
    """A task from the user's DataLoaders, loss and score functions, streamed batch by batch.

    Parameters
    ----------
    train: a ``DataLoader`` of training batches: what the fine-tune, adaptive BN and the data criteria
        read. Its dataset, batch size, collate function, worker processes and transforms are used as
        they are; its sampler is re-seeded per call of :meth:`train_batches` (a random sampler is drawn
        from a generator seeded by the search's seed, and transforms run in the main process draw from
        a seeded random state), so every candidate sees the same batches. Pinned memory is turned on
        when the task is on CUDA.
    val: a ``DataLoader`` that ``score_fn`` reads during the search.
    loss_fn: ``loss_fn(output, batch) -> scalar tensor``, ``output`` being what ``forward_fn`` returned.
    score_fn: ``score_fn(model, loader) -> float`` (the objective), or a mapping holding the objective
        under ``metric`` and any other metrics to record beside it. It is called with the model in eval
        mode under ``torch.no_grad()``; batches are the loader's, on the host: move them to the model's
        device (:func:`autoprune.inputs.to_device`).
    example_inputs: inputs the dependency graph is traced with (a tensor, a tuple or a dict, by
        torch-pruning's convention); one sample or a few.
    test: a ``DataLoader`` for final reports (``score_fn`` on it); never read during a search.
    forward_fn: ``forward_fn(model, batch) -> output`` (default ``model(batch[0])``): models with
        several inputs, or batches that are dicts.
    metric: the objective's name, as ``score_fn`` reports it and the study records it.
    direction: ``"maximize"`` or ``"minimize"``.
    name: the task's name in study names (``<model>-<name>-<agent>-<budget>``).
    model_kwargs: ``in_channels`` / ``num_classes`` / ``image_size`` for building a zoo or factory model.

    An exception or a non-finite value from ``loss_fn``, ``forward_fn`` or ``score_fn`` fails the
    candidate (one failed trial with the reason); the search goes on.
    """

    def __init__(
        self,
        train: DataLoader,
        val: DataLoader,
        *,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        score_fn: Callable[[nn.Module, DataLoader], float | Mapping[str, float]],
        example_inputs: Any,
        test: DataLoader | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        metric: str = "score",
        direction: str = "maximize",
        name: str = "loader",
        model_kwargs: Mapping[str, int] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        for label, loader in (("train", train), ("val", val), ("test", test)):
            if loader is not None and not isinstance(loader, DataLoader):
                raise InputError(f"LoaderTask {label} must be a torch.utils.data.DataLoader, "
                                 f"not {type(loader).__name__}")
        for label, fn in (("loss_fn", loss_fn), ("score_fn", score_fn), ("forward_fn", forward_fn)):
            if fn is not None and not callable(fn):
                raise InputError(f"LoaderTask {label} must be callable, not {type(fn).__name__}")
        if direction not in DIRECTIONS:
            raise InputError(f"LoaderTask direction {direction!r}: choose from {', '.join(DIRECTIONS)}")
        if not tensors(example_inputs):
            raise InputError("LoaderTask example_inputs must hold at least one tensor (a tensor, a tuple or a dict)")
        self.train, self.val, self.test = train, val, test
        self.loss_fn, self.score_fn, self.forward_fn = loss_fn, score_fn, forward_fn
        self.metric, self.direction, self.name = str(metric), direction, str(name)
        self._model_kwargs = dict(model_kwargs or {})
        self.device = torch.device(device)
        self._example = to_device(example_inputs, self.device)

    @classmethod
    def classification(
        cls,
        train: DataLoader,
        val: DataLoader,
        *,
        test: DataLoader | None = None,
        example_inputs: Any = None,
        num_classes: int | None = None,
        label_smoothing: float = 0.0,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        name: str = "classification",
    ) -> LoaderTask:
        """Classification from ``(inputs, labels)`` loaders in one line: cross-entropy on the main
        prediction, top-1 ``accuracy`` (maximised) with the mean ``loss`` recorded beside it.
        ``example_inputs`` default to the first sample of ``val``; ``num_classes`` to the number of
        ``classes`` of the training dataset (an ``ImageFolder`` has them)."""
        if example_inputs is None:
            try:
                example_inputs = first_sample(next(iter(val))[0])
            except StopIteration:
                raise InputError("LoaderTask.classification: the val loader yields no batch") from None
        if num_classes is None and isinstance(getattr(train.dataset, "classes", None), (list, tuple)):
            num_classes = len(train.dataset.classes)
        kwargs: dict[str, int] = {}
        if isinstance(example_inputs, torch.Tensor) and example_inputs.dim() == 4:
            kwargs.update(in_channels=int(example_inputs.shape[1]), image_size=int(example_inputs.shape[-1]))
        if num_classes is not None:
            kwargs["num_classes"] = int(num_classes)

        def loss_fn(output: Any, batch: Any) -> torch.Tensor:
            return F.cross_entropy(primary(output), batch[1], label_smoothing=label_smoothing)

        def score_fn(model: nn.Module, loader: DataLoader) -> dict[str, float]:
            return classification_metrics(model, loader, forward_fn)

        return cls(train, val, loss_fn=loss_fn, score_fn=score_fn, example_inputs=example_inputs, test=test,
                   forward_fn=forward_fn, metric="accuracy", direction="maximize", name=name, model_kwargs=kwargs)

    def to(self, device: torch.device | str) -> LoaderTask:
        device = torch.device(device)
        if device == self.device:
            return self
        moved = object.__new__(LoaderTask)
        moved.__dict__.update(self.__dict__)
        moved.device = device
        moved._example = to_device(self._example, device)
        return moved

    @property
    def example_inputs(self) -> Any:
        return self._example

    def train_batches(self, seed: int, *, augment: bool = True) -> Iterator[Any]:
        """The training loader's batches, epoch after epoch, on the task's device, re-seeded from ``seed``
        (``augment`` cannot turn the loader's own transforms off and is ignored)."""
        pin = self.device.type == "cuda"
        loader = _seeded(self.train, int(seed), pin)
        state = _RandomState(int(seed))
        while True:
            empty = True
            with state.active():
                it = iter(loader)
            while True:
                with state.active():  # transforms run in this process draw from the seeded state
                    batch = next(it, _END)
                if batch is _END:
                    break
                empty = False
                yield to_device(batch, self.device, non_blocking=pin)
            if empty:
                raise InputError("the LoaderTask's train loader yields no batch")

    def forward(self, model: nn.Module, batch: Any) -> Any:
        try:
            return model(batch[0]) if self.forward_fn is None else self.forward_fn(model, batch)
        except (KeyboardInterrupt, torch.OutOfMemoryError):
            raise
        except Exception as e:
            what = "model(batch[0])" if self.forward_fn is None else "forward_fn"
            raise CandidateError(f"{what} raised {_describe(e)}") from e

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        try:
            value = self.loss_fn(output, batch)
        except (KeyboardInterrupt, torch.OutOfMemoryError):
            raise
        except Exception as e:
            raise CandidateError(f"loss_fn raised {_describe(e)}") from e
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise CandidateError(f"loss_fn returned {_shape(value)}, not a scalar tensor")
        return value

    def score(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        loader = {"val": self.val, "test": self.test}.get(split)
        if loader is None:
            raise InputError(f"the LoaderTask has no {split!r} loader" + ("" if split != "test" else
                             "; give LoaderTask(..., test=loader) for final test figures"))
        model.eval()
        try:
            with torch.no_grad():
                result = self.score_fn(model, loader)
        except (KeyboardInterrupt, torch.OutOfMemoryError):
            raise
        except Exception as e:
            raise CandidateError(f"score_fn raised {_describe(e)}") from e
        return scores_of(self, result, "score_fn")

    def has_split(self, split: str) -> bool:
        return split == "val" or (split == "test" and self.test is not None)

    def identity(self) -> dict[str, Any]:
        def size(loader: DataLoader | None) -> int | None:
            try:
                return len(loader.dataset) if loader is not None else None
            except TypeError:
                return None

        return {"task": "loader", "name": self.name, "metric": self.metric, "direction": self.direction,
                "train": size(self.train), "val": size(self.val), "batch_size": self.train.batch_size,
                "loss_fn": _qualname(self.loss_fn), "score_fn": _qualname(self.score_fn)}

    def model_kwargs(self) -> dict[str, int]:
        return dict(self._model_kwargs)


_END = object()


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:80]


def _qualname(fn: Any) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def _seeded(loader: DataLoader, seed: int, pin: bool) -> DataLoader:
    """``loader`` rebuilt with a random sampler drawn from a generator seeded with ``seed`` (worker
    processes take their seeds from it too). A loader over an iterable dataset, or with a batch sampler
    of its own, keeps its order; a sampler of another kind is kept and re-seeded when it has a generator."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return loader
    generator = torch.Generator().manual_seed(seed)
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        sampler = RandomSampler(loader.dataset, replacement=sampler.replacement, num_samples=sampler.num_samples,
                                generator=generator)
    elif hasattr(sampler, "generator"):
        import copy

        sampler = copy.copy(sampler)
        sampler.generator = generator
    extra = {}
    if loader.num_workers > 0:
        extra = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": False,
                 "multiprocessing_context": loader.multiprocessing_context}
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=pin or loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=generator, **extra)


class _RandomState:
    """A private state of torch's, Python's and NumPy's global random generators, swapped in while a
    batch is made in this process, so that random transforms give the same batches for the same seed
    and the training that runs between batches neither disturbs them nor is disturbed."""

    def __init__(self, seed: int) -> None:
        with _saved_random():
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            self._state = _get_random()

    @contextmanager
    def active(self):
        outer = _get_random()
        _set_random(self._state)
        try:
            yield
        finally:
            self._state = _get_random()
            _set_random(outer)


def _get_random():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_random(state) -> None:
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


@contextmanager
def _saved_random():
    state = _get_random()
    try:
        yield
    finally:
        _set_random(state)


# -- a task from a file ----------------------------------------------------------------------------


def load_task(spec: str, **kwargs: Any) -> Task:
    """The task that ``path/to/file.py:factory`` returns (the factory is called with no arguments)."""
    from autoprune.models.registry import load_factory

    factory = load_factory(spec, what="task")
    try:
        task = factory(**kwargs)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"--task {spec} failed: {_describe(e)}") from e
    if not isinstance(task, Task):
        raise InputError(f"--task {spec} returned {type(task).__name__}, not an autoprune.Task")
    return check_task(task)
