"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) on loopback.

Why a real one: the operator and the helm chart must be tested against what a cluster
actually does -- admission, RBAC, service-account tokens, the garbage collector -- not a fake
API. No kubelet or container runtime runs, so pods are never scheduled; everything the API
server and the controllers do on their own works.

Binaries are built from pinned sources by ``make tools`` (:mod:`dtx_infra.toolchain`) and
cached outside the repository, so a test run builds nothing and needs no network or Docker.

Usage::

    with ControlPlane(tmp_path) as cp:
        cp.kubectl("create", "namespace", "demo")
        # cp.kubeconfig is an admin (system:masters) kubeconfig for kopf, helm, clients
"""

from __future__ import annotations

import base64
import ctypes
import datetime
import http.client
import ipaddress
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dtx_infra import toolchain
from dtx_infra.ports import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]

SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # the first address of SERVICE_CIDR goes to the `kubernetes` Service
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


class KubeError(RuntimeError):
    """Building, starting or talking to the control plane failed; the message names what."""


@dataclass(frozen=True)
class KubeBinaries:
    """Paths of the pinned control-plane binaries (built by ``make tools``)."""

    bin_dir: Path
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path
    helm: Path


def built_binaries() -> KubeBinaries:
    """The binaries ``make tools`` built; never builds (a missing one names ``make tools``)."""
    return KubeBinaries(
        toolchain.binary("kubectl").parent,
        toolchain.binary("etcd"),
        toolchain.binary("kube-apiserver"),
        toolchain.binary("kube-controller-manager"),
        toolchain.binary("kubectl"),
        toolchain.binary("helm"),
    )


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on free 127.0.0.1 ports.

    Everything (PKI, etcd data, kubeconfigs, logs/<name>.log) lives in ``state_dir``, which
    should be a fresh directory (e.g. from pytest's ``tmp_path_factory``): keys and ports are
    new on every start, so reusing an old state directory is not supported.

    Security is configured as in a real cluster on purpose, because that is what the code
    under test will meet: Node+RBAC authorization, x509 client certificates, service-account
    tokens signed with an RSA key, and a controller-manager using per-controller
    service-account credentials.
    """

    def __init__(
        self,
        state_dir: Path,
        binaries: KubeBinaries | None = None,
        *,
        start_timeout: float = 120.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.state_dir = state_dir
        self.kubeconfig = state_dir / "admin.kubeconfig"
        self.pki_dir = state_dir / "pki"
        self.server = ""  # https://127.0.0.1:<port>, set by start()
        self._binaries = binaries
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._procs: list[_Process] = []

    @property
    def binaries(self) -> KubeBinaries:
        if self._binaries is None:
            self._binaries = built_binaries()
        return self._binaries

    @property
    def pids(self) -> list[int]:
        """PIDs of the processes this instance started and has not stopped yet."""
        return [p.popen.pid for p in self._procs]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start all three components and return once each one reports healthy.

        Raises KubeError naming the component that exited or was not ready within
        ``start_timeout`` seconds (overall), with the tail of its log. On any failure the
        processes started so far are stopped again.
        """
        if self._procs:
            raise KubeError("control plane already started")
        bins = self.binaries
        deadline = time.monotonic() + self._start_timeout
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port, api_port, kcm_port = _free_ports(4)
        self.server = f"https://127.0.0.1:{api_port}"
        pki = self._write_pki()
        tls = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        tls.load_cert_chain(pki["admin.crt"], pki["admin.key"])
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        try:
            etcd = self._spawn(
                "etcd",
                [
                    str(bins.etcd),
                    "--name=dtx",
                    f"--data-dir={self.state_dir / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=dtx={peer_url}",
                    "--unsafe-no-fsync",  # throwaway test data: durability buys nothing, costs time
                    "--log-level=warn",
                ],
            )
            self._wait_healthy(etcd, f"{etcd_url}/health", None, deadline)

            apiserver = self._spawn(
                "kube-apiserver",
                [
                    str(bins.kube_apiserver),
                    f"--etcd-servers={etcd_url}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={api_port}",
                    f"--tls-cert-file={pki['serving.crt']}",
                    f"--tls-private-key-file={pki['serving.key']}",
                    f"--client-ca-file={pki['ca.crt']}",
                    "--authorization-mode=Node,RBAC",
                    f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                    f"--service-account-key-file={pki['sa.pub']}",
                    f"--service-account-signing-key-file={pki['sa.key']}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    # Endpoints may not point at loopback, and no pod here could use them.
                    "--endpoint-reconciler-type=none",
                    # Front-proxy (request-header) authentication as kubeadm sets it up:
                    # aggregated API servers and delegated authentication (the controller-
                    # manager's own endpoint) expect it.
                    f"--requestheader-client-ca-file={pki['front-proxy-ca.crt']}",
                    "--requestheader-allowed-names=front-proxy-client",
                    "--requestheader-username-headers=X-Remote-User",
                    "--requestheader-group-headers=X-Remote-Group",
                    "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                    f"--proxy-client-cert-file={pki['front-proxy-client.crt']}",
                    f"--proxy-client-key-file={pki['front-proxy-client.key']}",
                    "--profiling=false",
                ],
            )
            self._wait_healthy(apiserver, f"{self.server}/readyz", tls, deadline)

            kcm_kubeconfig = self.state_dir / "controller-manager.kubeconfig"
            kcm = self._spawn(
                "kube-controller-manager",
                [
                    str(bins.kube_controller_manager),
                    f"--kubeconfig={kcm_kubeconfig}",
                    f"--authentication-kubeconfig={kcm_kubeconfig}",
                    f"--authorization-kubeconfig={kcm_kubeconfig}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={kcm_port}",
                    f"--tls-cert-file={pki['serving.crt']}",
                    f"--tls-private-key-file={pki['serving.key']}",
                    # Every default controller: garbagecollector, namespace, serviceaccount,
                    # serviceaccount-token, deployment, replicaset, job, ...
                    "--controllers=*",
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={pki['sa.key']}",
                    f"--root-ca-file={pki['ca.crt']}",
                    f"--cluster-signing-cert-file={pki['ca.crt']}",
                    f"--cluster-signing-key-file={pki['ca.key']}",
                    "--leader-elect=false",  # single instance: don't wait for a lease
                    "--profiling=false",
                ],
            )
            self._wait_healthy(kcm, f"https://127.0.0.1:{kcm_port}/healthz", tls, deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop what start() started, newest first; idempotent.

        Reverse order so no component spends its shutdown retrying a peer that is already
        gone. SIGTERM allows a clean shutdown; SIGKILL follows after ``stop_timeout``.
        Every process is waited for, so none is left running or as a zombie.
        """
        while self._procs:
            proc = self._procs.pop().popen
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(self._stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl as cluster admin; raise KubeError (with stderr) if it fails
        and ``check`` is true."""
        return run_kubectl(
            self.binaries.kubectl, self.kubeconfig, args,
            input=input, check=check, timeout=timeout, error=KubeError,
        )  # fmt: skip

    def _spawn(self, name: str, argv: list[str]) -> _Process:
        log = self.state_dir / "logs" / f"{name}.log"
        # Own session: a Ctrl-C in the terminal reaches only the test process, whose
        # stop() then shuts the components down in order.
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        proc = _Process(name, popen, log)
        self._procs.append(proc)
        return proc

    def _wait_healthy(
        self, proc: _Process, url: str, tls: ssl.SSLContext | None, deadline: float
    ) -> None:
        last_error = "no attempt yet"
        while True:
            if proc.popen.poll() is not None:
                raise KubeError(
                    f"{proc.name} exited with code {proc.popen.returncode} before {url} was "
                    f"healthy; last lines of {proc.log}:\n{_tail_file(proc.log)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=5, context=tls) as resp:
                    if resp.status == 200:
                        return
                    last_error = f"HTTP {resp.status}"
            except (OSError, http.client.HTTPException) as exc:
                last_error = str(exc)
            if time.monotonic() > deadline:
                raise KubeError(
                    f"{proc.name} not healthy at {url} within {self._start_timeout:.0f}s "
                    f"(last error: {last_error}); last lines of {proc.log}:\n"
                    f"{_tail_file(proc.log)}"
                )
            time.sleep(0.25)

    def _write_pki(self) -> dict[str, Path]:
        """Create the CA, certificates, service-account key and kubeconfigs; return paths.

        One CA signs the serving certificate (also used by the controller-manager), the
        admin client (O=system:masters), the controller-manager's client
        (CN=system:kube-controller-manager, bound by the default RBAC policy), and CSRs
        approved in the cluster (--cluster-signing-*); a second one the front proxy.
        """
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        files: dict[str, bytes] = {}
        ca = issue_certificate("dtx-kube-ca", None, ca=True)
        serving = issue_certificate(
            "kube-apiserver",
            ca,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            sans=[
                x509.DNSName("localhost"),
                *(x509.DNSName(n) for n in _kubernetes_service_names()),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address(SERVICE_IP)),
            ],
        )
        admin = issue_certificate("dtx-admin", ca, orgs=("system:masters",))
        kcm = issue_certificate("system:kube-controller-manager", ca)
        # A separate CA, so no certificate from ca (which also signs approved CSRs) can
        # act as the front proxy and assert arbitrary identities in headers.
        proxy_ca = issue_certificate("dtx-front-proxy-ca", None, ca=True)
        proxy_client = issue_certificate("front-proxy-client", proxy_ca)
        issued = {
            "ca": ca,
            "serving": serving,
            "admin": admin,
            "kcm": kcm,
            "front-proxy-ca": proxy_ca,
            "front-proxy-client": proxy_client,
        }
        for name, (cert, key) in issued.items():
            files[f"{name}.crt"] = cert.public_bytes(serialization.Encoding.PEM)
            files[f"{name}.key"] = key_pem(key)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        files["sa.key"] = key_pem(sa_key)
        files["sa.pub"] = sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        paths: dict[str, Path] = {}
        for name, data in files.items():
            path = paths[name] = self.pki_dir / name
            path.write_bytes(data)
            if name.endswith(".key"):
                path.chmod(0o600)
        for path, user in (
            (self.kubeconfig, "admin"),
            (self.state_dir / "controller-manager.kubeconfig", "kcm"),
        ):
            path.write_text(
                kubeconfig_json(
                    self.server, files["ca.crt"], files[f"{user}.crt"], files[f"{user}.key"]
                )
            )
            path.chmod(0o600)
        return paths


def run_kubectl(
    kubectl: Path,
    kubeconfig: Path,
    args: tuple[str, ...],
    *,
    input: str | None,
    check: bool,
    timeout: float,
    error: type[RuntimeError],
) -> subprocess.CompletedProcess[str]:
    """kubectl with one kubeconfig, bounded; ``error`` (naming the command and its stderr)
    when it fails and ``check`` is true. Shared by the control plane and the node."""
    result = subprocess.run(
        [str(kubectl), f"--kubeconfig={kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise error(
            f"kubectl {' '.join(args)} failed (exit {result.returncode}): {result.stderr.strip()}"
        )
    return result


CertAndKey = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def issue_certificate(
    common_name: str,
    signer: CertAndKey | None,
    *,
    orgs: tuple[str, ...] = (),
    ca: bool = False,
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    sans: list[x509.GeneralName] | None = None,
) -> CertAndKey:
    """Issue an ECDSA P-256 certificate (self-signed when ``signer`` is None).

    Carries the extensions strict verifiers (Python 3.13's default X509_STRICT, Go) expect.
    For client certificates Kubernetes maps CN to the user name and O to its groups.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in orgs]
        + [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )
    issuer_cert, issuer_key = signer if signer else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=ca,
                crl_sign=ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _kubernetes_service_names() -> list[str]:
    return [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]


def kubeconfig_json(server: str, ca: bytes, cert: bytes, key: bytes) -> str:
    """A kubeconfig with embedded credentials. JSON is valid YAML, so every client reads it."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "dtx",
                    "cluster": {"server": server, "certificate-authority-data": b64(ca)},
                }
            ],
            "users": [
                {
                    "name": "dtx",
                    "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)},
                }
            ],
            "contexts": [{"name": "dtx", "context": {"cluster": "dtx", "user": "dtx"}}],
            "current-context": "dtx",
        },
        indent=2,
    )


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, outside the ephemeral range (see :func:`free_ports`)."""
    return free_ports(count)


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn asking the kernel to SIGKILL the child when its parent dies.

    So a test run that is itself SIGKILLed (CI timeout, OOM) leaves no etcd or apiserver
    behind. The kernel ties this to the *thread* that forked, so it is only armed when
    called from the main thread; from a worker thread (e.g. ``asyncio.to_thread``) it
    would kill the components as soon as that thread exits.
    """
    armed = threading.current_thread() is threading.main_thread()

    def preexec() -> None:
        if armed and _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return preexec


def _tail_file(path: Path, lines: int = 40) -> str:
    try:
        return _tail_text(path.read_text(errors="replace"), lines)
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def _tail_text(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])
