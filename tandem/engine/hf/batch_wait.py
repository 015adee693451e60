"""How long an idle engine waits for the rest of a burst before its first step: the quiet gap.

Requests a client sends together reach a worker some way apart: the frontend takes them in one at a
time, and on a busy host its process is not always on a core (arrivals 1-4 ms apart on 2 cores, at
times 10). The batch wait ends once no request came for the quiet gap; one that comes later misses
the step and waits a whole one for its prefill (+100-120 ms TTFT on 2 cores). A fixed gap fits one
host's spread and not another's, so the gap learns: it grows to cover the arrival gaps it saw inside
bursts and the near misses it saw right after them, and shrinks back (by a tenth a burst) when
bursts come tight again. It never exceeds its share of a recent step, which is what a lone request
pays at most.
"""

from __future__ import annotations

from dataclasses import dataclass

BASE_GAP_S = 0.003
STEP_SHARE = 0.075  # the gap is at most this share of a recent forward pass
MARGIN = 1.5  # the learned gap covers the widest gap or lateness seen, times this
DECAY = 0.9  # a burst that came tight and whole shrinks the learned gap by this factor


@dataclass(slots=True)
class _Window:
    last_arrival_s: float  # the wait's last arrival
    ended_s: float  # when the wait ended
    max_gap_s: float  # the most the gap could have been (step share, batch_wait_ms)
    widest_s: float  # the widest gap between two of the wait's arrivals


class QuietGap:
    """The batch wait's quiet gap, learnt from the bursts an engine sees; used on its step thread only."""

    def __init__(self, base_s: float = BASE_GAP_S, step_share: float = STEP_SHARE) -> None:
        self.base_s = base_s
        self.step_share = step_share
        self.learned_s = 0.0
        self._window: _Window | None = None
        self._late_s = 0.0  # the latest near miss of the window

    def limit_s(self, recent_step_s: float, limit_s: float) -> float:
        """The most the gap may be: its share of a recent step, and the whole wait's limit."""
        return min(self.step_share * recent_step_s, limit_s)

    def gap_s(self, recent_step_s: float, limit_s: float) -> float:
        return min(max(self.base_s, self.learned_s), self.limit_s(recent_step_s, limit_s))

    def gathered(self, arrivals_s: list[float], ended_s: float, max_gap_s: float) -> None:
        """A wait ended at ``ended_s`` with requests that arrived at ``arrivals_s`` (in order)."""
        if not arrivals_s:
            return
        widest = max((b - a for a, b in zip(arrivals_s, arrivals_s[1:], strict=False)), default=0.0)
        self._window = _Window(arrivals_s[-1], ended_s, max_gap_s, widest)
        self._late_s = 0.0

    def arrived(self, arrival_s: float) -> None:
        """A request reached the engine after the wait: a near miss if a longer gap would have caught it."""
        window = self._window
        if window is None or arrival_s <= window.ended_s:
            return
        late = arrival_s - window.last_arrival_s
        if late <= window.max_gap_s:
            self._late_s = max(self._late_s, late)

    def settle(self) -> None:
        """The step after the wait is over and what came meanwhile has arrived: learn from the burst."""
        window, self._window = self._window, None
        if window is None:
            return
        if self._late_s:
            learned = max(self.learned_s, MARGIN * self._late_s)
        else:
            learned = max(MARGIN * window.widest_s, DECAY * self.learned_s)
        self.learned_s = min(learned, window.max_gap_s)
        self._late_s = 0.0
