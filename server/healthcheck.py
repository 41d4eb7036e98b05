"""Container health check: exit 0 when this machine's ``ess serve`` answers ``GET /health`` 200.

``python -m server.healthcheck`` (the images' HEALTHCHECK and compose's healthcheck). The port
is ESS_PORT (default 8000, as `Settings`); the address is always loopback, since the check runs
beside the server. Standard library only: it must stay cheap every few seconds.
Exit status: 0 healthy; 1 not ready (HTTP 503, or no answer within the timeout).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 5.0


def main() -> int:
    port = os.environ.get("ESS_PORT", "8000")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health",
                                    timeout=TIMEOUT_SECONDS) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
