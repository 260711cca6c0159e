"""kvmig: live migration of paged KV caches between inference engines.

An engine subclasses ``kvmig.CachePager`` (the nine methods, plus optional
ones), embeds a ``kvmig.Agent`` serving it, and moves requests with
``agent.migrate(to=..., seqs=[...])``. ``kvmig.regions`` describes the
engine's per-layer KV tensors so kvmig reads and writes them in place.
The contract is the section "Python" of DESIGN.md.
"""

from kvmig._kvmig import (
    Agent,
    CacheMeta,
    CachePager,
    Client,
    Cluster,
    Error,
    LogicalSeq,
    StridedRegion,
    built_transports,
    preset_meta,
    validate_layout,
)
from kvmig._regions import regions, torch_device_copies

__all__ = [
    "Agent",
    "CacheMeta",
    "CachePager",
    "Client",
    "Cluster",
    "Error",
    "LogicalSeq",
    "StridedRegion",
    "built_transports",
    "preset_meta",
    "regions",
    "torch_device_copies",
    "validate_layout",
]
__version__ = "0.1.0"
