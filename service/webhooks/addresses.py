"""Where webhooks may go (the SSRF rule): a destination is refused when any address its host resolves to is not a
public unicast one (loopback, private, link-local, multicast, reserved, unspecified, shared, or an IPv4-mapped or
-translated IPv6 form of these), unless WEBHOOKS_ALLOW_PRIVATE is true. The host is resolved once per attempt, and the
attempt connects to the address that was checked, never resolving again."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
LOCAL_NAMES = ("localhost", "localhost.")


class DestinationRefused(Exception):
    """The destination may not receive webhooks; the message says why, without any secret."""


def is_public(address: IPAddress) -> bool:
    """Whether `address` is a public unicast address (its IPv4 form, for a mapped or translated IPv6 one)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in ipaddress.IPv6Network("64:ff9b::/96"):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_loopback or address.is_link_local
    )


def literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def parse_url(url: str) -> SplitResult:
    """`url` split, when it may be an endpoint: http(s), a host, no user or password, a valid port. ValueError with
    the reason otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("the URL must start with http:// or https://")
    if "@" in parts.netloc:
        raise ValueError("the URL may not carry a user name or password")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if parts.port == 0:
        raise ValueError("the URL's port is not valid")
    return parts


def refused_literally(parts: SplitResult) -> str | None:
    """Why the URL's host, when it is an IP address or `localhost`, may not receive webhooks; None when it may (or
    is a name, which is checked when resolved)."""
    host = parts.hostname or ""
    if host.lower() in LOCAL_NAMES or host.lower().endswith(".localhost"):
        return f"{host} is a loopback host"
    address = literal_address(host)
    if address is not None and not is_public(address):
        return f"{address} is not a public address"
    return None


async def resolve(parts: SplitResult, *, allow_private: bool) -> str:
    """The one address an attempt connects to: the host's first address, after every address it resolved to
    passed the rule. DestinationRefused when one did not, or when the name does not resolve."""
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not allow_private:
        reason = refused_literally(parts)
        if reason is not None:
            raise DestinationRefused(reason)
    literal = literal_address(host)
    if literal is not None:
        return str(literal)
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise DestinationRefused(f"{host} does not resolve ({type(exc).__name__})") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in found]
    if not addresses:
        raise DestinationRefused(f"{host} does not resolve")
    if not allow_private:
        for address in addresses:
            if not is_public(address):
                raise DestinationRefused(f"{host} resolves to {address}, which is not a public address")
    return str(addresses[0])
