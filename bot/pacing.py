"""Pacing the streamed edits of replies: one budget of edits shared by every reply shown at once.

Each reply may be edited once per ``PipelineOptions.progress_interval``; with many replies
streaming at once that adds up beyond what the platforms take. Slack allows ``chat.update``
some 50 calls a minute per workspace (Web API tier 3), Discord 50 requests a second per bot in
all. The pipeline therefore gives all replies of one workspace a token bucket of edits: a reply
alone is edited as often as before, many at once share the budget, and an edit the budget
cannot pay for is skipped (the next one shows the newer text; the final text always goes out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

#: The edits a full budget pays for at once, before its rate applies.
PROGRESS_EDIT_BURST = 3


@dataclass
class EditBudget:
    """A token bucket: ``rate`` edits a second, at most ``burst`` saved up (``rate`` 0: no
    limit)."""

    rate: float
    burst: int = PROGRESS_EDIT_BURST
    tokens: float = field(init=False)
    refilled_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now: float | None = None) -> bool:
        """Spend one edit if the budget has it."""
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.refilled_at) * self.rate)
        self.refilled_at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class EditBudgets:
    """One :class:`EditBudget` per platform and workspace."""

    def __init__(self, *, rate: float) -> None:
        self.rate = rate
        self._budgets: dict[tuple[str, str], EditBudget] = {}

    def take(self, *, platform: str, workspace: str) -> bool:
        key = (platform, workspace)
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = EditBudget(rate=self.rate)
        return budget.take()
