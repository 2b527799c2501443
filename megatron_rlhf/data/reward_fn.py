"""Rule-based rewards: a Python function that scores a response, for verifiable tasks.

    ppo:
      reward_fn: path/to/file.py:function

The file is loaded once (relative paths are from the working directory) and the function is
called for every rollout sample as

    function(prompt: str, response: str, record: dict) -> float

with ``record`` the prompt's JSONL line as read (``data.prompts.PromptRecord.record``), so a
reference answer or any metadata can ride along with the prompt. ``response`` is the decoded
response without its eos. The function should be deterministic: resume replays rewards.

What stops the run, before or during training:

* a malformed spec, a file that does not exist or fails to import, a name that is not in the
  file or not callable, a function that cannot take ``(prompt, response, record)``:
  ``ConfigError`` naming the config key, the path and the fix;
* the function raising, or returning something that is not a real number (``bool`` counts as
  0/1) or is NaN/inf: ``DataError`` naming the prompt's ``file:line``, the function and its
  message.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import math
import numbers
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import ConfigError
from .jsonl import data_error
from .prompts import PromptRecord

SPEC_FIX = "give 'path/to/file.py:function_name', e.g. examples/tiny/reward_fn.py:reward"


class RewardFunction:
    """A loaded ``reward_fn``; call it per sample or ``score`` a batch."""

    def __init__(self, spec: str, path: Path, name: str, function: Callable, key: str):
        self.spec, self.path, self.name, self.function, self.key = spec, path, name, function, key

    def __call__(self, prompt: PromptRecord, response: str) -> float:
        """The reward of ``response`` to ``prompt``, a finite float, or a DataError naming ``prompt.where``."""
        try:
            value = self.function(prompt.text, response, prompt.record)
        except Exception as exc:  # the user's code: any exception stops the run with its message
            raise data_error(
                prompt.path, prompt.line,
                f"{self.key} {self.spec} raised {type(exc).__name__}: {exc}{self._user_frame(exc)} "
                f"on the response {_preview(response)}",
                f"fix {self.path.name} so that {self.name}(prompt, response, record) returns a number for every response",
            ) from exc
        if isinstance(value, torch.Tensor) or not isinstance(value, numbers.Real):
            raise data_error(
                prompt.path, prompt.line,
                f"{self.key} {self.spec} returned {type(value).__name__} {_preview(value)}, not a number, "
                f"on the response {_preview(response)}",
                f"return a Python float from {self.name} (e.g. float(x))",
            )
        value = float(value)
        if not math.isfinite(value):
            raise data_error(
                prompt.path, prompt.line,
                f"{self.key} {self.spec} returned {value} on the response {_preview(response)}",
                f"return a finite number from {self.name}",
            )
        return value

    def score(self, prompts: Sequence[PromptRecord], responses: Sequence[str]) -> torch.Tensor:
        """``[len(responses)]`` float32 rewards; ``prompts[i]`` is the prompt of ``responses[i]``."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses; give one prompt per response")
        return torch.tensor([self(p, r) for p, r in zip(prompts, responses)], dtype=torch.float32)

    def _user_frame(self, exc: BaseException) -> str:
        """`` (at file.py:line)`` of the innermost frame in the reward file, when there is one."""
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == self.path]
        return f" (at {self.path}:{frames[-1].lineno})" if frames else ""


def load_reward_fn(spec: str, key: str = "ppo.reward_fn") -> RewardFunction:
    """Import ``path.py:function`` (see module docstring); ``key`` names the setting in errors."""
    file_part, sep, name = spec.rpartition(":")
    if not sep or not file_part or not name.isidentifier():
        raise ConfigError(f"{key}={spec!r} is not 'path:function'; {SPEC_FIX}")
    path = Path(file_part).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{key}={spec}: the file {path} {what} (relative paths are from the working directory {Path.cwd()}); {SPEC_FIX}")
    path = path.resolve()
    module_name = "megatron_rlhf_reward_fn_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{key}={spec}: {path} cannot be imported as Python; {SPEC_FIX}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling in the file look their module up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise ConfigError(f"{key}={spec}: importing {path} failed{where}: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, name, None)
    if function is None:
        defined = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module_name]
        close = difflib.get_close_matches(name, defined, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"functions defined there: {', '.join(defined) or 'none'}"
        raise ConfigError(f"{key}={spec}: {path} has no function {name!r}; {hint}")
    if not callable(function):
        raise ConfigError(f"{key}={spec}: {name} in {path} is a {type(function).__name__}, not a function")
    try:
        inspect.signature(function).bind("prompt", "response", {})
    except TypeError as exc:
        raise ConfigError(f"{key}={spec}: {name} must accept (prompt: str, response: str, record: dict), but {exc}") from None
    except ValueError:  # a builtin without a signature: let the first call tell
        pass
    return RewardFunction(spec, path, name, function, key)


def _preview(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
