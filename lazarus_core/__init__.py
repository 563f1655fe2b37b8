"""lazarus-core: routing analysis, expert-weight structure and overlay compression for MoE models.

Importing the package needs no GPU, network or triton; heavy modules load on first use.
"""

from importlib import metadata as _metadata

from lazarus_core.errors import BackendUnavailableError

try:
    __version__ = _metadata.version("lazarus-core")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["BackendUnavailableError", "__version__"]
