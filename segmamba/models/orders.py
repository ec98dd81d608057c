"""The three token orders that tri-orientated Mamba scans (docs/design.md §4).

Tokens are the flattened (depth, height, width) feature map, depth outermost, laid out along the
last axis of a (batch, channels, L) tensor; depth is the slice axis of the inter-slice order. The
orders are defined by the kernel library, whose ops walk them in place; ``to_order`` /
``from_order`` materialise an order (tests, reference computations).
"""

from segmamba_kernels import ORDERS, from_order, to_order

__all__ = ["ORDERS", "from_order", "to_order"]
