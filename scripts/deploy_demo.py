"""A real local deployment of DOCL: one SuperLink and N SuperNodes on 127.0.0.1.

TLS and SuperNode authentication are on; the ServerApp and ClientApp are the same as in
simulation.

    python scripts/deploy_demo.py [--users 10] [--out deploy] [--insecure] [HYDRA OVERRIDES...]

Steps: make a private CA and a server certificate for 127.0.0.1/localhost; one EC key pair per
SuperNode (OpenSSH format); start `flower-superlink` with TLS and `--enable-supernode-auth`;
register every public key with `flwr supernode register`; start each `flower-supernode` with
its private key and `--node-config "user-id=U partition-id=U data-dir=..."`; write the resolved
experiment and run it with `flwr run` against the named connection; print the results table.
Every process it started is stopped when it ends, also on failure. `--insecure` (no TLS, no
authentication) exists only for debugging.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from docl_flower.config import PROJECT_ROOT, build_experiment
from docl_flower.launch import run_status
from docl_flower.main import format_table

CONNECTION = "docl-deploy"


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def make_certificates(folder: Path, hosts: list[str]) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for ``hosts``; returns (ca, cert, key) paths."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "docl-flower demo CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem(key))
    return paths


def make_node_keys(folder: Path, user: int) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format for one SuperNode."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = folder / f"node-{user}"
    public = folder / f"node-{user}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    private.chmod(0o600)
    return private, public


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"nothing listens on port {port} after {seconds:.0f}s; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("deploy"))
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node auth (debug)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the experiment")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "FLWR_HOME": str(out / "flwr-home"),
        "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")]),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as handle:
            p = subprocess.Popen(
                cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append(p)
        return p

    start_time = time.time()
    try:
        # The experiment, resolved once (same config groups as `docl-flower`).
        # All SuperNodes share this machine's cores: one torch thread each unless overridden.
        threads = (
            []
            if any(o.startswith("train.num_threads") for o in args.overrides)
            else ["train.num_threads=1"]
        )
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "config", overrides=[f"num_users={args.users}", *threads, *args.overrides]
            )
        exp = build_experiment(cfg)
        run_dir = out / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "experiment.yaml", resolve=True)
        data_dir = str(Path(exp.dataset.root))

        port = free_port()
        link = [
            bindir + "/flower-superlink",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(out / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]
        if args.insecure:
            link.append("--insecure")
        else:
            ca, cert, key = make_certificates(out / "certs", ["127.0.0.1", "localhost"])
            link += [
                "--ssl-ca-certfile",
                str(ca),
                "--ssl-certfile",
                str(cert),
                "--ssl-keyfile",
                str(key),
                "--enable-supernode-auth",
            ]
        superlink = start(link, out / "superlink.log")
        wait_port(port, superlink, out / "superlink.log")
        conn = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        conn += f'address = "127.0.0.1:{port}"\n'
        conn += "insecure = true\n" if args.insecure else f'root-certificates = "{ca}"\n'
        (Path(env["FLWR_HOME"]) / "config.toml").write_text(conn)

        for user in sorted(exp.assignment):
            node = [
                bindir + "/flower-supernode",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(free_port()),
                "--node-config",
                f"user-id={user} partition-id={user} num-partitions={args.users} "
                f"data-dir='{data_dir}'",
            ]
            if args.insecure:
                node.append("--insecure")
            else:
                private, public = make_node_keys(out / "keys", user)
                reg = subprocess.run(
                    [bindir + "/flwr", "supernode", "register", str(public), CONNECTION],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if reg.returncode != 0:
                    raise SystemExit(f"registering node {user} failed: {reg.stdout}{reg.stderr}")
                node += [
                    "--root-certificates",
                    str(ca),
                    "--auth-supernode-private-key",
                    str(private),
                ]
            start(node, out / f"supernode-{user}.log")

        cmd = [
            bindir + "/flwr",
            "run",
            str(PROJECT_ROOT),
            CONNECTION,
            "--stream",
            "--run-config",
            f"config-path='{run_dir / 'experiment.yaml'}' out-dir='{run_dir}'",
        ]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=False)
        run_id, status = run_status(Path(env["FLWR_HOME"]), None, connection=CONNECTION)
        if status != "finished:completed":
            raise SystemExit(f"run {run_id} ended with status {status}; logs in {out}")
        results = json.loads((run_dir / "results.json").read_text())
        results["wall_seconds"] = time.time() - start_time
        print(format_table(results))
        print(f"results: {run_dir / 'results.json'}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
