"""How tokens are routed to experts when timing a batch: a setting, parsed and checked here, drawn in ``inputs``.

``uniform`` is vLLM's own benchmark assumption (each token's top-k spread evenly over the global
experts); ``zipf:<s>`` skews expert popularity by a Zipf law of exponent ``s`` for what-if tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError

MAX_ZIPF = 10.0  # beyond this nearly every token goes to the same top-k experts


@dataclass(frozen=True)
class Routing:
    kind: str = "uniform"  # "uniform" or "zipf"
    zipf_s: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Routing:
        if text == "uniform":
            return cls()
        if text.startswith("zipf:"):
            try:
                s = float(text[5:])
            except ValueError:
                s = math.nan
            if math.isfinite(s) and 0 < s <= MAX_ZIPF:
                return cls("zipf", s)
        raise UsageError(f"--routing {text!r}: use uniform or zipf:<s> with 0 < s <= {MAX_ZIPF:g} (e.g. zipf:1.2)")
