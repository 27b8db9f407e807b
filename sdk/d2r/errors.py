"""Exception families of d2r.

Every error the SDK raises on purpose derives from :class:`D2RError`, so an application can
catch the whole family in one place. Each family also derives from the built-in exception a
Python user would expect (``ValueError`` for bad arguments, ``OSError``-free for files, so that
``except ValueError`` keeps working in code that does not know about d2r).
"""


class D2RError(Exception):
    """Base class of every error raised by d2r."""


class InputError(D2RError, ValueError):
    """An argument has the wrong type, shape, dtype or value; the message names it."""


class CodebookError(D2RError, ValueError):
    """A codebook file or codebook argument is unusable (bad file, wrong dimension...)."""


class IndexFormatError(D2RError, ValueError):
    """An index file is corrupt, truncated, of an unknown version or does not match its use."""


class ModelError(D2RError, RuntimeError):
    """A model file or runtime cannot be loaded or run."""


class ImageError(D2RError, ValueError):
    """An image cannot be decoded or is unusable (corrupt, truncated, empty, too large)."""


class BundleError(D2RError, ValueError):
    """A bundle folder is missing files, altered, of an unknown version or inconsistent."""


class ArchiveError(D2RError, ValueError):
    """A bundle or delta archive is malformed, unsafe (paths outside the bundle) or does not
    match its bundle.json."""


class SyncError(D2RError, RuntimeError):
    """A sync could not complete (server unreachable, refused, corrupt or unverifiable data).
    The active bundle is unchanged when this is raised."""


class SignatureError(SyncError):
    """TUF refused the repository's metadata: not signed by the keys of the pinned root, a
    rollback to older metadata, or a target that does not match its signed length and hashes."""


class StaleMetadataError(SyncError):
    """The repository's TUF metadata has expired (a freeze: the server or a mirror keeps serving
    old metadata, or stopped re-signing). The active bundle is kept; ``version`` is it and
    ``stale_seconds`` how long ago the device last verified fresh metadata (None: never)."""

    def __init__(self, message: str, version: int | None, stale_seconds: float | None):
        super().__init__(message)
        self.version = version
        self.stale_seconds = stale_seconds


# Errors of the lab tools (d2r_lab): here too, so that every error class of d2r is in one module.
class DatasetError(InputError):
    """A dataset folder is malformed: missing or invalid ``gnd.json``, missing images."""


class DownloadError(D2RError, OSError):
    """A file could not be downloaded (network, server answer); the message names the URL."""


class ChecksumError(D2RError, ValueError):
    """A downloaded file's sha256 differs from the expected one; the message names the file."""
