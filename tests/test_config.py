"""The daemon's configuration: kube-proxy flags, the KubeProxyConfiguration file, and how they merge."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy.daemon.config import (
    APPLIED,
    CHECKED,
    FIELDS,
    IGNORED,
    SCHEMA,
    ConfigError,
    DaemonConfig,
    add_daemon_flags,
    daemon_config,
    load_kube_proxy_configuration,
    parse_bind_address,
    parse_cidrs,
    parse_duration,
    parse_nodeport_addresses,
)
from kproxy.rules.compiler import ProxyConfig

HEADER = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"

# Every field of upstream's v1alpha1 KubeProxyConfiguration, with realistic values.
FULL = HEADER + """\
featureGates:
  KubeProxyNFTablesLocalhostNodePorts: false
  TopologyAwareHints: true
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  acceptContentTypes: ""
  contentType: application/vnd.kubernetes.protobuf
  qps: 5.5
  burst: 10
logging:
  format: json
  flushFrequency: 5s
  verbosity: 2
  vmodule:
    - filePattern: proxier*
      verbosity: 4
  options:
    text:
      splitStream: false
      infoBufferSize: "0"
    json:
      splitStream: true
      infoBufferSize: 64Ki
hostnameOverride: Node-A.example.com
bindAddress: 0.0.0.0
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: "[::]:10249"
bindAddressHardFail: false
enableProfiling: false
showHiddenMetricsForVersion: ""
mode: nftables
iptables:
  masqueradeBit: 14
  masqueradeAll: false
  localhostNodePorts: true
  snatNodeInternalIP: false
  syncPeriod: 30s
  minSyncPeriod: 1s
ipvs:
  syncPeriod: 30s
  minSyncPeriod: 0s
  scheduler: rr
  excludeCIDRs: [10.200.0.0/16]
  strictARP: true
  tcpTimeout: 0s
  tcpFinTimeout: 0s
  udpTimeout: 0s
nftables:
  masqueradeBit: 14
  masqueradeAll: true
  syncPeriod: 1m
  minSyncPeriod: 250ms
winkernel:
  networkName: ""
  sourceVip: ""
  enableDSR: false
  rootHnsEndpointName: ""
  forwardHealthCheckVip: false
detectLocalMode: ClusterCIDR
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
clusterCIDR: 10.244.0.0/16,fd00:244::/48
nodePortAddresses: [192.168.0.0/16, "fd00:1::/64"]
oomScoreAdj: -999
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpEstablishedTimeout: 24h0m0s
  tcpCloseWaitTimeout: 1h0m0s
  tcpBeLiberal: false
  udpTimeout: 0s
  udpStreamTimeout: 0s
configSyncPeriod: 15m0s
portRange: ""
windowsRunAsService: false
"""

# What kubeadm writes: every field, nearly all zero. Zero means "not set", as upstream defaults it.
KUBEADM_ZERO = HEADER + """\
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection: {acceptContentTypes: "", burst: 0, contentType: "", kubeconfig: "", qps: 0}
clusterCIDR: ""
configSyncPeriod: 0s
conntrack: {maxPerCore: null, min: null, tcpBeLiberal: false, tcpCloseWaitTimeout: null,
            tcpEstablishedTimeout: null, udpStreamTimeout: 0s, udpTimeout: 0s}
detectLocal: {bridgeInterface: "", interfaceNamePrefix: ""}
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables: {localhostNodePorts: null, masqueradeAll: false, masqueradeBit: null, minSyncPeriod: 0s, syncPeriod: 0s}
ipvs: {excludeCIDRs: null, minSyncPeriod: 0s, scheduler: "", strictARP: false, syncPeriod: 0s,
       tcpFinTimeout: 0s, tcpTimeout: 0s, udpTimeout: 0s}
logging:
  flushFrequency: 0
  options: {json: {infoBufferSize: "0"}, text: {infoBufferSize: "0"}}
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables: {masqueradeAll: false, masqueradeBit: null, minSyncPeriod: 0s, syncPeriod: 0s}
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel: {enableDSR: false, forwardHealthCheckVip: false, networkName: "", rootHnsEndpointName: "", sourceVip: ""}
"""


@pytest.fixture(autouse=True)
def node_name_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "env-node")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kproxy")
    add_daemon_flags(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def _config(*argv: str) -> DaemonConfig:
    return daemon_config(_parser().parse_args(list(argv)))


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kube-proxy.yaml"
    path.write_text(text)
    return str(path)


# --- defaults and flags -------------------------------------------------------------------------


def test_defaults() -> None:
    """With no flags and no file, every field has its documented default."""
    assert _config() == DaemonConfig(
        node_name="env-node",
        cluster_cidrs=(),
        nodeport_addresses=(),
        masquerade_all=False,
        min_sync_period=0.1,
        sync_period=30.0,
        metrics_bind_address="127.0.0.1:10249",
        healthz_bind_address="0.0.0.0:10256",
        kubeconfig=None,
        log_format="text",
        log_level="info",
        service_metrics="annotated",
    )


def test_default_node_name_is_the_lowercased_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $NODE_NAME, the node name is the hostname, lowercased."""
    monkeypatch.delenv("NODE_NAME")
    monkeypatch.setattr("socket.gethostname", lambda: "Worker-7.Example.COM")
    assert _config().node_name == "worker-7.example.com"


@pytest.mark.parametrize(
    "argv, field, expected",
    [
        pytest.param(["--hostname-override", "Node-B"], "node_name", "node-b", id="hostname-override"),
        pytest.param(["--node-name=node-c"], "node_name", "node-c", id="node-name-alias"),
        pytest.param(["--kubeconfig", "/etc/kubeconfig"], "kubeconfig", "/etc/kubeconfig", id="kubeconfig"),
        pytest.param(["--cluster-cidr", "10.244.0.1/16, fd00::/48"], "cluster_cidrs",
                     ("10.244.0.0/16", "fd00::/48"), id="cluster-cidr-dual-stack-canonical"),
        pytest.param(["--nodeport-addresses", "192.168.0.0/16"], "nodeport_addresses", ("192.168.0.0/16",),
                     id="nodeport-addresses-cidr"),
        pytest.param(["--nodeport-addresses", "primary"], "nodeport_addresses", (), id="nodeport-addresses-primary"),
        pytest.param(["--nodeport-addresses=all"], "nodeport_addresses", ("0.0.0.0/0", "::/0"),
                     id="nodeport-addresses-all"),
        pytest.param(["--masquerade-all"], "masquerade_all", True, id="masquerade-all"),
        pytest.param(["--masquerade-all=false"], "masquerade_all", False, id="masquerade-all-false"),
        pytest.param(["--min-sync-period", "0"], "min_sync_period", 0.0, id="min-sync-period-zero"),
        pytest.param(["--min-sync-period=1s"], "min_sync_period", 1.0, id="min-sync-period"),
        pytest.param(["--sync-period", "1m30s"], "sync_period", 90.0, id="sync-period"),
        pytest.param(["--metrics-bind-address", "0.0.0.0:9100"], "metrics_bind_address", "0.0.0.0:9100",
                     id="metrics-bind-address"),
        pytest.param(["--healthz-bind-address", "[::0]:0"], "healthz_bind_address", "[::]:0",
                     id="healthz-bind-address-ipv6-port-0"),
        pytest.param(["--log-format", "json"], "log_format", "json", id="log-format"),
        pytest.param(["-v"], "log_level", "debug", id="verbose"),
        pytest.param(["--service-metrics", "all"], "service_metrics", "all", id="service-metrics-all"),
        pytest.param(["--service-metrics=none"], "service_metrics", "none", id="service-metrics-none"),
        pytest.param(["--service-metrics", "annotated"], "service_metrics", "annotated", id="service-metrics-annotated"),
    ],
)
def test_flag(argv: list[str], field: str, expected: Any) -> None:
    """Each flag sets its field, in kube-proxy's syntax."""
    assert getattr(_config(*argv), field) == expected


def test_add_daemon_flags_on_an_argument_group() -> None:
    """The flags can go into an argument group, and every default is None."""
    parser = argparse.ArgumentParser()
    add_daemon_flags(parser.add_argument_group("daemon"))
    args = parser.parse_args([])
    assert set(vars(args)) >= {"config", "kubeconfig", "hostname_override", "cluster_cidr", "sync_period"}
    assert all(value is None for value in vars(args).values())


def test_proxy_config() -> None:
    """proxy_config() is the compiler's subset."""
    config = _config("--cluster-cidr", "10.244.0.0/16", "--nodeport-addresses", "10.0.0.0/8", "--masquerade-all")
    assert config.proxy_config() == ProxyConfig(("10.244.0.0/16",), ("10.0.0.0/8",), True)


# --- the file -----------------------------------------------------------------------------------


def test_full_file(tmp_path: Path) -> None:
    """Every upstream v1alpha1 field is accepted; the ones kproxy uses are applied."""
    config = _config("--config", _file(tmp_path, FULL))
    assert config == DaemonConfig(
        node_name="node-a.example.com",
        cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"),
        nodeport_addresses=("192.168.0.0/16", "fd00:1::/64"),
        masquerade_all=True,
        min_sync_period=0.25,
        sync_period=60.0,
        metrics_bind_address="[::]:10249",
        healthz_bind_address="0.0.0.0:10256",
        kubeconfig="/var/lib/kube-proxy/kubeconfig.conf",
        log_format="json",
        log_level="info",
    )


def test_ignored_fields_warn_once_each(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A field kproxy ignores gets one warning line that names the file, the field and why; none at debug level."""
    path = _file(tmp_path, FULL)
    with caplog.at_level(logging.DEBUG, logger="kproxy.daemon.config"):
        load_kube_proxy_configuration(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f'{path}: ipvs.scheduler = "rr" is ignored: kproxy has no IPVS mode' in "\n".join(warnings)
    assert all("\n" not in w and w.startswith(f"{path}: ") for w in warnings)
    named = [w.split(": ", 1)[1].split(" = ")[0] for w in warnings]
    assert len(named) == len(set(named)), "one warning per field"
    assert {"conntrack.maxPerCore", "iptables.syncPeriod", "oomScoreAdj", "featureGates"} <= set(named)
    assert not any("accepted but not used" in r.getMessage() for r in caplog.records)


def test_warnings_are_kept_for_the_startup_log(tmp_path: Path) -> None:
    """daemon_config keeps the file's warnings in the config (logged once logging is set up), not in its equality."""
    config = _config("--config", _file(tmp_path, HEADER + "ipvs: {strictARP: true}\n"))
    assert len(config.warnings) == 1 and "ipvs.strictARP = true is ignored" in config.warnings[0]
    assert config == _config()


# --- every field of a kubeadm default KubeProxyConfiguration: applied, refused, or warned -----------

KUBEADM_DEFAULT = Path(__file__).parent / "data" / "kubeadm" / "kube-proxy-config.conf"


def _leaf_paths(doc: Any, schema: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the fields a document (or, with doc=None, the schema) has, as FIELDS names them."""
    paths = []
    for key, spec in schema.items():
        if doc is not None and key not in doc:
            continue
        where = f"{prefix}.{key}" if prefix else key
        value = None if doc is None else doc[key]
        if isinstance(spec, dict) and (doc is None or isinstance(value, dict)):
            paths += _leaf_paths(value, spec, where)
        else:
            paths.append(where)
    return paths


def _with(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    copy = yaml.safe_load(yaml.safe_dump(doc))
    *parents, last = path.split(".")
    target = copy
    for part in parents:
        if target.get(part) is None:
            target[part] = {}
        target = target[part]
    target[last] = value
    return copy


def _load(tmp_path: Path, doc: dict[str, Any], name: str = "kube-proxy.yaml") -> tuple[dict[str, Any], list[str]]:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    warnings: list[str] = []
    return load_kube_proxy_configuration(str(path), warnings), warnings


def _warned(warnings: list[str]) -> list[str]:
    """The field each warning names (the text after the file name, before " = ")."""
    return [w.split(": ", 1)[1].split(" = ")[0] for w in warnings]


def test_every_upstream_field_has_a_decision() -> None:
    """FIELDS decides every field of the schema (upstream's v1alpha1), and only those."""
    assert set(FIELDS) == set(_leaf_paths(None, SCHEMA))
    for path, rule in FIELDS.items():
        assert rule.effect in (APPLIED, CHECKED, IGNORED), path
        assert rule.what and rule.example is not None, path
        assert rule.effect != IGNORED or rule.warn_if is not None, f"{path}: an ignored field must warn"


def kubeadm_default() -> dict[str, Any]:
    return yaml.safe_load(KUBEADM_DEFAULT.read_text())


def kubeadm_fields() -> list[str]:
    return _leaf_paths(kubeadm_default(), SCHEMA)


def test_kubeadm_default_loads_with_its_warnings(tmp_path: Path) -> None:
    """kubeadm's default file: what it sets is applied, and the fields whose unset value kube-proxy would act on
    (conntrack sysctls, localhost NodePorts, all local IPs for NodePorts, soft bind failures) warn, once each."""
    assert len(kubeadm_fields()) >= 50 and set(kubeadm_fields()) <= set(FIELDS)
    values, warnings = _load(tmp_path, kubeadm_default())
    assert values == {"kubeconfig": "/var/lib/kube-proxy/kubeconfig.conf", "cluster_cidrs": ("10.244.0.0/16",)}
    assert sorted(_warned(warnings)) == [
        "bindAddressHardFail", "conntrack.maxPerCore", "conntrack.tcpCloseWaitTimeout",
        "conntrack.tcpEstablishedTimeout", "iptables.localhostNodePorts", "nodePortAddresses"]
    assert all("\n" not in w for w in warnings)


@pytest.mark.parametrize("field", kubeadm_fields() + sorted(set(FIELDS) - set(kubeadm_fields())))
def test_each_field_takes_effect_is_refused_or_warns(tmp_path: Path, field: str) -> None:
    """Each field, set to a value that matters (its FIELDS example) in kubeadm's default file: an applied field
    changes the configuration, a checked one stops kproxy with one line naming it, an ignored one warns once."""
    rule = FIELDS[field]
    base_values, base_warnings = _load(tmp_path, kubeadm_default(), "base.yaml")
    doc = _with(kubeadm_default(), field, rule.example)
    if rule.effect == CHECKED:
        with pytest.raises(ConfigError) as info:
            _load(tmp_path, doc)
        assert field.rsplit(".", 1)[-1] in str(info.value) and "\n" not in str(info.value)
        return
    values, warnings = _load(tmp_path, doc)
    named = _warned(warnings)
    if rule.effect == APPLIED:
        assert values != base_values, f"{field}: {rule.example!r} took no effect"
        path = tmp_path / "kube-proxy.yaml"
        assert _config("--config", str(path)) != _config("--config", str(tmp_path / "base.yaml"))
        assert named.count(field) <= 1
    else:
        assert values == base_values, f"{field} is ignored, yet changed {values}"
        assert named.count(field) == 1, f"{field}: expected one warning, got {warnings}"
        assert set(named) - {field} <= set(_warned(base_warnings))


def test_explicit_zero_conntrack_values_match_kproxy(tmp_path: Path) -> None:
    """maxPerCore: 0 and 0s timeouts tell kube-proxy to leave the sysctls alone, which is what kproxy does: no warning."""
    doc = kubeadm_default()
    doc["conntrack"].update(maxPerCore=0, min=131072, tcpEstablishedTimeout="0s", tcpCloseWaitTimeout="0s")
    doc["iptables"]["localhostNodePorts"] = False
    doc["bindAddressHardFail"] = True
    doc["mode"] = "nftables"
    _, warnings = _load(tmp_path, doc)
    assert warnings == []


def test_nodeport_addresses_unset_is_primary_and_said_so(tmp_path: Path) -> None:
    """Unset nodePortAddresses means the primary IPs: warned in a file for iptables mode, said at startup always."""
    doc = kubeadm_default()
    doc["mode"] = "nftables"
    _, warnings = _load(tmp_path, doc)
    assert "nodePortAddresses" not in _warned(warnings)
    assert "primary IPs only" in _config().nodeport_summary()
    assert "10.0.0.0/8" in _config("--nodeport-addresses", "10.0.0.0/8").nodeport_summary()


def test_ipv6_bind_address_gives_upstreams_ipv6_defaults(tmp_path: Path) -> None:
    """bindAddress '::' makes the default addresses [::]:10256 and [::1]:10249; set addresses still win."""
    values, warnings = _load(tmp_path, {**kubeadm_default(), "bindAddress": "::", "mode": "nftables",
                                        "healthzBindAddress": "[::]:10300"})
    assert values["healthz_bind_address"] == "[::]:10300" and values["metrics_bind_address"] == "[::1]:10249"
    _, warnings = _load(tmp_path, {**kubeadm_default(), "bindAddress": "10.0.0.5"})
    assert "bindAddress" in _warned(warnings)


def test_masquerade_bit_other_than_14_is_refused(tmp_path: Path) -> None:
    """kproxy's mark is bit 14: 14 (or null) is accepted, another bit stops it, naming the field."""
    assert _load(tmp_path, _with(kubeadm_default(), "nftables.masqueradeBit", 14))[0]["cluster_cidrs"]
    with pytest.raises(ConfigError, match=r"iptables\.masqueradeBit: 13 is not supported"):
        _load(tmp_path, _with(kubeadm_default(), "iptables.masqueradeBit", 13))


def test_kubeadm_zero_values_mean_defaults(tmp_path: Path) -> None:
    """kubeadm's all-zero file ("", 0s, null) leaves every default in place."""
    assert load_kube_proxy_configuration(_file(tmp_path, KUBEADM_ZERO)) == {}
    assert _config("--config", _file(tmp_path, KUBEADM_ZERO)) == _config()


def test_verbosity_4_in_file_means_debug(tmp_path: Path) -> None:
    """logging.verbosity >= 4 (klog's debug level) gives log level debug."""
    path = _file(tmp_path, HEADER + "logging: {verbosity: 4}\n")
    assert _config("--config", path).log_level == "debug"


def test_flags_override_file(tmp_path: Path) -> None:
    """A flag given on the command line wins over the file; the others keep the file's values."""
    path = _file(tmp_path, FULL)
    config = _config(
        "--config", path,
        "--hostname-override", "node-z",
        "--cluster-cidr", "10.0.0.0/8",
        "--nodeport-addresses", "primary",
        "--masquerade-all=false",
        "--sync-period", "2m",
        "--metrics-bind-address", "127.0.0.1:0",
        "--kubeconfig", "/other",
        "--log-format", "text",
    )
    assert (config.node_name, config.cluster_cidrs, config.nodeport_addresses, config.masquerade_all) == (
        "node-z", ("10.0.0.0/8",), (), False)
    assert (config.sync_period, config.metrics_bind_address, config.kubeconfig, config.log_format) == (
        120.0, "127.0.0.1:0", "/other", "text")
    assert config.min_sync_period == 0.25 and config.healthz_bind_address == "0.0.0.0:10256"


def test_file_node_name_beats_node_name_env(tmp_path: Path) -> None:
    """hostnameOverride in the file wins over $NODE_NAME."""
    assert _config("--config", _file(tmp_path, HEADER + "hostnameOverride: from-file\n")).node_name == "from-file"


@pytest.mark.parametrize(
    "body, expected",
    [
        pytest.param("foo: 1\n", "unknown field 'foo'", id="unknown-top-level"),
        pytest.param("nftables:\n  masqueradAll: true\n",
                     "unknown field 'nftables.masqueradAll' (did you mean 'masqueradeAll'?)", id="typo-nested"),
        pytest.param("logging:\n  options:\n    json:\n      bufferSize: 1\n",
                     "unknown field 'logging.options.json.bufferSize'", id="unknown-deeply-nested"),
        pytest.param("logging:\n  vmodule: [{filePattern: x, level: 2}]\n",
                     "unknown field 'logging.vmodule[0].level'", id="unknown-in-list"),
        pytest.param("clusterCidr: 10.0.0.0/8\n", "(did you mean 'clusterCIDR'?)", id="wrong-case"),
        pytest.param("mode: iptables\n", "mode: 'iptables': kproxy is an nftables proxy", id="mode-iptables"),
        pytest.param("mode: ipvs\n", "mode: 'ipvs': kproxy is an nftables proxy", id="mode-ipvs"),
        pytest.param("nftables: {syncPeriod: 5x}\n", "nftables.syncPeriod: invalid duration '5x'", id="bad-duration"),
        pytest.param("nftables: {syncPeriod: 30}\n", "nftables.syncPeriod: expected a duration string",
                     id="duration-as-number"),
        pytest.param("nftables: {minSyncPeriod: -1s}\n", "nftables.minSyncPeriod: duration '-1s' must not be negative",
                     id="negative-duration"),
        pytest.param("conntrack: {tcpEstablishedTimeout: soon}\n", "conntrack.tcpEstablishedTimeout: invalid duration",
                     id="bad-unused-duration"),
        pytest.param("clusterCIDR: 10.244.0.0/33\n", "clusterCIDR: '10.244.0.0/33' is not a CIDR", id="bad-cidr"),
        pytest.param("clusterCIDR: 10.244.0.1\n", "clusterCIDR: '10.244.0.1' is not a CIDR", id="cidr-no-prefix"),
        pytest.param("nodePortAddresses: [10.0.0.0/8, nope]\n", "nodePortAddresses: 'nope' is not a CIDR",
                     id="bad-nodeport-cidr"),
        pytest.param("nodePortAddresses: 10.0.0.0/8\n", "nodePortAddresses: expected a list of strings",
                     id="nodeport-not-a-list"),
        pytest.param("nodePortAddresses: [primary, 10.0.0.0/8]\n", "either 'primary' or a list of CIDRs",
                     id="nodeport-primary-and-cidr"),
        pytest.param("nodePortAddresses: [localhost]\n", "never serves NodePorts on loopback", id="nodeport-localhost"),
        pytest.param("metricsBindAddress: 127.0.0.1\n", "metricsBindAddress: invalid address '127.0.0.1'",
                     id="bind-address-no-port"),
        pytest.param("healthzBindAddress: localhost:10256\n", "healthzBindAddress: invalid address 'localhost:10256'",
                     id="bind-address-hostname"),
        pytest.param("nftables: {masqueradeAll: 'yes please'}\n", "nftables.masqueradeAll: expected true or false",
                     id="wrong-type-bool"),
        pytest.param("hostnameOverride: 12345\n", "hostnameOverride: expected a string, got 12345",
                     id="wrong-type-str"),
        pytest.param("hostnameOverride: node_a\n", "hostnameOverride: 'node_a' is not a valid node name",
                     id="bad-node-name"),
        pytest.param("nftables: [1]\n", "nftables: expected a mapping of fields", id="struct-not-a-mapping"),
        pytest.param("iptables: {masqueradeBit: 32}\n", "iptables.masqueradeBit: 32 is out of range",
                     id="out-of-range"),
        pytest.param("oomScoreAdj: 1.5\n", "oomScoreAdj: expected an integer", id="float-for-int"),
        pytest.param("featureGates: {Foo: maybe}\n", "featureGates: 'Foo': expected true or false",
                     id="feature-gate-not-bool"),
        pytest.param("logging: {format: xml}\n", "logging.format: 'xml' is not a log format", id="bad-log-format"),
        pytest.param("detectLocalMode: Magic\n", "detectLocalMode: 'Magic' is not one of", id="bad-enum"),
        pytest.param("bindAddress: 1.2.3\n", "bindAddress: '1.2.3' is not an IP address", id="bad-bind-ip"),
    ],
)
def test_file_error(tmp_path: Path, body: str, expected: str) -> None:
    """A bad field gives a one-line ConfigError naming the file and the field path."""
    path = _file(tmp_path, HEADER + body)
    with pytest.raises(ConfigError) as info:
        load_kube_proxy_configuration(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message, message


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("kind: KubeProxyConfiguration\n", "apiVersion: missing", id="no-api-version"),
        pytest.param("apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n",
                     "apiVersion: 'kubeproxy.config.k8s.io/v1beta1' is not supported", id="bad-api-version"),
        pytest.param("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n",
                     "kind: 'KubeletConfiguration' is not supported", id="bad-kind"),
        pytest.param("", "the file is empty", id="empty"),
        pytest.param("- a\n- b\n", "expected a KubeProxyConfiguration", id="not-a-mapping"),
        pytest.param(HEADER + "nftables: {syncPeriod: 1s\n", "invalid YAML at line", id="broken-yaml"),
        pytest.param(HEADER + "mode: nftables\n\tbad: tab\n", "invalid YAML", id="tab-indent"),
    ],
)
def test_file_level_error(tmp_path: Path, text: str, expected: str) -> None:
    """A file that is not a KubeProxyConfiguration gives a one-line ConfigError naming the file."""
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_kube_proxy_configuration(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message, message


@pytest.mark.parametrize(
    "make, expected",
    [
        pytest.param(lambda tmp: str(tmp / "missing.yaml"), "cannot read: No such file or directory", id="missing"),
        pytest.param(lambda tmp: str(tmp), "cannot read: Is a directory", id="directory"),
    ],
)
def test_unreadable_file(tmp_path: Path, make: Any, expected: str) -> None:
    """An unreadable --config file is a ConfigError naming it."""
    path = make(tmp_path)
    with pytest.raises(ConfigError, match=f"^{path}: {expected}$"):
        _config("--config", path)


def test_file_without_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --config file that cannot be opened (EACCES, even as root here) is a ConfigError naming it."""
    path = _file(tmp_path, FULL)

    def denied(self: Path, *args: object, **kwargs: object) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ConfigError, match=f"^{path}: cannot read: Permission denied$"):
        _config("--config", path)


# --- merged values and flag errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, file_body, expected",
    [
        pytest.param(["--min-sync-period", "1m"], None,
                     "--min-sync-period (60s) must not exceed the default sync period (30s)", id="min-over-default"),
        pytest.param(["--min-sync-period", "10s", "--sync-period", "5s"], None,
                     "--min-sync-period (10s) must not exceed --sync-period (5s)", id="min-over-sync-flags"),
        pytest.param([], "nftables: {minSyncPeriod: 10s, syncPeriod: 5s}\n",
                     "nftables.minSyncPeriod (10s) must not exceed", id="min-over-sync-file"),
        pytest.param(["--sync-period", "5s"], "nftables: {minSyncPeriod: 10s}\n",
                     "nftables.minSyncPeriod (10s) must not exceed --sync-period (5s)", id="min-file-over-sync-flag"),
        pytest.param(["--sync-period", "0s"], None, "--sync-period: must be greater than 0, got 0s", id="sync-zero"),
        pytest.param(["--min-sync-period=-1s"], None, "--min-sync-period: must not be negative", id="min-negative"),
        pytest.param(["--sync-period", "30"], None, "--sync-period: invalid duration '30'", id="sync-no-unit"),
        pytest.param(["--cluster-cidr", "10.0.0.0/8,banana"], None, "--cluster-cidr: 'banana' is not a CIDR",
                     id="bad-cluster-cidr"),
        pytest.param(["--nodeport-addresses", "10.0.0.0/99"], None, "--nodeport-addresses: '10.0.0.0/99' is not a CIDR",
                     id="bad-nodeport-addresses"),
        pytest.param(["--metrics-bind-address", "::1:10249"], None,
                     "--metrics-bind-address: invalid address '::1:10249': put an IPv6 address in brackets",
                     id="bad-metrics-bind-address"),
        pytest.param(["--healthz-bind-address", "0.0.0.0:99999"], None,
                     "--healthz-bind-address: invalid address '0.0.0.0:99999': port '99999'", id="bad-port"),
        pytest.param(["--masquerade-all=maybe"], None, "--masquerade-all: 'maybe' is not a boolean", id="bad-bool"),
        pytest.param(["--log-format", "xml"], None, "--log-format: 'xml' is not a log format", id="bad-log-format"),
        pytest.param(["--service-metrics", "some"], None,
                     "--service-metrics: 'some' is not one of none, annotated, all", id="bad-service-metrics"),
        pytest.param(["--service-metrics="], None, "--service-metrics: empty value", id="empty-service-metrics"),
        pytest.param(["--hostname-override", "Not A Name"], None, "--hostname-override: 'Not A Name' is not a valid",
                     id="bad-hostname-override"),
        pytest.param(["--kubeconfig="], None, "--kubeconfig: empty value", id="empty-kubeconfig"),
    ],
)
def test_config_error(tmp_path: Path, argv: list[str], file_body: str | None, expected: str) -> None:
    """A bad flag, or a bad combination of flag and file values, is a one-line ConfigError naming them."""
    if file_body is not None:
        argv = ["--config", _file(tmp_path, HEADER + file_body), *argv]
    with pytest.raises(ConfigError) as info:
        _config(*argv)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


# --- the small parsers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        pytest.param("1s", 1.0, id="seconds"),
        pytest.param("100ms", 0.1, id="milliseconds"),
        pytest.param("1m30s", 90.0, id="compound"),
        pytest.param("1h", 3600.0, id="hours"),
        pytest.param("0.5s", 0.5, id="fraction"),
        pytest.param(".5s", 0.5, id="leading-dot"),
        pytest.param("1.s", 1.0, id="trailing-dot"),
        pytest.param("2h45m0.5s", 9900.5, id="hours-minutes-fraction"),
        pytest.param("1500us", 0.0015, id="microseconds"),
        pytest.param("1500\u00b5s", 0.0015, id="micro-sign"),
        pytest.param("250ns", 250e-9, id="nanoseconds"),
        pytest.param("0", 0.0, id="bare-zero"),
        pytest.param("0s", 0.0, id="zero"),
        pytest.param("+5s", 5.0, id="plus"),
        pytest.param("-1.5h", -5400.0, id="negative"),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Go duration syntax, in seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("1", id="no-unit"),
        pytest.param("s", id="no-number"),
        pytest.param("1d", id="days"),
        pytest.param("1 s", id="space"),
        pytest.param(" 1s", id="leading-space"),
        pytest.param("1.5.5s", id="two-dots"),
        pytest.param("1e3s", id="exponent"),
        pytest.param("-", id="sign-only"),
        pytest.param("1sm", id="unit-without-number"),
        pytest.param("3000000h", id="overflow"),
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    """Anything Go's time.ParseDuration rejects is a ConfigError."""
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("127.0.0.1:10249", ("127.0.0.1", 10249), id="ipv4"),
        pytest.param("0.0.0.0:10256", ("0.0.0.0", 10256), id="ipv4-any"),
        pytest.param("[::1]:10249", ("::1", 10249), id="ipv6"),
        pytest.param("[::]:10256", ("::", 10256), id="ipv6-any"),
        pytest.param("[fd00:0::0001]:80", ("fd00::1", 80), id="ipv6-canonical"),
        pytest.param(":10249", ("", 10249), id="empty-host"),
        pytest.param("127.0.0.1:0", ("127.0.0.1", 0), id="port-0"),
        pytest.param(":65535", ("", 65535), id="max-port"),
    ],
)
def test_parse_bind_address(text: str, expected: tuple[str, int]) -> None:
    """HOST:PORT, [IPv6]:PORT and :PORT."""
    assert parse_bind_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("127.0.0.1", id="no-port"),
        pytest.param("10249", id="port-only-no-colon"),
        pytest.param("127.0.0.1:", id="empty-port"),
        pytest.param("127.0.0.1:65536", id="port-too-big"),
        pytest.param("127.0.0.1:-1", id="negative-port"),
        pytest.param("127.0.0.1:http", id="named-port"),
        pytest.param("localhost:10249", id="hostname"),
        pytest.param("::1:10249", id="ipv6-without-brackets"),
        pytest.param("[::1]10249", id="no-colon-after-bracket"),
        pytest.param("[::1", id="unclosed-bracket"),
        pytest.param("[127.0.0.1]:80", id="ipv4-in-brackets"),
        pytest.param("999.0.0.1:80", id="bad-ipv4"),
    ],
)
def test_parse_bind_address_rejects(text: str) -> None:
    """A bind address that is not an IP literal with a port from 0 to 65535 is a ConfigError."""
    with pytest.raises(ConfigError):
        parse_bind_address(text)


@pytest.mark.parametrize(
    "parse, text, expected",
    [
        pytest.param(parse_cidrs, "10.244.0.0/16", ("10.244.0.0/16",), id="cidr"),
        pytest.param(parse_cidrs, "10.244.1.1/16,fd00:244::1/48", ("10.244.0.0/16", "fd00:244::/48"), id="canonical"),
        pytest.param(parse_cidrs, "", (), id="cidrs-empty"),
        pytest.param(parse_cidrs, "10.0.0.0/8,", ("10.0.0.0/8",), id="trailing-comma"),
        pytest.param(parse_nodeport_addresses, "primary", (), id="primary"),
        pytest.param(parse_nodeport_addresses, "", (), id="nodeport-empty"),
        pytest.param(parse_nodeport_addresses, "all", ("0.0.0.0/0", "::/0"), id="all"),
        pytest.param(parse_nodeport_addresses, "10.0.0.0/8,fd00::/64", ("10.0.0.0/8", "fd00::/64"), id="list"),
    ],
)
def test_cidr_parsers(parse: Any, text: str, expected: tuple[str, ...]) -> None:
    """parse_cidrs and parse_nodeport_addresses, the validators cli.py can share."""
    assert parse(text) == expected


@pytest.mark.parametrize("mode", ["NodeCIDR", "BridgeInterface", "InterfaceNamePrefix"])
def test_unsupported_local_detection_is_refused(tmp_path: Path, mode: str) -> None:
    """A detectLocalMode kproxy does not implement stops it at startup, naming the field (not a silent difference)."""
    path = tmp_path / "config.yaml"
    path.write_text(f"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\ndetectLocalMode: {mode}\n")
    with pytest.raises(ConfigError, match=f"detectLocalMode: '{mode}' is not supported"):
        load_kube_proxy_configuration(str(path))


# --- clientConnection.kubeconfig: kube-proxy's, copied with its file, names a file kproxy's pod lacks --------


def test_kubeconfig_from_the_file_that_does_not_exist_is_warned(tmp_path: Path) -> None:
    """kubeadm's clientConnection.kubeconfig copied into kproxy's file: one warning naming the field and the path
    (so --dry-run, the migration's pre-check, shows it); an existing file or the --kubeconfig flag: none."""
    missing = str(tmp_path / "kubeconfig.conf")
    path = _file(tmp_path, HEADER + f"clientConnection: {{kubeconfig: {missing}}}\n")
    config = _config("--config", path)
    (warning,) = config.warnings
    assert f"{path}: clientConnection.kubeconfig" in warning and missing in warning and "\n" not in warning
    assert config.kubeconfig_source == f"{path}: clientConnection.kubeconfig"
    assert _config("--config", path, "--kubeconfig", missing).warnings == ()
    Path(missing).write_text("")
    assert _config("--config", path).warnings == ()


def test_daemon_names_the_kubeconfig_field_and_path_when_it_cannot_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Daemon mode with a missing clientConnection.kubeconfig exits 1, before touching netfilter, with one line
    naming the path, the file and field it came from, and what to do."""
    from kproxy.cli import main

    missing = str(tmp_path / "kubeconfig.conf")
    path = _file(tmp_path, HEADER + f"clientConnection: {{kubeconfig: {missing}}}\n")
    assert main(["--config", path, "--hostname-override", "node-a"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("kproxy: error: cannot configure the Kubernetes client from ")
    assert f"{missing} ({path}: clientConnection.kubeconfig): no such file" in error
    assert "remove clientConnection.kubeconfig" in error
    assert main(["--kubeconfig", missing, "--hostname-override", "node-a"]) == 1
    assert f"{missing} (--kubeconfig): no such file" in capsys.readouterr().err
