"""TLS and mutual TLS on the ADS and ext_proc servers, with a real Envoy and real certificates.

What an operator relies on: Envoy reaches the control plane over TLS (and mTLS) with the
bootstrap `hybridlb bootstrap --xds-tls-*` writes; a client without a certificate is refused
when mTLS is on; a renewed certificate is served to the next connection without a restart,
while the open streams keep going.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import struct_pb2

from tests.harness import (
    ControlPlane,
    Envoy,
    Process,
    Upstreams,
    free_ports,
    running,
    served_by,
    wait_for,
    write_pools,
)
from tests.reliability import certs
from xds_server.bench.adsclient import AdsClient
from xds_server.settings import UpstreamTls
from xds_server.xds import types
from xds_server.xds.server import NODE_METADATA_KEY, SERVICE

pytestmark = [pytest.mark.reliability, pytest.mark.envoy]


def _install(pair: certs.Pair, cert: Path, key: Path) -> None:
    """Replace the served files atomically (rename), as a Secret volume update lands."""
    for src, dst in ((pair.key, key), (pair.cert, cert)):
        tmp = dst.with_suffix(".new")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _credentials(ca: certs.Pair, client: certs.Pair | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


async def _ads_works(port: int, creds: grpc.ChannelCredentials | None) -> bool:
    """True when an ADS client gets the clusters; False when the connection is refused."""
    target = f"127.0.0.1:{port}"
    channel = (grpc.aio.secure_channel(target, creds, options=[
        ("grpc.ssl_target_name_override", "localhost")]) if creds is not None
        else grpc.aio.insecure_channel(target))
    client = AdsClient(target=target, node_id="tls-test")
    task = asyncio.create_task(client.run(channel))
    waiter = asyncio.create_task(
        client.wait_until(lambda: bool(client.held.get(types.CLUSTER)), 10))
    try:
        # A refused handshake ends the stream (UNAVAILABLE) long before the timeout.
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        return waiter.done() and waiter.exception() is None
    finally:
        for t in (task, waiter):
            t.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
        await channel.close()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, certs.Pair]:
    d = tmp_path / "pki"
    d.mkdir()
    ca1, ca2 = certs.ca(d, "ca-1"), certs.ca(d, "ca-2")
    return {
        "ca1": ca1, "ca2": ca2,
        "server1": certs.issue(d, "server-1", ca1, server=True),
        "server2": certs.issue(d, "server-2", ca2, server=True),
        "client": certs.issue(d, "envoy-client", ca1, server=False),
    }


def test_envoy_over_mutual_tls_and_rotation_without_restart(
    tmp_path: Path, pki: dict[str, certs.Pair]
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _install(pki["server1"], cert, key)
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    pools = tmp_path / "pools.yaml"
    write_pools(pools, [(addresses[0], "node-a")])
    cp = ControlPlane(tmp_path, pools, listener_port=free_ports(1)[0], extra=[
        "--tls-cert", str(cert), "--tls-key", str(key),
        "--tls-client-ca", str(pki["ca1"].cert)])
    client = pki["client"]

    def envoy(name: str, ca: certs.Pair, with_cert: bool = True) -> Envoy:
        return Envoy(tmp_path, xds_port=cp.xds_port, name=name, bootstrap={"xds_tls": UpstreamTls(
            str(ca.cert), str(client.cert) if with_cert else None,
            str(client.key) if with_cert else None)})

    first = envoy("envoy-1", pki["ca1"])
    upstreams = Upstreams(tmp_path, ports)
    with running(upstreams, cp, first):
        wait_for(lambda: addresses[0] in served_by(first.url, 5), 30, "routes over mTLS")
        assert "(mutual TLS)" in cp.output()
        # No certificate, or no TLS at all: refused. A certificate of the right CA: served.
        assert not asyncio.run(_ads_works(cp.xds_port, _credentials(pki["ca1"], None)))
        assert not asyncio.run(_ads_works(cp.xds_port, None))
        assert asyncio.run(_ads_works(cp.xds_port, _credentials(pki["ca1"], client)))

        # Renew the server certificate from another CA; the same process serves it next.
        pid = cp.proc.pid if cp.proc else None
        _install(pki["server2"], cert, key)
        assert asyncio.run(_ads_works(cp.xds_port, _credentials(pki["ca2"], client)))
        assert not asyncio.run(_ads_works(cp.xds_port, _credentials(pki["ca1"], client)))
        second = envoy("envoy-2", pki["ca2"])
        with running(second):
            write_pools(pools, [(addresses[0], "node-a"), (addresses[1], "node-b")])
            # The new Envoy (new CA) and the one whose stream predates the rotation both
            # get the change.
            for e in (second, first):
                wait_for(lambda e=e: addresses[1] in served_by(e.url, 20), 30, "new config")
        assert cp.proc is not None and cp.proc.pid == pid and cp.alive()
        assert "TLS files changed" in cp.output()


def _pick_works(port: int, creds: grpc.ChannelCredentials | None) -> bool:
    target = f"127.0.0.1:{port}"
    channel = (grpc.secure_channel(target, creds, options=[
        ("grpc.ssl_target_name_override", "localhost")]) if creds is not None
        else grpc.insecure_channel(target))
    request = ep.ProcessingRequest(request_headers=ep.HttpHeaders(
        headers=base_pb2.HeaderMap(), end_of_stream=True))
    try:
        with channel:
            stub = ep_grpc.ExternalProcessorStub(channel)
            return len(list(stub.Process(iter([request]), timeout=5))) == 1
    except grpc.RpcError:
        return False


def test_extproc_serves_mutual_tls(tmp_path: Path, pki: dict[str, certs.Pair]) -> None:
    port = free_ports(1)[0]
    picker = Process([sys.executable, "-m", "xds_server", "extproc", "--port", str(port),
                      "--host", "127.0.0.1", "--control-plane", "http://127.0.0.1:9",
                      "--tls-cert", str(pki["server1"].cert), "--tls-key",
                      str(pki["server1"].key), "--tls-client-ca", str(pki["ca1"].cert)],
                     tmp_path / "extproc.log")
    with running(picker):
        creds = _credentials(pki["ca1"], pki["client"])
        wait_for(lambda: _pick_works(port, creds), 20, "picker over mTLS")
        assert not _pick_works(port, _credentials(pki["ca1"], None))
        assert not _pick_works(port, None)


@pytest.mark.parametrize("flags", [["--tls-key", "k"], ["--tls-cert", "c"],
                                   ["--tls-client-ca", "ca"]])
def test_incomplete_tls_flags_end_serve_with_a_message(flags: list[str]) -> None:
    import argparse

    from xds_server.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    with pytest.raises(SystemExit, match="--tls-"):
        serve.settings_from_args(parser.parse_args(["--static", "p.yaml", *flags]))


def test_envoy_reaches_the_hosted_picker_over_mutual_tls(
    tmp_path: Path, pki: dict[str, certs.Pair]
) -> None:
    """`serve --extproc-port` with `--tls-*`: its picker serves the same certificate, and the
    ext_proc cluster it pushes makes Envoy speak mutual TLS to it; picks are obeyed."""
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    pools = tmp_path / "pools.yaml"
    write_pools(pools, [(addresses[0], "node-a"), (addresses[1], "node-b")])
    server, client, ca = pki["server1"], pki["client"], pki["ca1"]
    cp = ControlPlane(tmp_path, pools, listener_port=free_ports(1)[0], extra=[
        "--tls-cert", str(server.cert), "--tls-key", str(server.key),
        "--tls-client-ca", str(ca.cert), "--metrics", "none",
        "--extproc-port", str(free_ports(1)[0]), "--extproc-timeout-s", "2",
        "--extproc-tls-ca", str(ca.cert), "--extproc-tls-cert", str(client.cert),
        "--extproc-tls-key", str(client.key)])
    envoy = Envoy(tmp_path, xds_port=cp.xds_port, bootstrap={"xds_tls": UpstreamTls(
        str(ca.cert), str(client.cert), str(client.key))})
    with running(Upstreams(tmp_path, ports), cp, envoy):
        def picked() -> bool:
            r = httpx.post(envoy.url + "/v1/completions", timeout=10,
                           json={"model": "qwen3", "prompt": "hello"})
            # The picker names its pick first, then its fallbacks.
            return bool(r.status_code == 200 and r.headers.get("x-hybridlb-picked", "")
                        .split(",")[0] == r.headers["x-hybridlb-replica"])

        wait_for(picked, 30, "a pick over mutual TLS, obeyed")
        # The picker (serve's child process) logged how it listens.
        assert "(mutual TLS)" in cp.output().split("ext_proc endpoint picker on", 1)[1]
        assert all(picked() for _ in range(10))
        # Envoy's side of it: TLS handshakes to the picker, none failed.
        stats = httpx.get(envoy.admin + "/stats").text
        handshakes = [ln for ln in stats.splitlines()
                      if ln.startswith("cluster.hybridlb_extproc.ssl.handshake:")]
        assert handshakes and int(handshakes[0].split(":")[1]) > 0, handshakes
        # A plaintext client is refused by the hosted picker.
        picker_port = int(cp.output().split("ext_proc endpoint picker on ", 1)[1]
                          .split()[0].rsplit(":", 1)[1])
        assert not _pick_works(picker_port, None)
        assert _pick_works(picker_port, _credentials(ca, client))


@pytest.mark.parametrize(("flags", "message"), [
    (["--extproc-port", "1", "--tls-cert", "c", "--tls-key", "k"], "--extproc-tls-ca"),
    (["--extproc-tls-ca", "ca"], "needs a picker"),
    (["--extproc-address", "h:1", "--extproc-tls-ca", "ca", "--extproc-tls-cert", "c"],
     "go together"),
    (["--extproc-address", "h:1", "--extproc-tls-cert", "c", "--extproc-tls-key", "k"],
     "a client certificate needs the server.s CA"),
])
def test_picker_tls_flags_that_cannot_work_end_serve_with_a_message(
    flags: list[str], message: str
) -> None:
    import argparse

    from xds_server.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    with pytest.raises(SystemExit, match=message):
        serve.settings_from_args(parser.parse_args(["--static", "p.yaml", *flags]))


async def _ads_outcome(port: int, creds: grpc.ChannelCredentials, node: str) -> str:
    """"served" when a stream asking for `node`'s clusters gets an answer, else the status
    that ended it. One request, then silence: a client still writing when the server ends
    its stream may see its own write fail first (Python gRPC's INTERNAL)."""
    metadata = struct_pb2.Struct()
    metadata.update({NODE_METADATA_KEY: {"node": node}})
    request = discovery_pb2.DiscoveryRequest(
        node=base_pb2.Node(id=f"envoy-{node}", metadata=metadata), type_url=types.CLUSTER)

    async def one() -> AsyncIterator[bytes]:
        yield request.SerializeToString()
        await asyncio.Event().wait()

    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=[
            ("grpc.ssl_target_name_override", "localhost")]) as channel:
        call = channel.stream_stream(f"/{SERVICE}/StreamAggregatedResources",
                                     request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(one())
        try:
            async for _ in call:
                call.cancel()
                return "served"
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return "ended"


def test_a_client_certificate_must_name_the_node_it_asks_for(
    tmp_path: Path, pki: dict[str, certs.Pair]
) -> None:
    """With mutual TLS, a certificate whose SPIFFE id names node-a reads node-a's view (and
    the node-less view every Envoy may have), never node-b's: PERMISSION_DENIED, counted.
    A real Envoy on node-a with that certificate gets its routes."""
    d, ca, server = tmp_path / "pki", pki["ca1"], pki["server1"]
    node_a = certs.issue(d, "envoy-node-a", ca, server=False,
                         uris=("spiffe://cluster.local/ns/hybridlb/node/node-a",))
    nameless = pki["client"]
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    pools = tmp_path / "pools.yaml"
    write_pools(pools, [(addresses[0], "node-a"), (addresses[1], "node-b")])
    cp = ControlPlane(tmp_path, pools, listener_port=free_ports(1)[0], extra=[
        "--tls-cert", str(server.cert), "--tls-key", str(server.key),
        "--tls-client-ca", str(ca.cert), "--metrics", "none"])
    envoy = Envoy(tmp_path, xds_port=cp.xds_port, node="node-a", bootstrap={
        "xds_tls": UpstreamTls(str(ca.cert), str(node_a.cert), str(node_a.key))})
    with running(Upstreams(tmp_path, ports), cp, envoy):
        # Local first: node-a's Envoy sends to node-a's replica while it has room.
        wait_for(lambda: addresses[0] in served_by(envoy.url, 5), 30,
                 "node-a's Envoy routed over mTLS")

        def outcome(pair: certs.Pair, node: str) -> str:
            return asyncio.run(_ads_outcome(cp.xds_port, _credentials(ca, pair), node))

        assert outcome(node_a, "node-a") == "served"
        assert outcome(node_a, "") == "served"
        assert outcome(node_a, "node-b") == "PERMISSION_DENIED"
        assert outcome(nameless, "node-a") == "PERMISSION_DENIED"
        assert outcome(nameless, "") == "served"
        assert cp.metric("hybridlb_xds_refused_streams_total",
                         reason="node_not_in_certificate") == 2
        assert "refused (node_not_in_certificate)" in cp.output()
        # The Envoy's own stream was never disturbed.
        assert envoy.alive() and addresses[0] in served_by(envoy.url, 5)
