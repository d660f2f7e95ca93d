"""Where http tasks and callbacks may send requests: never to the service's own network
(loopback, private, link-local and the cloud metadata address, carrier-grade NAT, unique-local,
unspecified, multicast or reserved addresses, in any spelling) unless a network in
TASK_RUNNER_HTTP_ALLOW_NETWORKS opens it.

Checked twice: at create on a URL's literal address or `localhost` (`check_url`, a 400), and
at send time on every address a name resolves to (`GuardedResolver`), which is the address
then connected to: the name is not resolved a second time (DNS rebinding).

Standard library and aiohttp's client only: the API and the workers both use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import re
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
MAX_URL_LENGTH = 2048
SCHEMES = ("http", "https")
# A host made only of digits, dots and hex spellings is an IPv4 address in a resolver's eyes
# (127.1, 2130706433, 0x7f.1, 0177.0.0.1), whatever a strict parser says.
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?", re.IGNORECASE)

# The networks opened by TASK_RUNNER_HTTP_ALLOW_NETWORKS where args are checked: the API sets
# them for each request, the worker for each run (see `allowing`).
_allowed: contextvars.ContextVar[tuple[Network, ...]] = contextvars.ContextVar(
    "allowed_networks", default=()
)


class DestinationRefused(OSError):
    """A request's destination is an address the network rules refuse."""


@contextlib.contextmanager
def allowing(networks: Sequence[Network]) -> Iterator[None]:
    """Within this block, `check_url` (and so the http type's args schema) opens `networks`."""
    token = _allowed.set(tuple(networks))
    try:
        yield
    finally:
        _allowed.reset(token)


def refusal(address: Address, allowed: Sequence[Network] = ()) -> str | None:
    """Why a request may not go to `address` (None: it may)."""
    if any(address.version == net.version and address in net for net in allowed):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None
        )
        if embedded is None and address.sixtofour is not None:
            embedded = address.sixtofour
        if embedded is not None:
            return refusal(embedded, allowed)
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in CGNAT:
        return "a carrier-grade NAT address"
    if address.is_private:
        return "a private address"
    if address.is_reserved or not address.is_global:
        return "a reserved address"
    return None


def literal_address(host: str) -> Address | None:
    """The address a URL's host spells, as a resolver would read it (None: a name).

    Raises ValueError for a host that looks numeric but is no address a resolver takes."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            raise ValueError(f"host {host!r} is not a valid address") from None
    return None


def is_localhost(host: str) -> bool:
    """`localhost` and every name under it, which resolve to loopback (RFC 6761)."""
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


def check_url(url: str, allowed: Sequence[Network] | None = None) -> URL:
    """The URL parsed, if it is http(s) with a host whose literal address (or `localhost`)
    the rules allow; raises ValueError saying why not. `allowed`: the open networks (None:
    those of the enclosing `allowing` block)."""
    networks = _allowed.get() if allowed is None else tuple(allowed)
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        url.encode()  # a lone surrogate: valid JSON, but neither sendable nor storable
        parsed = URL(url)
    except (ValueError, TypeError):
        raise ValueError("is not a URL") from None
    if parsed.scheme not in SCHEMES or not parsed.raw_host:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parsed.explicit_port == 0:
        raise ValueError("port 0 is no port a service listens on")
    host = parsed.raw_host
    address = literal_address(host)
    if address is None and is_localhost(host):
        address = ipaddress.IPv4Address("127.0.0.1")
    if address is not None:
        reason = refusal(address, networks)
        if reason is not None:
            raise ValueError(
                f"{host} is {reason}: not a destination this service sends requests to "
                "(TASK_RUNNER_HTTP_ALLOW_NETWORKS opens chosen networks)"
            )
    return parsed


class GuardedResolver(ThreadedResolver):
    """aiohttp's resolver (one getaddrinfo) that refuses a name if any address it resolves
    to is refused: the connector then connects only to the addresses checked here."""

    def __init__(self, allowed: Sequence[Network] = ()) -> None:
        super().__init__()
        self.allowed = tuple(allowed)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve `host`; DestinationRefused when any of its addresses is refused."""
        if is_localhost(host) and refusal(ipaddress.IPv4Address("127.0.0.1"), self.allowed):
            raise DestinationRefused(f"{host} is a loopback name")
        results = await super().resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"].split("%", 1)[0])
            reason = refusal(address, self.allowed)
            if reason is not None:
                raise DestinationRefused(f"{host} resolves to {address}, {reason}")
        return results


def guarded_session(allowed: Sequence[Network] = (), **kwargs: Any) -> aiohttp.ClientSession:
    """An HTTP client that reaches only destinations the rules allow (the resolver checks
    names; the caller checks a literal address with `check_url` before sending). No proxy
    from the environment, no hidden resend of a request (one attempt = one request), and no
    time limit of its own (aiohttp's default is 5 minutes): the task's timeout is the bound."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(allowed))
    kwargs.setdefault("timeout", aiohttp.ClientTimeout())
    session = aiohttp.ClientSession(connector=connector, trust_env=False, **kwargs)
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


def refused(exc: BaseException) -> DestinationRefused | None:
    """The DestinationRefused behind an aiohttp connection error, if that is what it was."""
    if isinstance(exc, DestinationRefused):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
        exc.os_error, DestinationRefused
    ):
        return exc.os_error
    return None
