"""The split channel with TLS and a per-run token: intruders are refused before any LLM work."""

import datetime
import ipaddress
import math
import threading

import pytest
import torch

pytest.importorskip("cryptography", reason="the TLS tests make certificates with cryptography (absent on the GPU machine)")

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fednano.config import SplitConfig
from fednano.split.client import SplitChannelError, SplitClient
from fednano.split.server import SplitServer

SECRET = "run-secret"


def _pem_cert(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki():
    """A CA and a server certificate for 127.0.0.1, as an operator would make with openssl."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fednano test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return _pem_cert(ca), _pem_cert(cert), key_pem


def _step(client, d):
    e, m, lab = torch.randn(1, 4, d), torch.ones(1, 4, dtype=torch.long), torch.tensor([[-100, -100, 3, 4]])
    loss, _, _ = client.train_step(e, m, lab)
    return loss.item()


def test_tls_and_token(tiny_llm, pki):
    ca, cert, key = pki
    with SplitServer(tiny_llm, secret=SECRET, tls=(cert, key)) as server:
        d = tiny_llm.hidden_size
        token = server.client_token("node-7")
        forged = "node-7." + "0" * 64
        for bad in (None, "wrong", forged, server.client_token("node-7")[:-1]):
            with SplitClient(server.address, token=bad, root_certificates=ca) as intruder:
                with pytest.raises(SplitChannelError) as err:
                    intruder.info()
                assert err.value.status == "UNAUTHENTICATED" and "token" in str(err.value)
        with SplitClient(server.address, token=token, timeout=5) as plaintext:  # right token, no TLS: no handshake
            with pytest.raises(SplitChannelError) as err:
                plaintext.info()
            assert err.value.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        assert server.service.stats["frames"] == 0  # the refused cost the LLM nothing
        assert server.refused["unauthenticated"] == 4
        with SplitClient(server.address, token=token, root_certificates=ca, wire_dtype="float32") as client:
            assert math.isfinite(_step(client, d))
        assert server.service.stats["frames"] == 1


def test_stream_limit_per_client(tiny_llm):
    with SplitServer(tiny_llm, SplitConfig(max_streams_per_client=1), secret=SECRET) as server:
        a, b = server.client_token("a"), server.client_token("b")
        held = SplitClient(server.address, token=a, wire_dtype="float32")
        assert math.isfinite(_step(held, tiny_llm.hidden_size))
        with SplitClient(server.address, token=a) as again:  # the same client, a second stream
            with pytest.raises(SplitChannelError) as err:
                again.info()
            assert err.value.status == "RESOURCE_EXHAUSTED"
        with SplitClient(server.address, token=b) as other:  # another client is unaffected
            assert other.info()["hidden_size"] == tiny_llm.hidden_size
        held.close()


def test_stream_limit(tiny_llm):
    with SplitServer(tiny_llm, SplitConfig(max_streams=1)) as server:
        first = SplitClient(server.address, wire_dtype="float32")
        assert math.isfinite(_step(first, tiny_llm.hidden_size))  # holds its stream open
        with SplitClient(server.address) as second:
            with pytest.raises(SplitChannelError) as err:
                second.info()
            assert err.value.status == "RESOURCE_EXHAUSTED"
        first.close()
        deadline = threading.Event()
        for _ in range(50):  # the server notices the closed stream
            with SplitClient(server.address) as third:
                try:
                    assert third.info()["hidden_size"] == tiny_llm.hidden_size
                    break
                except SplitChannelError:
                    deadline.wait(0.1)
        else:
            pytest.fail("the stream slot was never released")
