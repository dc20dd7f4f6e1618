"""Container health check: exit 0 when the API answers 200 on its readiness URL, else 1.

The URL comes from ``$HEALTHCHECK_URL`` (default ``http://127.0.0.1:8000/health/ready``) or the
first argument. Standard library only, so the image needs no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/health/ready"


def check(url: str, timeout: float = 4.0) -> int:
    """Return 0 when ``url`` answers HTTP 200, 1 otherwise (error status, refused, timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (local URL)
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    url = argv[0] if argv else os.environ.get("HEALTHCHECK_URL", DEFAULT_URL)
    return check(url)


if __name__ == "__main__":
    raise SystemExit(main())
