"""Optional TLS on every channel (DESIGN.md §7): master HTTP and all RPC.

Each role reads `tls_cert` and `tls_key` (what it serves with) and `tls_ca`
(what it trusts when it connects) from its config; a client takes `tls_ca`
(mount option, SDK argument, `--tls-ca`/SHOAL_TLS_CA). A cluster is all TLS
or none: with a CA configured, a client speaks only TLS and checks that the
server's certificate names the address it dialled (an IP SAN for
127.0.0.1:port, a DNS name otherwise).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any


class TlsConfigError(ValueError):
    pass


def server_context(cfg: Mapping[str, Any]) -> ssl.SSLContext | None:
    """What a server listens with: None without tls_cert (plain TCP)."""
    cert, key = cfg.get("tls_cert"), cfg.get("tls_key")
    if not cert and not key:
        return None
    if not cert or not key:
        raise TlsConfigError("tls_cert and tls_key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load tls_cert {cert} / tls_key {key}: {exc}") from None
    return ctx


def client_context(ca: str | None) -> ssl.SSLContext | None:
    """What a client connects with: None without a CA (plain TCP)."""
    if not ca:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load tls_ca {ca}: {exc}") from None
    return ctx


def http_scheme(ctx: ssl.SSLContext | None) -> str:
    return "https" if ctx is not None else "http"
