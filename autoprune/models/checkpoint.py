"""Load a trained state dict into a model, safely (``weights_only=True``) and strictly."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from autoprune.errors import InputError

__all__ = ["load_checkpoint"]

# Where training scripts commonly nest the state dict inside a larger checkpoint dict.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")
_DATA_PARALLEL_PREFIX = "module."


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load the state dict saved at ``path`` into ``model`` in place, strictly.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``, so it must
    hold tensors, not pickled objects. Accepted layouts: a plain state dict, or a dict whose
    ``"state_dict"``, ``"model"`` or ``"model_state_dict"`` entry is one. A ``"module."`` prefix
    on every key (``nn.DataParallel``) is removed.

    Raises:
        InputError: the file is missing, is not loadable with ``weights_only=True``, holds no state
            dict, or its keys or shapes do not match ``model``'s.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint file {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"checkpoint {str(path)!r} is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise InputError(
                f"checkpoint {str(path)!r} cannot be loaded with weights_only=True (it pickles objects, "
                "e.g. a whole model); it must be a state dict: torch.save(model.state_dict(), path)"
            ) from exc
        raise InputError(f"checkpoint {str(path)!r} is not a PyTorch checkpoint: {_first_line(exc)}") from exc
    except Exception as exc:
        raise InputError(f"checkpoint {str(path)!r} is not a PyTorch checkpoint: {_first_line(exc)}") from exc

    state_dict = _find_state_dict(payload)
    if state_dict is None:
        keys = (
            ", ".join(map(str, list(payload)[:8])) if isinstance(payload, Mapping) else type(payload).__name__
        )
        raise InputError(
            f"checkpoint {str(path)!r} holds no state dict (found: {keys}); expected a dict of tensors "
            f"or a dict with one under {' / '.join(map(repr, _NESTED_KEYS))}"
        )
    if state_dict and all(key.startswith(_DATA_PARALLEL_PREFIX) for key in state_dict):
        state_dict = {key[len(_DATA_PARALLEL_PREFIX) :]: value for key, value in state_dict.items()}

    mismatch = _describe_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise InputError(f"checkpoint {str(path)!r} does not fit the model: {mismatch}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise InputError(f"checkpoint {str(path)!r} does not fit the model: {_first_line(exc)}") from exc


def _find_state_dict(payload: object) -> dict[str, torch.Tensor] | None:
    if not isinstance(payload, Mapping):
        return None
    if _is_state_dict(payload):
        return dict(payload)
    for key in _NESTED_KEYS:
        nested = payload.get(key)
        if isinstance(nested, Mapping) and _is_state_dict(nested):
            return dict(nested)
    return None


def _is_state_dict(mapping: Mapping) -> bool:
    return all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in mapping.items())


def _describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """Count missing, unexpected and differently shaped keys and name the first of each; '' if none."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [key for key in expected if key in found and found[key].shape != expected[key].shape]
    parts = []
    if missing:
        parts.append(f"{_count(missing, 'key')} missing (first {missing[0]!r})")
    if unexpected:
        parts.append(f"{_count(unexpected, 'key')} unexpected (first {unexpected[0]!r})")
    if reshaped:
        key = reshaped[0]
        shapes = f"checkpoint {tuple(found[key].shape)}, model {tuple(expected[key].shape)}"
        parts.append(f"{_count(reshaped, 'key')} with another shape (first {key!r}: {shapes})")
    return "; ".join(parts)


def _count(items: list[str], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def fingerprint(model: nn.Module) -> str:
    """A digest of the model's state dict: the same weights give the same fingerprint wherever they were
    loaded from; retrained weights give another."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
