"""Load a user's ``path/to/file.py:factory`` spec, as used by ``blazec dump``.

The factory takes no arguments and returns ``(model, example_inputs)``: an ``nn.Module`` and
a tuple or list of inputs for ``model(*example_inputs)``. Every way this can go wrong is a
:class:`FactoryError` with a one-line message, which the CLI prints without a traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch


class FactoryError(Exception):
    """The model file or factory could not be loaded or returned the wrong thing."""


DEFAULT_FACTORY = "make"


SPEC_FORM = "path/to/file.py[:function]"


def parse_spec(spec: str) -> tuple[Path, str]:
    if not spec.strip():
        raise FactoryError(f"empty model spec; expected {SPEC_FORM}")
    path, sep, name = spec.rpartition(":")
    if not sep or Path(spec).is_file() or len(path) == 1:
        # no ":function" part (a file whose name has a colon, or a Windows drive letter)
        path, name = spec, DEFAULT_FACTORY
    elif ":" in path and not Path(path).exists():
        raise FactoryError(f"invalid model spec {spec!r}: more than one ':'; expected {SPEC_FORM}")
    if not name.isidentifier():
        raise FactoryError(f"invalid factory name {name!r} in {spec!r}; expected {SPEC_FORM}")
    return Path(path), name


def load_factory(spec: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """Import the file, call the factory, and check what it returned."""
    path, name = parse_spec(spec)
    if path.is_dir():
        raise FactoryError(f"model file {path} is a directory; give a .py file (path/to/file.py[:factory])")
    if not path.is_file():
        raise FactoryError(f"model file not found: {path}")
    if path.suffix != ".py":
        raise FactoryError(f"model file must be a .py file: {path}")
    module_name = f"blazec_user_{path.stem}"
    file_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(file_spec)
    # The file's own folder goes on sys.path so it can import its neighbours, as `python file.py` would.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        sys.modules[module_name] = module
        file_spec.loader.exec_module(module)
    except SystemExit as e:  # sys.exit() at import would end blazec with the file's status, silently
        sys.modules.pop(module_name, None)
        raise FactoryError(f"could not load {path}: it called sys.exit({e.code!r}) on import") from None
    except Exception as e:  # noqa: BLE001 - any import failure is the user's file, reported in one line
        sys.modules.pop(module_name, None)
        raise FactoryError(f"could not load {path}: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.resolve().parent))

    fn = getattr(module, name, None)
    if fn is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        raise FactoryError(f"no function {name!r} in {path} (functions found: {', '.join(found) or 'none'})")
    if not callable(fn):
        raise FactoryError(f"{path}:{name} is not callable")
    try:
        result = fn()
    except SystemExit as e:
        raise FactoryError(f"factory {path}:{name} called sys.exit({e.code!r})") from None
    except Exception as e:  # noqa: BLE001
        raise FactoryError(f"factory {path}:{name} raised {type(e).__name__}: {e}") from e
    return check_factory_result(result, f"{path}:{name}")


def check_factory_result(result: Any, where: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    expected = "expected (model: nn.Module, example_inputs: tuple or list)"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise FactoryError(f"factory {where} returned {type(result).__name__}; {expected}")
    model, inputs = result
    if not isinstance(model, torch.nn.Module):
        raise FactoryError(f"factory {where} returned a model of type {type(model).__name__}; {expected}")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise FactoryError(f"factory {where} returned example_inputs of type {type(inputs).__name__}; {expected}")
    return model, tuple(inputs)
