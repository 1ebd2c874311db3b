"""Exception classes, defined once here and raised by every backend.

The C++ core looks these classes up by name, so each one keeps its name for good. Every public
exception (and warning) of the package lives here; the modules that raise one re-export it where
users imported it before (``discomfort.distributed.ServerDiedError`` is this module's class).
"""

from __future__ import annotations

import errno as _errno
from typing import Any as _Any, Mapping as _Mapping

__all__ = [
    "DiscomfortError",
    "UnknownKeyError",
    "UnknownRunError",
    "RunFinishedError",
    "InvalidKeyError",
    "InvalidRunIdError",
    "StoreFullError",
    "DiskFullError",
    "CorruptedStoreError",
    "TruncatedStoreError",
    "StoreAccessError",
    "UnsafeDirectoryError",
    "StoreClosedError",
    "UnsupportedPlatformError",
    "ReferenceUnavailableError",
    "SerializationError",
    "WorkflowError",
    "NodeExecutionError",
    "PromptValidationError",
    "ComfyConnectionError",
    "UnsupportedWorkflowError",
    "RunCancelled",
    "RunInterrupted",
    "PromptNotAllowedError",
    "AuthenticationError",
    "RemoteLimitError",
    "RecipeError",
    "WidgetMismatchError",
    "ValueLostError",
    "ServerDiedError",
    "InvalidName",
    "BackendUnavailableError",
    "CommandError",
    "TransportWarning",
]


class DiscomfortError(Exception):
    """Base class of every error this package raises on purpose."""


class UnknownKeyError(DiscomfortError, KeyError):
    """No object is stored under the key in this run."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class UnknownRunError(DiscomfortError, LookupError):
    """No run of that id exists on this machine (or it is not ours)."""


class RunFinishedError(UnknownRunError):
    """The run exists but has ended: its data is being or has been released."""


class InvalidKeyError(DiscomfortError, ValueError, TypeError):
    """A key that is empty, not a str, longer than 255 UTF-8 bytes, or holds NUL."""


class InvalidRunIdError(DiscomfortError, ValueError):
    """A run id that is not 1-64 characters of [A-Za-z0-9_-]."""


class StoreFullError(DiscomfortError, MemoryError):
    """Neither tier can hold the object (or the object table is full)."""


class DiskFullError(DiscomfortError, OSError):
    """The disk tier's filesystem is full (ENOSPC)."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1:
            super().__init__(_errno.ENOSPC, args[0])
        else:
            super().__init__(*args)

    def __str__(self) -> str:
        return str(self.strerror if self.strerror is not None else super().__str__())


class CorruptedStoreError(DiscomfortError):
    """A segment that is not ours, of another format version, truncated or damaged."""


class TruncatedStoreError(CorruptedStoreError):
    """A run's file (a RAM chunk, a disk object, the control segment) is shorter than the store
    says: another process of the user cut it. Guarded loads (`Store.get_guarded`, the ComfyUI
    nodes' loads) raise it instead of dying of SIGBUS."""


class StoreAccessError(DiscomfortError, PermissionError):
    """The segment belongs to another user: its data is never read."""


class UnsafeDirectoryError(StoreAccessError):
    """A disk-tier directory another local user could change (not ours or root's, group- or
    world-writable without the sticky bit, a symbolic link, not a directory): refused before
    anything is written there. The message says what to change."""


class StoreClosedError(DiscomfortError, ValueError):
    """An operation on a store handle that was closed or destroyed."""


class UnsupportedPlatformError(DiscomfortError, OSError):
    """What needs a shared (cross-process) store where there is none: attaching from another
    process a run kept in its creator's process-local store (every run on Windows), or
    ``store="shared"`` on Windows. The message says what works: ComfyUI in the same process, or
    the HTTP transport to a ComfyUI server."""


class ReferenceUnavailableError(DiscomfortError):
    """A value saved by reference was loaded from a process that does not own it."""


class SerializationError(DiscomfortError, TypeError):
    """A value saved with pass_by="val" could not be serialized."""


class PromptNotAllowedError(DiscomfortError, PermissionError):
    """A ComfyUI prompt the run's orchestrator did not queue tried to use the run."""


class AuthenticationError(DiscomfortError, PermissionError):
    """A server refused a request's credentials (HTTP 401/403): no or a wrong secret or token."""


class RemoteLimitError(DiscomfortError):
    """A server refused a request over one of its limits (HTTP 413, 429 or 503)."""


class WorkflowError(DiscomfortError):
    """Base class of the errors about workflows and running them in ComfyUI."""


class NodeExecutionError(WorkflowError):
    """A node of a workflow failed while ComfyUI executed it."""

    def __init__(self, node_id: object, class_type: object, message: object, *, details: object = None) -> None:
        super().__init__(node_id, class_type, message)
        self.node_id = None if node_id is None else str(node_id)
        self.class_type = None if class_type is None else str(class_type)
        self.message = str(message)
        self.details = details

    def __str__(self) -> str:
        return f"node {self.node_id} ({self.class_type}) failed: {self.message}"


class PromptValidationError(WorkflowError):
    """ComfyUI rejected a prompt before running it (unknown node, wrong input types...)."""

    def __init__(self, message: object, node_errors: object = None, error: object = None) -> None:
        super().__init__(message)
        self.node_errors = node_errors or {}
        self.error = error

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ComfyConnectionError(WorkflowError):
    """ComfyUI could not be reached, started, or stopped answering."""


class UnsupportedWorkflowError(WorkflowError, ValueError):
    """A workflow uses a feature this package cannot convert or run."""


class _WhereCut(BaseException):
    """Where a run was stopped: shared by :class:`RunCancelled` and :class:`RunInterrupted`."""

    def __init__(self, message: object, *, run_id: str | None = None, iteration: int | None = None,
                 iterations: int | None = None, workflow: int | None = None, workflow_name: str | None = None,
                 inside: bool = False) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.iteration = iteration  # 0-based
        self.iterations = iterations
        self.workflow = workflow  # 0-based index in the workflows given
        self.workflow_name = workflow_name
        self.inside = inside  # True: cut while that workflow ran; False: before it started

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RunCancelled(_WhereCut, WorkflowError):
    """A run was stopped by ``CancelToken.cancel()``; its attributes say where it was cut."""


class RunInterrupted(_WhereCut, KeyboardInterrupt):
    """A run was stopped by Ctrl-C (a KeyboardInterrupt); its attributes say where it was cut.

    A KeyboardInterrupt, not an Exception, so ``except Exception`` does not swallow a Ctrl-C.
    """


class RecipeError(WorkflowError):
    """A reference that cannot be rebuilt elsewhere: the error names the key and the node."""


class WidgetMismatchError(UnsupportedWorkflowError):
    """A saved widget value that cannot belong to its widget: ``widgets_values`` do not line up.

    The frontend would send it anyway (the server then rejects it, or runs something else).
    ``node_id``, ``node_type``, ``input`` and ``value`` say where and what.
    """

    def __init__(self, node: _Mapping, input_name: str, value: _Any, message: str):
        super().__init__(message)
        self.node_id, self.node_type = str(node.get("id")), node.get("type")
        self.input, self.value = input_name, value


class ValueLostError(UnknownKeyError):
    """The key exists but Ray lost its value: the process that owned it (or its node) died."""


class ServerDiedError(ComfyConnectionError):
    """A pool's ComfyUI server (or its actor) died while it ran a workflow."""


class InvalidName(DiscomfortError):
    """A name that is not a plain relative name inside its folder (answered 400)."""


class BackendUnavailableError(ImportError):
    """The requested backend cannot be loaded."""


class CommandError(Exception):
    """A problem the user can fix, said in one line (no traceback)."""


class TransportWarning(UserWarning):
    """Shown once per run_sequential call that moves its values over HTTP."""
