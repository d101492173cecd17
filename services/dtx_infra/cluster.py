"""One real Kubernetes node on this machine: ``dtx cluster up | down | status``.

Why not kind: it needs a Docker engine, and none runs here. The parts are the ones kind's
node image carries, brought up as processes: containerd and runc (Debian), the CNI bridge,
host-local, loopback and portmap plugins (Debian), and etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kubelet and kube-proxy built by ``make tools``;
CoreDNS runs as a pod. ``../shared/notes/single-node-cluster.md`` records each wall met on
this kind of machine and its fix; the comments below name the ones they answer.

Pods get real network namespaces and addresses; the traffic stays on this machine:
every range is inside 198.18.0.0/15 (reserved for benchmarks, used by no real network),
nothing is masqueraded out, a FORWARD rule drops pod traffic to anything outside the
cluster's ranges, and CoreDNS answers cluster names only.

The components run detached (pidfiles under the state directory), so ``up`` returns and
the cluster stays for ``kubectl``, ``helm`` and tests; ``down`` stops them newest first and
removes every mount, network namespace, bridge and iptables chain of its own.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from dtx_infra import debian, toolchain
from dtx_infra.errors import InfraError
from dtx_infra.kube import (
    SERVICE_ACCOUNT_ISSUER,
    CertAndKey,
    issue_certificate,
    key_pem,
    kubeconfig_json,
    run_kubectl,
)
from dtx_infra.locking import file_lock
from dtx_infra.procs import pid_alive, read_pidfile, spawn_detached, tail_file, terminate

# -- addresses: all inside 198.18.0.0/15 -------------------------------------------------------
CLUSTER_RANGE = "198.18.0.0/15"
NODE_IP = "198.18.0.1"  # on a port-less bridge: pods must reach the API server off loopback
POD_CIDR = "198.18.16.0/20"
POD_GATEWAY = "198.18.16.1"
SERVICE_CIDR = "198.19.0.0/20"
KUBERNETES_SERVICE_IP = "198.19.0.1"
DNS_SERVICE_IP = "198.19.0.10"
NODE_BRIDGE = "dtx-node0"
POD_BRIDGE = "dtx-cni0"
FORWARD_CHAIN = "DTX-FORWARD"
NODE_NAME = "dtx-node"
CLUSTER_DOMAIN = "cluster.local"

APISERVER_PORT = 6443
KUBELET_PORT = 10250
ETCD_PORTS = (23790, 23800)  # client, peer: on 127.0.0.1, off the well-known 2379/2380
CNI_BIN_DIR = Path("/usr/lib/cni")
# Paths the kubelet, containerd's shims and the CNI plugins use whatever their config says.
HOST_LEFTOVERS = (
    Path("/var/lib/kubelet/device-plugins"),
    Path("/var/lib/kubelet/plugins_registry"),
    Path("/var/lib/kubelet/pod-resources"),
)
COMPONENTS = (
    "containerd",
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
)
NODE_IMAGES = ("pause", "coredns")


class ClusterError(InfraError):
    """The node did not come up, or could not be taken down; the message names the part."""


@dataclass(frozen=True)
class ComponentState:
    name: str
    pid: int | None
    running: bool
    log: Path


def default_state_dir() -> Path:
    raw = os.environ.get("DTX_CLUSTER_DIR")
    return Path(raw) if raw else Path.cwd() / ".dtx" / "cluster"


def containerd_root() -> Path:
    """Images and snapshots survive ``down``: a warm ``up`` imports nothing again."""
    return toolchain.cache_root().parent / "containerd"


class Cluster:
    """The node's state directory and the operations on it."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = (state_dir or default_state_dir()).absolute()
        self.kubeconfig = self.state_dir / "admin.kubeconfig"
        self.pki = self.state_dir / "pki"
        self.logs = self.state_dir / "logs"
        self.pids = self.state_dir / "pids"
        self.containerd_socket = self.state_dir / "containerd" / "containerd.sock"
        self.server = f"https://{NODE_IP}:{APISERVER_PORT}"

    # -- status ------------------------------------------------------------------------------

    def components(self) -> list[ComponentState]:
        states = []
        for name in COMPONENTS:
            pid = read_pidfile(self.pids / f"{name}.pid")
            states.append(
                ComponentState(
                    name, pid, pid is not None and pid_alive(pid), self.logs / f"{name}.log"
                )
            )
        return states

    def is_up(self) -> bool:
        return all(c.running for c in self.components())

    # -- kubectl -----------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return run_kubectl(
            toolchain.binary("kubectl"), self.kubeconfig, args,
            input=input, check=check, timeout=timeout, error=ClusterError,
        )  # fmt: skip

    # -- up ----------------------------------------------------------------------------------

    def up(self, timeout_s: float = 240.0) -> None:
        """Start every component (a no-op for those running) and wait until CoreDNS is
        Ready; on failure, what was started is stopped again."""
        _check_host()
        bins = {name: toolchain.binary(name) for name in _GO_BINARIES}
        deadline = time.monotonic() + timeout_s
        with file_lock(self.state_dir.parent / ".cluster.lock", 60, "dtx cluster"):
            if self.is_up():
                return
            if any(c.running for c in self.components()):
                raise ClusterError(
                    f"a partly running cluster in {self.state_dir}: run `dtx cluster down`"
                )
            try:
                self._prepare_dirs()
                self._network_up()
                pki = self._write_pki()
                self._start_containerd(deadline)
                self._import_images()
                self._start_control_plane(bins, pki, deadline)
                self._start_node(bins, pki, deadline)
                self._start_dns(deadline)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._down()
                raise

    def _prepare_dirs(self) -> None:
        for d in (self.logs, self.pids, self.pki, self.state_dir / "containerd"):
            d.mkdir(parents=True, exist_ok=True)

    def _spawn(self, name: str, argv: Sequence[str | Path]) -> int:
        log = self.logs / f"{name}.log"
        pid = spawn_detached([str(a) for a in argv], log=log, cwd=self.state_dir)
        (self.pids / f"{name}.pid").write_text(f"{pid}\n")
        return pid

    def _wait(
        self, name: str, pid: int, ready: Callable[[], bool], deadline: float, what: str = "ready"
    ) -> None:
        """Poll ``ready`` until true; fail naming ``name`` if it exits or the time is up."""
        last = "no answer yet"
        while True:
            if not pid_alive(pid):
                raise ClusterError(
                    f"{name} exited before it was {what}",
                    tail_file(self.logs / f"{name}.log"),
                )
            try:
                if ready():
                    return
            except (OSError, http.client.HTTPException, ssl.SSLError, ClusterError) as exc:
                last = " ".join(str(exc).split())[:300]
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{name} was not {what} in time (last: {last})",
                    tail_file(self.logs / f"{name}.log"),
                )
            time.sleep(0.25)

    # -- network -----------------------------------------------------------------------------

    def _network_up(self) -> None:
        """The node's address on a port-less bridge, forwarding on, and the FORWARD guard.

        The pods' bridge itself is made by the CNI bridge plugin on the first pod.
        """
        if not _link_exists(NODE_BRIDGE):
            _ip("link", "add", NODE_BRIDGE, "type", "bridge")
        _ip("addr", "replace", f"{NODE_IP}/32", "dev", NODE_BRIDGE)
        _ip("link", "set", NODE_BRIDGE, "up")
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        # Bridged pod-to-Service traffic must pass kube-proxy's iptables rules.
        bridge_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        if bridge_nf.exists():
            bridge_nf.write_text("1\n")
        before = self.state_dir / "host-chains-before.json"
        if not before.exists():  # the first up of this state: what the host had already
            before.write_text(json.dumps(_kube_chains()))
        _iptables("-N", FORWARD_CHAIN, check=False)
        _iptables("-F", FORWARD_CHAIN)
        # Pods may talk to the cluster's own ranges only: nothing leaves the machine.
        _iptables("-A", FORWARD_CHAIN, "-s", POD_CIDR, "!", "-d", CLUSTER_RANGE, "-j", "DROP")
        _iptables("-A", FORWARD_CHAIN, "-d", POD_CIDR, "!", "-s", CLUSTER_RANGE, "-j", "DROP")
        if _iptables("-C", "FORWARD", "-j", FORWARD_CHAIN, check=False).returncode != 0:
            _iptables("-I", "FORWARD", "1", "-j", FORWARD_CHAIN)
        cni = self.state_dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-dtx.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "0.4.0",
                    "name": "dtx",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": POD_BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,  # no masquerading: nothing goes out
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                                "routes": [{"dst": CLUSTER_RANGE}],
                                "dataDir": str(cni / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=2,
            )
        )

    # -- PKI ---------------------------------------------------------------------------------

    def _write_pki(self) -> dict[str, Path]:
        """One CA for every identity, a second for the front proxy; the kubeconfigs.

        Made once per state directory and kept, so a restarted node keeps its identity and
        clients keep their kubeconfig.
        """
        done = self.pki / ".complete"
        names = ("ca", "apiserver", "admin", "kcm", "scheduler", "node", "proxy", "kubelet")
        paths = {f"{n}.{ext}": self.pki / f"{n}.{ext}" for n in names for ext in ("crt", "key")}
        for extra in ("front-proxy-ca", "front-proxy-client", "apiserver-kubelet"):
            for ext in ("crt", "key"):
                paths[f"{extra}.{ext}"] = self.pki / f"{extra}.{ext}"
        paths["sa.key"] = self.pki / "sa.key"
        paths["sa.pub"] = self.pki / "sa.pub"
        if done.exists():
            return paths
        ips = [NODE_IP, KUBERNETES_SERVICE_IP, "127.0.0.1"]
        ca = issue_certificate("dtx-cluster-ca", None, ca=True)
        proxy_ca = issue_certificate("dtx-front-proxy-ca", None, ca=True)
        server_names = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
        ]
        issued: dict[str, CertAndKey] = {
            "ca": ca,
            "front-proxy-ca": proxy_ca,
            "apiserver": _server_cert("kube-apiserver", ca, server_names, ips),
            "kubelet": _server_cert(NODE_NAME, ca, [NODE_NAME, "localhost"], [NODE_IP]),
            "admin": issue_certificate("dtx-admin", ca, orgs=("system:masters",)),
            "apiserver-kubelet": issue_certificate(
                "kube-apiserver-kubelet-client", ca, orgs=("system:masters",)
            ),
            "kcm": issue_certificate("system:kube-controller-manager", ca),
            "scheduler": issue_certificate("system:kube-scheduler", ca),
            "node": issue_certificate(f"system:node:{NODE_NAME}", ca, orgs=("system:nodes",)),
            "proxy": issue_certificate("system:kube-proxy", ca),
            "front-proxy-client": issue_certificate("front-proxy-client", proxy_ca),
        }
        self.pki.mkdir(parents=True, exist_ok=True)
        for name, (cert, key) in issued.items():
            paths[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            paths[f"{name}.key"].write_bytes(key_pem(key))
            paths[f"{name}.key"].chmod(0o600)
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        paths["sa.key"].write_bytes(key_pem(sa))
        paths["sa.key"].chmod(0o600)
        paths["sa.pub"].write_bytes(
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        ca_pem = paths["ca.crt"].read_bytes()
        for user, file in (
            ("admin", self.kubeconfig),
            ("kcm", self.state_dir / "kcm.kubeconfig"),
            ("scheduler", self.state_dir / "scheduler.kubeconfig"),
            ("node", self.state_dir / "kubelet.kubeconfig"),
            ("proxy", self.state_dir / "proxy.kubeconfig"),
        ):
            file.write_text(
                kubeconfig_json(
                    self.server,
                    ca_pem,
                    paths[f"{user}.crt"].read_bytes(),
                    paths[f"{user}.key"].read_bytes(),
                )
            )
            file.chmod(0o600)
        done.write_text("ok\n")
        return paths

    # -- containerd and images ---------------------------------------------------------------

    def _start_containerd(self, deadline: float) -> None:
        from dtx_infra import images

        pause_ref, _ = images.archive("pause")
        root = containerd_root()
        root.mkdir(parents=True, exist_ok=True)
        state = self.state_dir / "containerd" / "state"
        config = self.state_dir / "containerd" / "config.toml"
        config.write_text(
            _containerd_config(
                root=root,
                state=state,
                socket=self.containerd_socket,
                sandbox_image=pause_ref,
                cni_conf_dir=self.state_dir / "cni" / "net.d",
            )
        )
        pid = self._spawn("containerd", ["containerd", "--config", config])
        self._wait("containerd", pid, self._containerd_answers, deadline, "answering")

    def ctr(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", str(self.containerd_socket), "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _containerd_answers(self) -> bool:
        return self.containerd_socket.exists() and self.ctr("version", timeout=10).returncode == 0

    def _import_images(self) -> None:
        self.load_images(NODE_IMAGES)

    def load_images(self, names: Sequence[str]) -> None:
        """Import built images into the node's containerd (``k8s.io``), those it lacks only.

        The node itself needs the pause and CoreDNS images; the charts' images are loaded
        by whoever installs them (a test, or ``dtx images build`` with a node up).
        """
        from dtx_infra import images

        images.import_into_containerd("ctr", str(self.containerd_socket), names)

    # -- control plane -----------------------------------------------------------------------

    def _start_control_plane(
        self, bins: dict[str, Path], pki: dict[str, Path], deadline: float
    ) -> None:
        etcd_client, etcd_peer = (f"http://127.0.0.1:{p}" for p in ETCD_PORTS)
        pid = self._spawn(
            "etcd",
            [
                bins["etcd"],
                "--name=dtx",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={etcd_client}",
                f"--advertise-client-urls={etcd_client}",
                f"--listen-peer-urls={etcd_peer}",
                f"--initial-advertise-peer-urls={etcd_peer}",
                f"--initial-cluster=dtx={etcd_peer}",
                "--unsafe-no-fsync",  # a development node: durability buys nothing here
                "--log-level=warn",
            ],
        )
        self._wait("etcd", pid, lambda: _http_ok(f"{etcd_client}/health", None), deadline)
        tls = self.admin_tls()
        pid = self._spawn(
            "kube-apiserver",
            [
                bins["kube-apiserver"],
                f"--etcd-servers={etcd_client}",
                f"--bind-address={NODE_IP}",
                f"--advertise-address={NODE_IP}",
                f"--secure-port={APISERVER_PORT}",
                f"--tls-cert-file={pki['apiserver.crt']}",
                f"--tls-private-key-file={pki['apiserver.key']}",
                f"--client-ca-file={pki['ca.crt']}",
                f"--kubelet-client-certificate={pki['apiserver-kubelet.crt']}",
                f"--kubelet-client-key={pki['apiserver-kubelet.key']}",
                f"--kubelet-certificate-authority={pki['ca.crt']}",
                "--kubelet-preferred-address-types=InternalIP",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki['sa.pub']}",
                f"--service-account-signing-key-file={pki['sa.key']}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
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
        self._wait("kube-apiserver", pid, lambda: _http_ok(f"{self.server}/readyz", tls), deadline)
        common = [
            "--bind-address=127.0.0.1",
            # No request-header CA is published to kube-system for them to look up.
            "--authentication-skip-lookup=true",
            "--leader-elect=false",
            "--profiling=false",
        ]
        kcm_conf = self.state_dir / "kcm.kubeconfig"
        pid = self._spawn(
            "kube-controller-manager",
            [
                bins["kube-controller-manager"],
                f"--kubeconfig={kcm_conf}",
                f"--authentication-kubeconfig={kcm_conf}",
                f"--authorization-kubeconfig={kcm_conf}",
                "--secure-port=10257",
                "--controllers=*",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki['sa.key']}",
                f"--root-ca-file={pki['ca.crt']}",
                f"--cluster-signing-cert-file={pki['ca.crt']}",
                f"--cluster-signing-key-file={pki['ca.key']}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cluster-cidr={POD_CIDR}",
                *common,
            ],
        )
        insecure = _insecure_tls()
        self._wait(
            "kube-controller-manager",
            pid,
            lambda: _http_ok("https://127.0.0.1:10257/healthz", insecure),
            deadline,
        )
        sched_conf = self.state_dir / "scheduler.kubeconfig"
        pid = self._spawn(
            "kube-scheduler",
            [
                bins["kube-scheduler"],
                f"--kubeconfig={sched_conf}",
                f"--authentication-kubeconfig={sched_conf}",
                f"--authorization-kubeconfig={sched_conf}",
                "--secure-port=10259",
                *common,
            ],
        )
        self._wait(
            "kube-scheduler",
            pid,
            lambda: _http_ok("https://127.0.0.1:10259/healthz", insecure),
            deadline,
        )

    def admin_tls(self) -> ssl.SSLContext:
        tls = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        tls.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        return tls

    # -- node --------------------------------------------------------------------------------

    def _start_node(self, bins: dict[str, Path], pki: dict[str, Path], deadline: float) -> None:
        kubelet_dir = self.state_dir / "kubelet"
        kubelet_dir.mkdir(exist_ok=True)
        # Pods with dnsPolicy Default get this: no upstream resolver, nothing asked outside.
        resolv = self.state_dir / "resolv.conf"
        resolv.write_text(f"search {CLUSTER_DOMAIN}\noptions ndots:1\n")
        config = self.state_dir / "kubelet.yaml"
        config.write_text(
            json.dumps(
                _kubelet_config(
                    pki=pki,
                    socket=self.containerd_socket,
                    resolv=resolv,
                    pod_logs=self.state_dir / "pod-logs",
                    plugins=self.state_dir / "volume-plugins",
                ),
                indent=2,
            )
        )
        pid = self._spawn(
            "kubelet",
            [
                bins["kubelet"],
                f"--config={config}",
                f"--kubeconfig={self.state_dir / 'kubelet.kubeconfig'}",
                f"--root-dir={kubelet_dir}",
                f"--cert-dir={self.state_dir / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )
        self._wait("kubelet", pid, self._node_ready, deadline, "Ready (node)")
        proxy_conf = self.state_dir / "kube-proxy.yaml"
        proxy_conf.write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(self.state_dir / "proxy.kubeconfig")},
                    "mode": "iptables",
                    "clusterCIDR": POD_CIDR,
                    "hostnameOverride": NODE_NAME,
                    "bindAddress": NODE_IP,
                    "healthzBindAddress": "127.0.0.1:10256",
                    "metricsBindAddress": "127.0.0.1:10249",
                    # NodePorts answer on the node's own address only, not on the uplink.
                    "nodePortAddresses": [f"{NODE_IP}/32"],
                    # Leave the machine's conntrack table size alone.
                    "conntrack": {"maxPerCore": 0, "min": 0},
                },
                indent=2,
            )
        )
        pid = self._spawn("kube-proxy", [bins["kube-proxy"], f"--config={proxy_conf}"])
        self._wait(
            "kube-proxy", pid, lambda: _http_ok("http://127.0.0.1:10256/healthz", None), deadline
        )

    def _node_ready(self) -> bool:
        out = self.kubectl(
            "get", "node", NODE_NAME, "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            check=False, timeout=20,
        )  # fmt: skip
        return out.returncode == 0 and out.stdout.strip() == "True"

    # -- DNS ---------------------------------------------------------------------------------

    def _start_dns(self, deadline: float) -> None:
        from dtx_infra import images

        ref, _ = images.archive("coredns")
        self.kubectl("apply", "-f", "-", input=_coredns_manifest(ref))
        last = ""
        while time.monotonic() < deadline:
            out = self.kubectl(
                "-n", "kube-system", "get", "pods", "-l", "k8s-app=kube-dns", "-o",
                "jsonpath={.items[*].status.conditions[?(@.type=='Ready')].status}",
                check=False, timeout=20,
            )  # fmt: skip
            last = out.stdout.strip() or out.stderr.strip()
            if last == "True":
                return
            time.sleep(0.5)
        described = self.kubectl(
            "-n", "kube-system", "describe", "pods", "-l", "k8s-app=kube-dns", check=False
        ).stdout
        raise ClusterError(f"CoreDNS was not Ready in time (last: {last!r})", described[-3000:])

    # -- down --------------------------------------------------------------------------------

    def down(self, timeout_s: float = 120.0) -> None:
        with file_lock(self.state_dir.parent / ".cluster.lock", 60, "dtx cluster"):
            self._down(timeout_s)

    def _down(self, timeout_s: float = 120.0) -> None:
        """Stop newest first, then remove every trace on the host; idempotent."""
        deadline = time.monotonic() + timeout_s
        self.logs.mkdir(parents=True, exist_ok=True)
        steps = _StepLog(self.logs / "down.log")
        running = {c.name: c.pid for c in self.components() if c.running and c.pid}
        for name in ("kube-proxy", "kubelet"):
            if name in running:
                terminate([running[name]], 15, f"stopping {name}")
                steps.done(f"stopped {name}")
        netns = self._pod_network_namespaces() if "containerd" in running else []
        containers = self._container_ids() if "containerd" in running else []
        if "containerd" in running:
            self._kill_pod_tasks(containers)
        steps.done(f"killed the tasks of {len(containers)} containers")
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if name in running:  # the API server before etcd, or its shutdown hangs
                terminate([running[name]], 15, f"stopping {name}")
                steps.done(f"stopped {name}")
        if "containerd" in running:
            terminate([running["containerd"]], 15, "stopping containerd")
        self._kill_orphan_shims()
        steps.done("stopped containerd and its shims")
        for path in netns:
            _umount(Path(path))
            with contextlib.suppress(OSError):
                Path(path).unlink()
        for root in (self.state_dir, containerd_root(), Path("/run/containerd")):
            for mount in _mounts_under(root):
                _umount(mount)
        steps.done(f"unmounted {len(netns)} network namespaces and the pods' mounts")
        # kube-proxy's own chains (KUBE-SERVICES, KUBE-POSTROUTING, ...) go with its --cleanup.
        with contextlib.suppress(toolchain.ToolMissing, OSError, subprocess.SubprocessError):
            subprocess.run(
                [str(toolchain.binary("kube-proxy")), "--cleanup"],
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip
        # What kube-proxy --cleanup leaves (the kubelet's KUBE-FIREWALL, say), unless the
        # host had it before the first up.
        before = self.state_dir / "host-chains-before.json"
        had = json.loads(before.read_text()) if before.exists() else {}
        for table, chains in _kube_chains().items():
            _remove_chains(table, [c for c in chains if c not in had.get(table, [])])
        steps.done("removed the iptables chains")
        _remove_host_files(self.state_dir, containers)
        if _iptables("-C", "FORWARD", "-j", FORWARD_CHAIN, check=False).returncode == 0:
            _iptables("-D", "FORWARD", "-j", FORWARD_CHAIN)
        _iptables("-F", FORWARD_CHAIN, check=False)
        _iptables("-X", FORWARD_CHAIN, check=False)
        for link in (POD_BRIDGE, NODE_BRIDGE):
            if _link_exists(link):
                _ip("link", "del", link)
        for pidfile in self.pids.glob("*.pid"):
            pidfile.unlink()
        steps.done("removed the bridges and host files")
        if time.monotonic() > deadline:
            raise ClusterError(
                f"dtx cluster down took longer than {timeout_s:.0f}s", steps.path.read_text()
            )

    def _container_ids(self) -> list[str]:
        return self.ctr("containers", "list", "--quiet", timeout=30).stdout.split()

    def _pod_network_namespaces(self) -> list[str]:
        """The netns of every pod sandbox, from containerd's own records of them."""
        found = []
        listed = self.ctr("containers", "list", "--quiet", timeout=30)
        for cid in listed.stdout.split():
            info = self.ctr("containers", "info", cid, timeout=30)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                spec = json.loads(info.stdout)["Spec"]
                for ns in spec["linux"]["namespaces"]:
                    if ns.get("type") == "network" and ns.get("path"):
                        found.append(ns["path"])
        return sorted(set(found))

    def _kill_pod_tasks(self, containers: Sequence[str]) -> None:
        """Kill and delete every container of the node in two calls, not two per container
        (seventy containers took 160 s one by one on a loaded machine). Deleting them keeps
        containerd's root, which outlives the node for its images, free of stale pods."""
        tasks = self.ctr("tasks", "list", "--quiet", timeout=30).stdout.split()
        if tasks:
            self.ctr("tasks", "delete", "--force", *tasks, timeout=120)
        if containers:
            self.ctr("containers", "delete", *containers, timeout=120)

    def _kill_orphan_shims(self) -> None:
        """Shims outlive containerd by design; ours name our socket on their command line."""
        socket = str(self.containerd_socket)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and socket.encode() in argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


class _StepLog:
    """How long each step of ``down`` took, in logs/down.log: a slow teardown says where."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = time.monotonic()
        path.write_text("")

    def done(self, step: str) -> None:
        now = time.monotonic()
        with self.path.open("a") as out:
            out.write(f"{now - self.last:6.1f}s  {step}\n")
        self.last = now


# -- helpers -----------------------------------------------------------------------------------

# The node's Go-built parts: the Kubernetes group and etcd (see dtx_infra.toolchain).
_GO_BINARIES = (*toolchain.group("kubernetes").binaries, "etcd")


def _check_host() -> None:
    if os.geteuid() != 0:
        raise ClusterError("dtx cluster needs root (network namespaces, mounts, iptables)")
    missing = [
        tool
        for tool in ("containerd", "runc", "ctr", "iptables", "ip", "conntrack")
        if shutil.which(tool) is None
    ]
    missing += [p for p in ("bridge", "host-local", "loopback", "portmap")
                if not (CNI_BIN_DIR / p).exists()]  # fmt: skip
    if missing:
        raise ClusterError(
            f"missing on this machine: {', '.join(missing)}; `make tools` installs "
            f"the Debian packages {' '.join(debian.CLUSTER_PACKAGES)}"
        )


def _server_cert(name: str, ca: CertAndKey, dns: list[str], ips: list[str]) -> CertAndKey:
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    return issue_certificate(name, ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans)


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check)


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["iptables", "-w", "10", *args], check)


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _kube_chains() -> dict[str, list[str]]:
    """The KUBE-* chains of each iptables table now."""
    found: dict[str, list[str]] = {}
    for table in ("filter", "nat", "mangle"):
        out = _iptables("-t", table, "-S", check=False).stdout.splitlines()
        found[table] = [line.split()[1] for line in out if line.startswith("-N KUBE-")]
    return found


def _remove_chains(table: str, chains: Sequence[str]) -> None:
    """Drop every jump to ``chains`` in ``table``, then the chains: one iptables-restore
    transaction, however many Service chains there are."""
    if not chains:
        return
    doomed = set(chains)
    lines = [f"*{table}"]
    for rule in _iptables("-t", table, "-S", check=False).stdout.splitlines():
        parts = rule.split()
        jumps = "-j" in parts and parts[parts.index("-j") + 1] in doomed
        if parts[:1] == ["-A"] and parts[1] not in doomed and jumps:
            lines.append(" ".join(["-D", *parts[1:]]))
    lines += [f"-F {chain}" for chain in chains] + [f"-X {chain}" for chain in chains]
    lines.append("COMMIT\n")
    result = subprocess.run(
        ["iptables-restore", "-w", "10", "--noflush"], input="\n".join(lines),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise ClusterError(f"removing {len(chains)} {table} chains failed: {result.stderr}")


def _remove_host_files(state_dir: Path, containers: Sequence[str]) -> None:
    """What the kubelet and libcni write outside their configured directories."""
    with contextlib.suppress(OSError):
        for link in Path("/var/log/containers").iterdir():
            if link.is_symlink() and os.readlink(link).startswith(str(state_dir)):
                link.unlink()
    with contextlib.suppress(OSError):
        for cached in Path("/var/lib/cni/results").iterdir():
            if any(cid in cached.name for cid in containers):
                cached.unlink()
    for leftover in HOST_LEFTOVERS:
        shutil.rmtree(leftover, ignore_errors=True)
    for directory in (
        Path("/var/lib/cni/results"), Path("/var/lib/cni"), Path("/var/log/containers"),
        Path("/var/lib/kubelet"),
    ):  # fmt: skip
        with contextlib.suppress(OSError):
            directory.rmdir()  # only when empty: never what others keep there


def _mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root``, deepest first (so children go before parents)."""
    prefix = str(root.resolve()) if root.exists() else str(root)
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def _http_ok(url: str, tls: ssl.SSLContext | None) -> bool:
    with urllib.request.urlopen(url, timeout=5, context=tls) as response:
        return bool(response.status == 200)


def _insecure_tls() -> ssl.SSLContext:
    """For the scheduler's and controller-manager's self-signed health endpoints on loopback."""
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    return tls


def _containerd_config(
    *, root: Path, state: Path, socket: Path, sandbox_image: str, cni_conf_dir: Path
) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{socket}"

[{cri}]
  sandbox_image = "{sandbox_image}"
  # Without CAP_SYS_RESOURCE the sandbox's oom_score_adj of -998 cannot be set, and runc
  # fails with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  enable_unprivileged_ports = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf_dir}"
"""


def _kubelet_config(
    *, pki: dict[str, Path], socket: Path, resolv: Path, pod_logs: Path, plugins: Path
) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": str(pki["kubelet.crt"]),
        "tlsPrivateKeyFile": str(pki["kubelet.key"]),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki["ca.crt"])},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{socket}",
        "imageServiceEndpoint": f"unix://{socket}",
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "failCgroupV1": False,  # this machine has cgroup v1 (hybrid)
        "makeIPTablesUtilChains": False,
        "volumePluginDir": str(plugins),
        "podLogsDir": str(pod_logs),
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(resolv),
        "serializeImagePulls": False,
        "registerNode": True,
        # Images are imported, never pulled: they must not be collected either.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        # ConfigMap volumes are refreshed within this period plus the cache's TTL; short
        # here so a TransactionPolicy reaches the pods quickly on a development node.
        "syncFrequency": "10s",
        "configMapAndSecretChangeDetectionStrategy": "Watch",
        "nodeStatusReportFrequency": "10s",
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "protectKernelDefaults": False,
        "maxPods": 60,
        "shutdownGracePeriod": "0s",
    }


def _coredns_manifest(image: str) -> str:
    """CoreDNS answering the cluster's names only: no ``forward``, so nothing leaves."""
    # Port 1053 in the pod: a non-root process may not bind 53; the Service maps 53 to it.
    corefile = f""".:1053 {{
    errors
    health {{
        lameduck 2s
    }}
    ready
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    cache 30
    loop
    reload
}}
"""
    labels = {"k8s-app": "kube-dns"}
    objects: list[dict[str, object]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "coredns", "namespace": "kube-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [
             {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
              "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
              "verbs": ["list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns",
                       "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "coredns", "namespace": "kube-system"},
         "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": labels},
             "template": {
                 "metadata": {"labels": labels},
                 "spec": {
                     "serviceAccountName": "coredns",
                     "dnsPolicy": "Default",
                     "priorityClassName": "system-cluster-critical",
                     "tolerations": [{"operator": "Exists"}],
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 65532,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{
                         "name": "coredns",
                         "image": image,
                         "imagePullPolicy": "Never",
                         "args": ["-conf", "/etc/coredns/Corefile"],
                         "ports": [{"name": "dns", "containerPort": 1053, "protocol": "UDP"},
                                   {"name": "dns-tcp", "containerPort": 1053,
                                    "protocol": "TCP"}],
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181},
                                            "periodSeconds": 2},
                         "livenessProbe": {"httpGet": {"path": "/health", "port": 8080},
                                           "periodSeconds": 10},
                         "securityContext": {"allowPrivilegeEscalation": False,
                                             "readOnlyRootFilesystem": True,
                                             "capabilities": {"drop": ["ALL"]}},
                         "resources": {"requests": {"cpu": "20m", "memory": "32Mi"},
                                       "limits": {"memory": "128Mi"}},
                         "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                     }],
                     "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
         "spec": {
             "selector": labels,
             "clusterIP": DNS_SERVICE_IP,
             "ports": [
                 {"name": "dns", "port": 53, "targetPort": 1053, "protocol": "UDP"},
                 {"name": "dns-tcp", "port": 53, "targetPort": 1053, "protocol": "TCP"},
             ],
         }},
    ]  # fmt: skip
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})


@contextlib.contextmanager
def running(state_dir: Path, timeout_s: float = 240.0) -> Iterator[Cluster]:
    """A cluster for the length of a block (tests): up on entry, down on exit."""
    cluster = Cluster(state_dir)
    cluster.up(timeout_s)
    try:
        yield cluster
    finally:
        cluster.down()
