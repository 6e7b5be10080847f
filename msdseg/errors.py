"""Exceptions a user can act on: each message names the file or subject and the fix."""


class MsdsegError(Exception):
    """Base class of every error msdseg raises on purpose: catch this one to catch them all."""


class ConfigError(MsdsegError, ValueError):
    """A config value is wrong; the message names the key and what to do (a ValueError too, as before)."""


class PlanError(ConfigError):
    """The plan cannot fit the device or the budget; the message names the numbers and the key."""


class DiskFullError(MsdsegError, OSError):
    """The disk filled while writing an output; nothing half-written was left (an OSError with ENOSPC too)."""


class DownloadError(MsdsegError):
    """The archive could not be fetched (network, HTTP status, truncated transfer)."""


class ChecksumError(MsdsegError):
    """The archive's digest is not the expected one."""


class ArchiveError(MsdsegError):
    """The archive is unreadable or hostile (members outside the target, links)."""


class DatasetError(MsdsegError):
    """dataset.json is missing, malformed, or lists files that are not there."""


class SubjectError(MsdsegError):
    """One subject's files are unreadable or inconsistent (shape, geometry, labels, NaN)."""

    def __init__(self, subject: str, path: str, problem: str) -> None:
        self.subject = subject
        self.path = path
        self.problem = problem
        super().__init__(f"subject {subject}: {path}: {problem}")


class ModelError(MsdsegError):
    """A checkpoint does not fit the task (labels, channels) or cannot be loaded."""
