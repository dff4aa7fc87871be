"""Deployment credentials and bindings (no process is started here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from docl_flower.experiments.launch import DeploySettings, demo_overrides
from docl_flower.federation.nodes import load_bindings
from docl_flower.operations.credentials import make_certificates, make_node_keys
from docl_flower.operations.deploy import LocalDeployment, Node

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_certs.py"


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path):
    ca_path, cert_path, key_path = make_certificates(tmp_path, ["link.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert key_path.stat().st_mode & 0o077 == 0
    assert not (tmp_path / "ca.key").exists()


def test_node_keys_are_an_openssh_pair(tmp_path):
    private, public = make_node_keys(tmp_path, "alice")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert (
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        == public.read_bytes()
    )
    assert private.stat().st_mode & 0o077 == 0


def test_make_certs_script_writes_ca_key_and_node_keys(tmp_path):
    for args in (["server", "--hosts", "localhost"], ["node-key", "--name", "bob"]):
        subprocess.run(
            [sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)], check=True, timeout=60
        )
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"ca.crt", "ca.key", "server.pem", "server.key", "bob", "bob.pub"}


def test_bindings_file_maps_registered_nodes_to_users(tmp_path):
    dep = LocalDeployment(tmp_path, secure=False)
    dep.nodes = {
        0: Node(0, "user-id=0", tmp_path / "0.log", node_id=11),
        1: Node(1, "user-id=1", tmp_path / "1.log", node_id=12),
        2: Node(2, "user-id=2", tmp_path / "2.log"),  # key never registered: not bound
    }
    path = dep.write_bindings()
    assert json.loads(path.read_text()) == {"11": 0, "12": 1}
    assert load_bindings(path) == {11: 0, 12: 1}


def test_the_demo_gives_every_supernode_one_torch_thread_unless_told_otherwise():
    assert demo_overrides(DeploySettings(users=3, overrides=("seed=2",))) == [
        "num_users=3",
        "train.num_threads=1",
        "seed=2",
    ]
    mine = DeploySettings(users=3, overrides=("train.num_threads=4",))
    assert demo_overrides(mine) == ["num_users=3", "train.num_threads=4"]
