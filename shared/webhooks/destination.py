"""Where a webhook may be sent: globally routable addresses only, unless the operator allows a network
(`TUNEQUEUE_WEBHOOK_ALLOWED_NETWORKS`). Otherwise a tenant could make the server post to its own loopback, the
cloud metadata service or hosts on the internal network, and learn from the outcome which of them answer.

The check runs on the address actually connected to, after resolution (`resolve`), and the sender connects to
that very address: a name that resolves to a public address when checked and to an internal one a moment later
(DNS rebinding) cannot slip through. An IP literal in a URL is also refused when the endpoint is created."""

import functools
import ipaddress
import re
import socket
import threading
from urllib.parse import urlsplit

from shared.settings import get_settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d, also holds :: and ::1
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: a.b.c.d reached through a translator
# What the C resolver reads as IPv4 besides dotted quads: 2130706433, 0x7f000001, 0177.1, 127.1.
LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.IGNORECASE)


class DestinationRefused(Exception):
    """The destination is not a public address, nor in an allowed network."""


class Unresolvable(Exception):
    pass


def literal_address(host: str) -> Address | None:
    """The address a host names without any lookup: an IP literal, or a legacy numeric IPv4 form."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if LEGACY_IPV4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64, 6to4), which decides where packets end up."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def is_public(address: Address) -> bool:
    inner = embedded_ipv4(address)
    if inner is not None:
        return is_public(inner)
    if address in IPV4_COMPATIBLE:
        return False
    special = address.is_multicast or address.is_reserved or address.is_link_local
    if isinstance(address, ipaddress.IPv6Address):
        special = special or address.is_site_local or address.teredo is not None
    return address.is_global and not special


def is_permitted(address: Address) -> bool:
    allowed = allowed_networks(get_settings().webhook_allowed_networks)
    candidates = [address, *filter(None, [embedded_ipv4(address)])]
    return any(a in network for a in candidates for network in allowed) or is_public(address)


@functools.lru_cache(maxsize=8)
def allowed_networks(setting: str) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in setting.split(",") if cidr.strip())
    except ValueError as exc:
        raise ValueError(f"TUNEQUEUE_WEBHOOK_ALLOWED_NETWORKS must be comma-separated CIDRs: {exc}") from None


def check_url(url: str) -> None:
    """At creation: a URL whose host is an address is checked now; a name is checked whenever it is resolved."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed "[" around an IPv6 host
        raise DestinationRefused(f"it is not a valid URL ({exc})") from None
    try:
        _ = parts.port  # parsed on access
    except ValueError:
        raise DestinationRefused("the port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise DestinationRefused("it names no host")
    address = literal_address(parts.hostname)
    if address is not None and not is_permitted(address):
        raise DestinationRefused("it is not a public address")


def resolve(host: str, port: int, timeout: float) -> Address:
    """The one address to connect to: every address the host resolves to must be permitted, so that a name
    cannot mix a public address with an internal one. The lookup runs on its own thread, so the attempt's
    deadline bounds it too."""
    address = literal_address(host)
    addresses = [address] if address is not None else _lookup(host, port, timeout)
    refused = [a for a in addresses if not is_permitted(a)]
    if refused or not addresses:
        raise DestinationRefused(f"{host} resolves to {', '.join(map(str, refused))}")
    first = addresses[0]
    mapped = first.ipv4_mapped if isinstance(first, ipaddress.IPv6Address) else None
    return mapped or first  # a mapped address is reached as the IPv4 one it maps


def _lookup(host: str, port: int, timeout: float) -> list[Address]:
    found: list[Address] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                found.append(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
        except (OSError, UnicodeError, ValueError) as exc:
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=lookup, daemon=True, name="tunequeue-webhook-resolve").start()
    if not done.wait(timeout):
        raise TimeoutError(f"resolving {host} took longer than the attempt's deadline")
    if failure:
        raise Unresolvable(f"{host}: {failure[0]}")
    return list(dict.fromkeys(found))
