"""User-facing errors: each names what was wrong and how to fix it.

The CLI prints `UserError`s as one line and exits with code 2; the library raises them so a
notebook or a server can catch them. They subclass ValueError so plain `except ValueError`
code keeps working. XLA's out-of-memory error becomes a `DeviceMemoryError` that says what to
ask for less of: the library's calls raise it (`device_memory_errors`, their parameters'
names), the command lines print it as their one line (`as_user_error`, their flags' names).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(ValueError):
  """Bad input from the user (arguments, files, prompts). The message says the fix."""


class ModelFileError(UserError):
  """A model file or folder is missing, truncated, corrupt or of an unsupported architecture."""


class DeviceMemoryError(UserError):
  """The device ran out of memory for what was asked (XLA's RESOURCE_EXHAUSTED): the message
  says what to ask for less of."""


# JAX's GPU client takes 75% of the device's memory up front by default.
GPU_MEMORY_HINT = ("; JAX takes 75% of the GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION"
                   " (e.g. 0.9) allows more")


def as_user_error(e: BaseException, memory_advice: str) -> UserError | None:
  """The error a command line prints as its one `error:` line for `e`: e itself when it is a
  UserError, a DeviceMemoryError with `memory_advice` when it is XLA's out-of-memory error (on
  any device), None for anything else (a bug: it should raise with its traceback)."""
  import jax

  if isinstance(e, DeviceMemoryError) and isinstance(e.__cause__, jax.errors.JaxRuntimeError):
    e = e.__cause__  # a library call's advice names its parameters: say the command's flags
  if isinstance(e, UserError):
    return e
  text = str(e).strip()
  if isinstance(e, jax.errors.JaxRuntimeError) and text.startswith("RESOURCE_EXHAUSTED"):
    first = text.splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ")
    hint = GPU_MEMORY_HINT if jax.default_backend() == "gpu" else ""
    return DeviceMemoryError(f"the device ran out of memory ({first}); {memory_advice}{hint}")
  return None


@contextlib.contextmanager
def device_memory_errors(memory_advice: str) -> Iterator[None]:
  """Inside, XLA's out-of-memory error raises as a DeviceMemoryError (from it) that ends with
  `memory_advice`; every other error passes unchanged."""
  import jax

  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    error = as_user_error(e, memory_advice)
    if error is None:
      raise
    raise error from e


def cli_error(e: BaseException, memory_advice: str) -> int:
  """A command line's `except Exception` in its main: prints `as_user_error(e, memory_advice)`
  as the one `error:` line on stderr and returns exit code 2; anything else re-raises (a bug
  keeps its traceback)."""
  error = as_user_error(e, memory_advice)
  if error is None:
    raise e
  print(f"error: {error}", file=sys.stderr)
  return 2
