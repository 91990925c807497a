"""Double Sparsity-Offload: full K/V in host memory, labels on the device, next-layer prefetch.

`SparsityConfig(offload=True)` makes `doublesparse.make_cache` build an `OffloadCache`, and with
`prefetch=True` layer i copies layer i+1's predicted rows in ahead. The package's rooms, in the order
they depend on one another:
- `host_memory`: free RAM, store sizes (pinned rounding) and the budget checked before allocating;
- `host_store`: token-major host storage and the host-stored layer/cache bases;
- `selection`: one step's selection split into device-window slots and host rows, and its recall;
- `attention`: the offload attention step;
- `cache`: `OffloadLayer` and `OffloadCache`;
- `prefetch`: next-layer query prediction, its hooks, and the `Prefetcher` that copies ahead.
"""

from .cache import DeviceBuffers, OffloadCache, OffloadLayer
from .host_memory import (
    GIB,
    HostMemoryBudget,
    available_host_memory,
    host_kv_bytes,
    host_store_bytes,
    pinned_host_stores,
)
from .host_store import HostStoredCache, HostStoredLayer, TokenBuffer, gather_rows
from .prefetch import PendingPrefetch, Prefetcher, QueryPredictor, install_prefetch_hooks, query_predictors
from .selection import HostSelection, selection_recall, step_selection

__all__ = [
    "GIB",
    "DeviceBuffers",
    "HostMemoryBudget",
    "HostSelection",
    "HostStoredCache",
    "HostStoredLayer",
    "OffloadCache",
    "OffloadLayer",
    "PendingPrefetch",
    "Prefetcher",
    "QueryPredictor",
    "TokenBuffer",
    "available_host_memory",
    "gather_rows",
    "host_kv_bytes",
    "host_store_bytes",
    "install_prefetch_hooks",
    "pinned_host_stores",
    "query_predictors",
    "selection_recall",
    "step_selection",
]
