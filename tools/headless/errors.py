"""Errors of the headless runner and the exit codes the command line returns for them."""
from __future__ import annotations

EXIT_OK = 0
EXIT_EXECUTION = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_CONNECTION = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------

class HeadlessError(Exception):
    """Base error; ``exit_code`` is what the CLI returns for it."""
    exit_code = EXIT_USAGE


class ConversionError(HeadlessError):
    """The workflow file cannot be read or converted."""
    exit_code = EXIT_USAGE


class OverrideError(HeadlessError):
    """A --seed/--ckpt/--set override does not apply to the graph."""
    exit_code = EXIT_USAGE


class PromptRejected(HeadlessError):
    """POST /prompt answered 400; ``response`` holds the server's JSON body."""
    exit_code = EXIT_REJECTED

    def __init__(self, message: str, response: dict | None = None):
        super().__init__(message)
        self.response = response or {}


class ServerConnectionError(HeadlessError):
    exit_code = EXIT_CONNECTION


class ExecutionFailed(HeadlessError):
    exit_code = EXIT_EXECUTION


class RunTimeout(HeadlessError):
    exit_code = EXIT_TIMEOUT
