"""User-facing errors: each names what was wrong and how to fix it.

The CLI prints `UserError`s as one line and exits with code 2; the library raises them so a
notebook or a server can catch them. They subclass ValueError so plain `except ValueError`
code keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
  """Bad input from the user (arguments, files, prompts). The message says the fix."""


class ModelFileError(UserError):
  """A model file or folder is missing, truncated, corrupt or of an unsupported architecture."""
