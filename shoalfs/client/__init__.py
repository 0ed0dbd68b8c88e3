"""shoalfs client: the Python SDK (sync) over the async core the mount uses."""

from shoalfs.client.core import ClientOptions, VolumeClient
from shoalfs.client.sdk import ShoalFile, StatResult, Volume, connect

__all__ = ["ClientOptions", "ShoalFile", "StatResult", "Volume", "VolumeClient", "connect"]
