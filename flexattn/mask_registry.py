"""The registry the torch.compile path finds a BlockMask's traced mask in.

Under torch.compile, `flexattn.compiled` receives a BlockMask's tensors as graph inputs and
its `mask_key`, a str that dynamo guards by value; the traced mask (without its captured
tensors) is found here by that key. So a new BlockMask of the same mask structure (a new
document layout, say) reuses the compiled graph. `BlockMask.__init__` registers its mask
explicitly with `register_mask_template`.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional

from .ir import Graph

# mask_key -> the traced mask without its captured tensors (least recently registered
# evicted first)
_MASK_TEMPLATES: "OrderedDict[str, Graph]" = OrderedDict()
_MASK_TEMPLATES_MAX = 1024


def register_mask_template(graph: Optional[Graph]) -> str:
    """The key of `graph`'s structure ("" for None), registering the graph under it."""
    if graph is None:
        return ""
    key = hashlib.sha256(graph.structure_key().encode()).hexdigest()[:20]
    if key not in _MASK_TEMPLATES:
        _MASK_TEMPLATES[key] = graph._with_buffers([])
        while len(_MASK_TEMPLATES) > _MASK_TEMPLATES_MAX:
            _MASK_TEMPLATES.popitem(last=False)
    return key


def mask_template(key: str) -> Optional[Graph]:
    """The registered mask graph (without captured tensors) of `key`, or None."""
    return _MASK_TEMPLATES.get(key)
