"""`fsl certs` and the deployment command builders (fsl/certs.py, fsl/endpoint.py, fsl/flower_commands.py)."""

from __future__ import annotations

import ipaddress
import shlex
import stat
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fsl.certs import make_certs
from fsl.config import ConfigError, _parse_value, load_experiment
from fsl.endpoint import advertised_address, dataplane_tls
from fsl.flower_commands import launch_command, node_config, superlink_command
from fsl.grpc_channel import DataPlaneError, GrpcChannel
from fsl_cli import main as fsl_main
from helpers import make_state
from server.split_server import SplitServer


def test_certs_chain_to_the_ca_with_the_right_names_and_private_modes(tmp_path):
    paths = make_certs(tmp_path, hosts=["gpu-host", "10.0.0.5"], nodes=2)
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    srv = x509.load_pem_x509_certificate(paths["server"].read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "gpu-host"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.5"),
    }
    for key in ("ca_key", "server_key", "node-1", "node-2"):
        assert stat.S_IMODE(paths[key].stat().st_mode) == 0o600, key
    # SuperNode keys in the format Flower loads (OpenSSH, a NIST curve)
    priv = load_ssh_private_key(paths["node-1"].read_bytes(), None)
    pub = load_ssh_public_key(paths["node-1.pub"].read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert priv.public_key().public_numbers() == pub.public_numbers()
    # a second call keeps the CA and the node keys, and re-issues the server certificate
    again = make_certs(tmp_path, hosts=["other"], nodes=3)
    assert again["ca"].read_bytes() == paths["ca"].read_bytes()
    assert again["node-1"].read_bytes() == paths["node-1"].read_bytes()
    assert again["node-3"].exists()
    x509.load_pem_x509_certificate(again["server"].read_bytes()).verify_directly_issued_by(ca)


def test_fsl_connect_writes_flowers_connection(tmp_path, monkeypatch):
    import tomllib

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n[superlink.local]\naddress = ":local:"\n')
    assert fsl_main(["connect", "--superlink", "10.0.0.1:9093", "--root-certificates", "ca.pem"]) == 0
    conf = tomllib.loads((tmp_path / "config.toml").read_text())
    assert conf["superlink"]["default"] == "local"  # the user's default is kept
    assert conf["superlink"]["local"] == {"address": ":local:"}
    assert conf["superlink"]["fsl"] == {"address": "10.0.0.1:9093", "root-certificates": str(Path("ca.pem").resolve())}


def test_fsl_certs_cli(tmp_path, capsys):
    assert fsl_main(["certs", str(tmp_path / "c"), "--host", "pi-server", "--nodes", "1"]) == 0
    assert "pi-server" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "c").iterdir()} == {
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "node-1.key",
        "node-1.pub",
    }


@pytest.mark.integration
def test_the_data_plane_serves_tls_with_the_generated_certificate(tmp_path):
    paths = make_certs(tmp_path / "a")
    other = make_certs(tmp_path / "b")  # another deployment's CA
    cfg = load_experiment(
        "quickstart",
        [f"server.tls_certfile={paths['server']}", f"server.tls_keyfile={paths['server_key']}"]
        + [f"server.tls_ca_certfile={paths['ca']}"],
    )
    tls, conf = dataplane_tls(cfg.server)
    assert conf["dataplane-root-certificates"] == paths["ca"].read_text()
    _, _, state = make_state("cnn", "conv1")
    server = SplitServer(state, "127.0.0.1:0", **tls).start()
    try:
        with GrpcChannel(address=server.address, root_certificates=conf["dataplane-root-certificates"].encode()) as ch:
            step = ch.train_step(torch.rand(2, 16, 14, 14), torch.zeros(2, dtype=torch.int64))
            assert step.grad.shape == (2, 16, 14, 14)
        with GrpcChannel(address=server.address, root_certificates=other["ca"], retries=0, timeout_s=5) as ch:
            with pytest.raises(DataPlaneError) as err:
                ch.info()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None)


def test_tls_settings_are_checked():
    with pytest.raises(ConfigError, match="go together"):
        load_experiment("quickstart", ["server.tls_certfile=/x/server.pem"])
    assert dataplane_tls(load_experiment("quickstart").server) == ({}, {})


def test_advertised_address():
    cfg = load_experiment("quickstart", ["server.address=0.0.0.0:7800"]).server
    with pytest.raises(ValueError, match="public_address"):
        advertised_address(cfg, "0.0.0.0:7800")
    pub = load_experiment("quickstart", ["server.address=0.0.0.0:7800", "server.public_address=gpu-host"]).server
    assert advertised_address(pub, "0.0.0.0:7800") == "gpu-host:7800"
    pub = load_experiment("quickstart", ["server.public_address=gpu-host:443"]).server
    assert advertised_address(pub, "0.0.0.0:7800") == "gpu-host:443"
    assert advertised_address(load_experiment("quickstart").server, "127.0.0.1:5555") == "127.0.0.1:5555"


def test_role_commands(tmp_path):
    sl = superlink_command(tmp_path, port=9999)
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-keyfile"):
        assert flag in sl
    assert "--insecure" not in sl
    with pytest.raises(ValueError):
        superlink_command(None)
    nc = node_config(0, 4, data_path="/data/my mnist", threads=2, batch_size=8, memory_mb=900)
    assert nc == 'partition-id=0 num-partitions=4 data-path="/data/my mnist" threads=2 batch-size=8 memory-mb=900.0'


def test_launch_puts_tls_paths_into_a_run_config_flower_and_fsl_both_parse(tmp_path):
    from flwr.common.config import parse_config_args

    cmd = launch_command(".", "quickstart", ["train.rounds=2"], dataplane_certs=tmp_path)
    run_config = cmd[cmd.index("--run-config") + 1]
    parsed = parse_config_args([run_config])
    assert parsed["experiment"] == "quickstart" and parsed["resume"] == ""
    cfg = load_experiment(str(parsed["experiment"]), str(parsed["overrides"]).split())
    assert cfg.train.rounds == 2
    assert cfg.server.tls_certfile == str(tmp_path.resolve() / "server.pem")
    assert _parse_value(str(tmp_path / "ca.pem")) == str(tmp_path / "ca.pem")  # a bare path reads as a string
    assert shlex.split(shlex.join(cmd)) == cmd
