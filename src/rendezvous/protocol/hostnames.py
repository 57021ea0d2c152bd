"""Named hidden servers: which name a visitor's host (SNI or ``Host``) asks for, and the URL to
give visitors. I/O-free; the relay's routing (server/connection.py) and the tools use it."""

from __future__ import annotations

from rendezvous.protocol.ids import valid_name

HTTPS_PORT = 443


def normal_domain(domain: str) -> str:
    """``domain`` in lower case without a trailing dot: how the relay compares host names."""
    return domain.strip().lower().rstrip(".")


def strip_port(host: str) -> str:
    """A ``Host`` header's host part: ``hub.example.com:8899`` -> ``hub.example.com``; an IPv6
    literal keeps its brackets."""
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.rpartition(":")[0] if ":" in host else host


def name_in(host: str, domain: str) -> str | None:
    """The name ``host`` asks for under ``domain`` (both as given; case and a port or a trailing
    dot do not matter), or None when ``host`` is not ``NAME.DOMAIN`` for one DNS label NAME.

    ``domain`` itself, deeper names (``a.b.DOMAIN``) and other hosts are not named hosts: the
    relay serves them the original's way.
    """
    domain = normal_domain(domain)
    if not domain:
        return None
    host = normal_domain(strip_port(host))
    label, dot, rest = host.partition(".")
    if not dot or rest != domain or not valid_name(label):
        return None
    return label


def visitor_url(name: str, domain: str, port: int = HTTPS_PORT, *, tls: bool = True) -> str:
    """What a visitor opens to reach the hidden server named ``name``."""
    scheme = "https" if tls else "http"
    default = HTTPS_PORT if tls else 80
    suffix = "" if port == default else f":{port}"
    return f"{scheme}://{name}.{normal_domain(domain)}{suffix}/"
