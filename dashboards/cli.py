"""``rackscope dashboards`` (build, check and push the dashboards and rules) and ``rackscope baseline``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.cli import HelpFormatter

    p = sub.add_parser(
        "dashboards",
        help="build, check or push the Grafana dashboards and Prometheus rules",
        formatter_class=HelpFormatter,
        description=(
            "build  regenerate dashboards/generated/*.json, the rule file, Grafana provisioning and the\n"
            "       Kubernetes ConfigMap and PrometheusRule from dashboards/*.py\n"
            "check  exit 1 when a committed generated file differs from what build would write\n"
            "push   upload the dashboards and data sources to a running Grafana"
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (("build", "regenerate every generated file"),
                            ("check", "fail when a generated file is out of date")):
        a = actions.add_parser(name, help=help_text, formatter_class=HelpFormatter)
        a.add_argument("--root", type=Path, default=None,
                       help="source tree to write or check (default: the tree this package is in)")
        a.set_defaults(func=run)
    push = actions.add_parser("push", help="upload dashboards and data sources to Grafana",
                              formatter_class=HelpFormatter)
    push.add_argument("--grafana-url", required=True, help="Grafana base URL, e.g. http://localhost:3000")
    push.add_argument("--grafana-token", default=None,
                      help="service-account token (default: $GRAFANA_TOKEN; else credentials in the URL)")
    push.add_argument("--prometheus-url", default="http://prometheus:9090",
                      help="Prometheus URL as Grafana's server reaches it ('' to leave data sources alone)")
    push.add_argument("--alertmanager-url", default="http://alertmanager:9093",
                      help="Alertmanager URL as Grafana's server reaches it ('' to skip)")
    push.add_argument("--folder", default="rackscope", help="folder uid and title for the dashboards")
    push.add_argument("--wait", dest="wait_s", type=float, default=60.0,
                      help="seconds to wait for /api/health to answer ok")
    push.add_argument("--timeout", dest="timeout_s", type=float, default=10.0, help="HTTP timeout per request, seconds")
    push.set_defaults(func=run)


    _register_baseline(sub)  # `rackscope baseline set|show`: the baselines the regression alerts read


def run(args: argparse.Namespace) -> int:
    if args.action == "push":
        return _push(args)
    from rackscope.errors import ConfigError

    try:
        from rackscope.dashboards import build
    except ImportError as exc:  # PyYAML and grafana-foundation-sdk come with the dev extra
        raise ConfigError(f"{exc}: building dashboards needs the dev extra: pip install -e '.[dev]'") from exc
    root = (args.root or build.default_root()).resolve()
    if args.action == "build":
        written = build.build(root)
        for rel in written:
            print(f"wrote {rel}")
        print(f"{len(written)} file(s) changed" if written else "everything up to date")
        return 0
    stale = build.check(root)
    for rel in stale:
        print(f"out of date: {rel}", file=sys.stderr)
    if stale:
        print("run `rackscope dashboards build` and commit the result", file=sys.stderr)
        return 1
    print("generated dashboards, rules and manifests are up to date")
    return 0


def _push(args: argparse.Namespace) -> int:
    from rackscope.errors import ConfigError

    if args.wait_s < 0 or args.timeout_s <= 0:
        raise ConfigError("--wait must be >= 0 and --timeout > 0")
    from rackscope.dashboards.grafana_api import Grafana
    from rackscope.dashboards.push import PushOptions, push

    token = args.grafana_token or os.environ.get("GRAFANA_TOKEN") or None
    grafana = Grafana(args.grafana_url, token, timeout_s=args.timeout_s)
    options = PushOptions(
        prometheus_url=args.prometheus_url or None,
        alertmanager_url=args.alertmanager_url or None,
        folder_uid=args.folder,
        folder_title=args.folder,
        wait_s=args.wait_s,
    )
    count = push(grafana, options, print)
    print(f"pushed {count} dashboard(s) to {args.grafana_url}")
    return 0


def _register_baseline(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rackscope.cli import HelpFormatter
    from rackscope.dashboards import baselines

    p = sub.add_parser(
        "baseline",
        help="set or show the per-rack baselines the regression alerts compare against",
        formatter_class=HelpFormatter,
        description=(
            "set   take a rack's expected output tokens/s and tokens per joule from a measured run or rack\n"
            "      record, write dashboards/rules/baselines.yml and regenerate the Kubernetes PrometheusRule\n"
            "show  list the baselines: rack, tokens/s, tokens/J, source record, run and when it was measured\n\n"
            "Exit status: 0 done, 2 bad flags, an unreadable or incomplete record, or a baselines file\n"
            "that is not as rackscope writes it."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = actions.add_parser("set", help="set a rack's baseline from a run or rack record", formatter_class=HelpFormatter)
    s.add_argument("record", metavar="RECORD", help="a run record (rackscope.run/1) or a rack record (rack.json)")
    s.add_argument("--rack", default=None, help="rack the baseline is for; without it, the rack the record names")
    s.add_argument("--allow-partial", action="store_true", help="accept a record with complete: false")
    show = actions.add_parser("show", help="list the baselines", formatter_class=HelpFormatter)
    show.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    for a in (s, show):
        a.add_argument("--root", type=Path, default=None,
                       help="source tree holding dashboards/rules; without it, the tree this package is in")
        a.set_defaults(func=baselines.run)
