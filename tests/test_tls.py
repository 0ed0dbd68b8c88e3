"""TLS on every channel (issue 8): a cluster whose master HTTP and RPC all
speak TLS with a CA the test makes; clients that do not trust it, or that
speak plain TCP, get nothing."""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shoalfs.cli.cluster import EmbeddedCluster
from shoalfs.client.core import ClientOptions
from shoalfs.proto.opcodes import Op
from shoalfs.proto.wire import Frame


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: str, name: str) -> tuple[str, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = os.path.join(directory, f"{name}.pem")
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(directory: str, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (an IP SAN: clients dial addresses) and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("shoal-node")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "server.pem"), os.path.join(directory, "server.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_cluster(cluster_factory, tmp_path) -> tuple[EmbeddedCluster, str]:
    ca_path, ca_key, ca = make_ca(str(tmp_path), "shoal-test-ca")
    cert, key = make_server_cert(str(tmp_path), ca_key, ca)
    tls = {"tls_cert": cert, "tls_key": key, "tls_ca": ca_path}
    c = cluster_factory(metanodes=2, datanodes=1, master=tls, metanode=tls, datanode=tls)
    return c, str(tmp_path)


def test_tls_cluster_round_trip_and_strangers_get_nothing(tls_cluster, mount_factory) -> None:
    c, work = tls_cluster
    assert c.tls_ca
    c.create_volume("secure")
    with c.connect("secure") as vol:
        vol.makedirs("/a/b")  # directories spread over both metanodes: node-to-node renames too
        with vol.open("/a/b/f", "wb") as f:
            f.write(b"over tls" * 1000)
        vol.rename("/a/b/f", "/g")
        assert vol.open("/g", "rb").read() == b"over tls" * 1000
    m = mount_factory(c, "secure")
    with open(f"{m.path}/from-fuse", "wb") as f:
        f.write(b"mounted over tls")
    assert open(f"{m.path}/g", "rb").read() == b"over tls" * 1000
    assert sorted(os.listdir(m.path)) == ["a", "from-fuse", "g"]

    # plain HTTP to the master: no answer
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{c.master_addr}/cluster/info", timeout=5).read()
    # a client that trusts another CA: refused at the handshake, master and nodes alike
    other_ca, _, _ = make_ca(work, "another-ca")
    stranger = ssl.create_default_context(cafile=other_ca)
    with pytest.raises(urllib.error.URLError) as err:
        urllib.request.urlopen(f"https://{c.master_addr}/cluster/info", timeout=5, context=stranger)
    assert isinstance(err.value.reason, ssl.SSLCertVerificationError)
    node = c.layout["nodes"]["datanode1"]["listen"]
    host, port = node.rsplit(":", 1)
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            stranger.wrap_socket(raw, server_hostname=host)
    # plain RPC to a node: taken for a bad handshake, answered with a TLS alert (record type 21)
    # or nothing, and hung up on -- never with a frame
    with socket.create_connection((host, int(port)), timeout=15) as raw:
        raw.sendall(Frame(Op.PING, 1, 0, body={}).encode())
        answer = raw.recv(65536)
        assert answer == b"" or answer[0] == 21, answer[:16]
        while answer:
            answer = raw.recv(65536)  # until the node closes the connection
    # the SDK with the wrong CA cannot open the volume
    with pytest.raises(OSError) as failure:
        c.connect("secure", ClientOptions(op_deadline=3, tls_ca=other_ca))
    assert failure.value.errno == errno.EIO
    # the CLI speaks TLS with --tls-ca
    env = dict(os.environ, SHOAL_MASTER=c.master_addr, SHOAL_TOKEN_FILE=c.token_file, SHOAL_TLS_CA=c.tls_ca)
    out = subprocess.run([sys.executable, "-m", "shoalfs.cli", "volume", "list", "--json"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and '"secure"' in out.stdout, out.stderr
    assert m.proc.poll() is None  # the mount kept running through all of it
