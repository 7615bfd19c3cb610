"""``chatbot run`` with no platform credentials: the local chat on stdout, and on stderr the
dashboard's address with a one-time login link that logs a browser in (a real process)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ANSWER = "You can reset your password by clicking on 'Forgot password?' link on the login page."


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_run_prints_a_login_link_that_works_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "MODEL_PATH"}}
    environment.update(
        PYTHONPATH=str(REPO),
        MODEL_PATH=str(tiny_model_dir),
        DATA_DIR=str(tmp_path / "data"),
        DASHBOARD_PORT="0",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "run"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=environment,
        text=True,
    )
    try:
        assert process.stderr is not None and process.stdin is not None
        link = None
        for line in process.stderr:  # the link comes before the chat reads stdin
            found = re.search(
                r"^Dashboard: (http://127\.0\.0\.1:\d+)/ \(log in once with (\S+)\)", line
            )
            if found:
                address, link = found.groups()
                break
        assert link is not None and link.startswith(f"{address}/login?code=")
        opener = urllib.request.build_opener(NoRedirect)
        try:
            opener.open(link, timeout=10)
        except urllib.error.HTTPError as redirect:
            assert redirect.code == 303
            cookie = redirect.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        try:
            opener.open(link, timeout=10)
            raise AssertionError("a spent link logged in again")
        except urllib.error.HTTPError as refused:
            assert refused.code == 401
        stdout, _stderr = process.communicate("How do I reset my password?\n", timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    # stdout is the chat's answers alone (.ci/run greps it).
    assert stdout.splitlines() == [ANSWER]
