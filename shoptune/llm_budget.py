"""What a run may spend: prices per model, the cost of tokens, and the max_cost / max_requests caps."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Budget:
    max_cost: float | None = None  # dollars, this run
    max_requests: int | None = None  # new requests sent, this run
    prices: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # model: ($/1M in, $/1M out)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        price_in, price_out = self.prices.get(model, (0.0, 0.0))
        return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6

    def stop(self, sent: int, spent: float, committed: float, worst_cost: float) -> str | None:
        """Why a new request may not start, or None: "max_requests" when `sent` requests are this run's
        share; "max_cost" when the cost `spent`, the worst case `committed` to requests started and not
        finished, and this request's `worst_cost` could pass max_cost."""
        if self.max_requests is not None and sent >= self.max_requests:
            return "max_requests"
        if self.max_cost is not None:
            if spent + committed + worst_cost > self.max_cost:
                return "max_cost"
        return None
