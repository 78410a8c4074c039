"""Webhooks reach public addresses only, unless the operator allows a network: loopback, private, link-local,
CGNAT, multicast and the IPv6 forms that embed them are refused when an endpoint with such an address is
created, and at send time after resolution, before any packet is sent. What the tenant reads of a refusal is
one coarse sentence, never the address a name resolved to."""

import ipaddress

import pytest

from shared.webhooks import destination, sender
from tests.support import embedded_in_process
from tests.webhook_receivers import LoopbackReceiver, add_delivery, add_endpoint, delivery_row

REFUSED_ADDRESSES = [
    "127.0.0.1", "127.255.0.9", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "192.0.2.1", "198.18.0.1",
    "::1", "::", "fe80::1", "fd00::1", "fc00::1", "fec0::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",
    "2002:7f00:1::1", "2002:a00:1::1", "2001::1",
]  # fmt: skip
PUBLIC_ADDRESSES = ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", REFUSED_ADDRESSES)
def test_addresses_that_are_not_globally_routable_are_not_public(address):
    assert not destination.is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_globally_routable_addresses_are_public(address):
    assert destination.is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("host", ["0x7f000001", "2130706433", "017700000001", "127.1", "0x7f.1", "0"])
def test_numeric_ipv4_forms_are_read_as_the_resolver_reads_them(host):
    address = destination.literal_address(host)
    assert address is not None and not destination.is_public(address)


@pytest.mark.parametrize("host", ["hooks.invalid", "1.2.3.4.5", "0x7g000001", "12ab", "deadbeef"])
def test_host_names_are_not_taken_for_addresses(host):
    assert destination.literal_address(host) is None


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """Embedded settings with no network allowed, and a short deadline."""
    embedded_in_process(
        monkeypatch, tmp_path / "data", webhook_allowed_networks="", webhook_timeout_seconds="2",
        webhook_retry_base_seconds="60",
    )  # fmt: skip
    receiver = LoopbackReceiver()
    yield receiver
    receiver.close()


def allow(monkeypatch, networks: str) -> None:
    from shared.settings import get_settings

    monkeypatch.setenv("TUNEQUEUE_WEBHOOK_ALLOWED_NETWORKS", networks)
    get_settings.cache_clear()


SSRF_URLS = [
    "http://127.0.0.1:1/", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[::1]:8000/",
    "http://0x7f000001/", "http://2130706433:8000/", "http://100.64.0.1/", "http://[fd00::1]/",
    "http://[::ffff:127.0.0.1]/", "https://224.0.0.1/", "http://[fe80::1]/", "http://0/",
]  # fmt: skip


@pytest.mark.parametrize("url", SSRF_URLS)
def test_endpoints_on_internal_addresses_are_refused_at_creation_naming_url(guarded, url):
    from shared.db import session_scope
    from shared.errors import InvalidRequest
    from shared.webhooks.service import create_endpoint

    with pytest.raises(InvalidRequest) as refused, session_scope() as session:
        create_endpoint(session, "tenant-a", url)
    assert refused.value.param == "url" and "TUNEQUEUE_WEBHOOK_ALLOWED_NETWORKS" in refused.value.message


@pytest.mark.parametrize("url", ["http://[::1/", "http://[fe80::1%25eth0/", "http://host:99999/", "http:///path"])
def test_malformed_urls_are_a_400_naming_url(guarded, url):
    from shared.db import session_scope
    from shared.errors import InvalidRequest
    from shared.webhooks.service import create_endpoint

    with pytest.raises(InvalidRequest) as refused, session_scope() as session:
        create_endpoint(session, "tenant-a", url)
    assert refused.value.param == "url"


def test_internal_destinations_are_refused_at_send_time_without_a_packet(guarded, monkeypatch):
    from shared.webhooks.service import attempt_delivery

    port = guarded.port
    loopback = [
        f"http://127.0.0.1:{port}/", f"http://0x7f000001:{port}/", f"http://2130706433:{port}/",
        f"http://127.1:{port}/", f"http://[::ffff:127.0.0.1]:{port}/", f"http://LocalHost:{port}/",
    ]  # fmt: skip
    deliveries = [add_delivery(add_endpoint("tenant-a", url)) for url in SSRF_URLS + loopback]
    for delivery_id in deliveries:
        assert attempt_delivery(delivery_id)[0] == "pending"
        row = delivery_row(delivery_id)
        assert row["last_error"] == sender.REFUSED and row["last_status_code"] is None, row
        assert "127.0" not in str(row) and "::1" not in str(row)  # nothing that tells what a name resolved to
    assert guarded.connections == 0  # refused before connecting (the tests' guard refuses the rest anyway)

    allow(monkeypatch, "127.0.0.0/8")  # the operator's opt-in: the same endpoint is now reached
    reached = add_delivery(add_endpoint("tenant-a", f"http://127.0.0.1:{port}/hooks"))
    assert attempt_delivery(reached)[0] == "delivered"
    assert guarded.connections == 1 and delivery_row(reached)["last_status_code"] == 200


def test_endpoint_creation_accepts_host_names_and_allowed_networks(guarded, monkeypatch):
    from shared.db import session_scope
    from shared.webhooks.service import create_endpoint

    with session_scope() as session:
        endpoint, secret = create_endpoint(session, "tenant-a", "https://hooks.invalid/tunequeue")  # checked at send
        assert endpoint.url == "https://hooks.invalid/tunequeue" and secret.startswith("whsec_")
    allow(monkeypatch, "127.0.0.0/8,::1/128")
    with session_scope() as session:
        create_endpoint(session, "tenant-a", "http://[::1]:8000/hooks")
        create_endpoint(session, "tenant-a", "http://127.0.0.1:1/hooks")


def test_a_bad_allowed_networks_setting_names_itself(guarded, monkeypatch):
    allow(monkeypatch, "10.0.0.0/8,not-a-network")
    with pytest.raises(ValueError, match="TUNEQUEUE_WEBHOOK_ALLOWED_NETWORKS"):
        destination.is_permitted(ipaddress.ip_address("10.0.0.1"))
