"""Charts drawn on the server as inline SVG: no JavaScript, nothing to load."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape


@dataclass(frozen=True, slots=True)
class HourBars:
    """One hour of the activity chart."""

    hour: datetime
    messages: int
    replies: int


WIDTH = 720
HEIGHT = 180
BOTTOM = 22  # room for the hour labels
TOP = 18  # room for the scale's label


def activity_chart(hours: Sequence[HourBars]) -> Markup:
    """Messages in and replies out per hour, side by side, oldest hour on the left."""
    if not hours:
        return Markup('<p class="muted">No activity yet.</p>')
    peak = max(max(h.messages, h.replies) for h in hours) or 1
    slot = WIDTH / len(hours)
    bar = max(1.0, slot * 0.38)
    usable = HEIGHT - BOTTOM - TOP
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="Messages and replies per hour">',
        f'<line class="axis" x1="0" y1="{HEIGHT - BOTTOM}" x2="{WIDTH}" y2="{HEIGHT - BOTTOM}"/>',
    ]
    for index, hour in enumerate(hours):
        x = index * slot + slot * 0.1
        label = hour.hour.strftime("%H:00")
        for offset, value, kind in ((0.0, hour.messages, "in"), (bar, hour.replies, "out")):
            height = usable * value / peak
            y = HEIGHT - BOTTOM - height
            noun = "messages" if kind == "in" else "replies"
            parts.append(
                f'<rect class="bar-{kind}" x="{x + offset:.1f}" y="{y:.1f}" '
                f'width="{bar:.1f}" height="{height:.1f}">'
                f"<title>{escape(label)}: {value} {noun}</title></rect>"
            )
        if index % 3 == 0:
            parts.append(f'<text class="tick" x="{x:.1f}" y="{HEIGHT - 6}">{escape(label)}</text>')
    parts.append(f'<text class="tick" x="2" y="12">scale: {peak} per hour</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
