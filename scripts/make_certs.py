"""Make the credentials of a secure DOCL deployment.

    python scripts/make_certs.py server --hosts link.example.org 10.0.0.5 --out certs
    python scripts/make_certs.py node-key --name alice --out keys

``server``: a private CA (``ca.crt``, and its key ``ca.key``, which the operator keeps offline)
and a SuperLink certificate (``server.pem``, ``server.key``) for the given host names and IP
addresses. The SuperLink gets ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem
--ssl-keyfile server.key``; every SuperNode gets ``--root-certificates ca.crt``.

``node-key``: an EC key pair in OpenSSH format for one device (the same as
``ssh-keygen -t ecdsa -b 384 -N '' -f NAME``). The device keeps ``NAME`` and starts its
SuperNode with ``--auth-supernode-private-key NAME``; the operator registers ``NAME.pub`` with
``flwr supernode register NAME.pub CONNECTION --format json``, and binds the printed node id to
the device's user in the bindings file (see README, Deploy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docl_flower.operations.deploy import make_certificates, make_node_keys


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    server = sub.add_parser("server", help="private CA + SuperLink certificate")
    server.add_argument("--hosts", nargs="+", required=True, help="DNS names and IP addresses")
    server.add_argument("--out", type=Path, default=Path("certs"))
    node = sub.add_parser("node-key", help="one SuperNode's key pair")
    node.add_argument("--name", required=True)
    node.add_argument("--out", type=Path, default=Path("keys"))
    args = parser.parse_args()
    if args.what == "server":
        paths = make_certificates(args.out, args.hosts, keep_ca_key=True)
    else:
        paths = make_node_keys(args.out, args.name)
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
