"""The admin dashboard: server-rendered pages (Jinja2, a vendored htmx, no build step) served
by the bot's own web server (:mod:`bot.web`).

- :mod:`bot.dashboard.auth`: the admin token, one-time login links, session cookies, CSRF, the
  rate limit on wrong tokens;
- :mod:`bot.dashboard.app`: the routes (pages, forms, files);
- :mod:`bot.dashboard.pages`: what each page reads (store, model registry, model service);
- :mod:`bot.dashboard.actions`: what the buttons do: chat commands, through
  :meth:`bot.commands.Commands.run`, so the same permission check and audit line;
- :mod:`bot.dashboard.charts`: the inline SVG chart;
- ``templates/`` and ``static/`` (the stylesheet, the review shortcuts, htmx).
"""

from bot.dashboard.actions import DashboardActions
from bot.dashboard.app import Dashboard, DashboardRouter
from bot.dashboard.auth import DashboardAuth
from bot.dashboard.pages import DashboardSources, QueueDepth

__all__ = [
    "Dashboard",
    "DashboardActions",
    "DashboardAuth",
    "DashboardRouter",
    "DashboardSources",
    "QueueDepth",
]
