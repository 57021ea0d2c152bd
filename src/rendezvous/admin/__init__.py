"""The admin page (the registrar): provision, watch and retire hidden servers from a browser.

Lists the registry's hidden servers with their live numbers, creates one (its provisioning file
as a download and a QR code), rotates a secret, removes one; shows the relay's live status; and
serves ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``. An aiohttp application on the
relay's own event loop (``rendezvous serve --admin``), or alone (``rendezvous admin``).

    app.py       the application and its listener (AdminSite), and ``run()`` for the CLI
    security.py  sessions, login, CSRF tokens, security headers
    views.py     the pages and actions: thin views over the registry
    status.py    live numbers read from the relay's hub
    metrics.py   the Prometheus collector
"""

from rendezvous.admin.app import AdminSite, build_app, run

__all__ = ["AdminSite", "build_app", "run"]
