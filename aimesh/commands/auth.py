"""``aimesh auth``: the mesh's identities on the bus, without talking to it: seeds and the
server's authorization block for an external NATS (``init``), or each role's grants."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aimesh.commands.mesh import EXIT_OK, Subparsers, mesh_names


def add_parser(subparsers: Subparsers) -> None:
    auth = subparsers.add_parser(
        "auth", help="identities on the bus: `auth init DIR` for an external NATS, `auth permissions`"
    )
    auth_sub = auth.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = auth_sub.add_parser(
        "init",
        help="write a seed per role, the server's authorization block (nats-server.conf) and the cluster's "
        "route secret and CA into DIR (what is there is kept)",
    )
    init.add_argument(
        "dir", help="where to write <role>.nk, cluster.secret, cluster-ca.key (0600), nats-server.conf, cluster-ca.pem"
    )
    init.add_argument("--prefix", help="the mesh's subject prefix (default: aimesh)")
    init.add_argument("--rotate", action="append", default=[], metavar="ROLE", help="new seed for ROLE (repeatable)")
    perms = auth_sub.add_parser("permissions", help="print each role's publish/subscribe grants")
    perms.add_argument("--role", help="only this role")
    perms.add_argument("--prefix", help="the mesh's subject prefix (default: aimesh)")
    perms.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    return permissions(args) if args.action == "permissions" else init(args)


def permissions(args: argparse.Namespace) -> int:
    from shared import auth

    names = mesh_names(args)
    roles = [auth.check_role(args.role)] if args.role else list(auth.ROLES)
    grants = {role: auth.role_grant(names, role).to_server() for role in roles}
    if args.json:
        print(json.dumps(grants, indent=2))
    else:
        for role, grant in grants.items():
            print(f"{role}:")
            for verb in ("publish", "subscribe"):
                rules = grant[verb]
                assert isinstance(rules, dict)
                print(f"  {verb}: {', '.join(rules.get('allow', [])) or 'nothing'}")
                if rules.get("deny") and rules.get("allow"):
                    print(f"  {verb}, except: {', '.join(rules['deny'])}")
            print(f"  replies to requests: {'yes' if 'allow_responses' in grant else 'no'}")
    return EXIT_OK


def init(args: argparse.Namespace) -> int:
    from shared import auth
    from shared.cluster import CLUSTER_CA_KEY_FILE, ROUTE_SECRET_FILE, ensure_cluster_ca, route_secret

    names = mesh_names(args)
    for role in args.rotate:
        auth.check_role(role)
    directory = Path(args.dir)
    keys = auth.ensure_seeds(directory, rotate=args.rotate)
    config = directory / "nats-server.conf"
    auth.write_private(config, auth.server_config(names, keys).encode())
    route_secret(directory)  # the routes' password for `aimesh up --cluster` (docs/cluster.md)
    ca = ensure_cluster_ca(directory)  # the routes' TLS: kept when there, added when not
    print(f"wrote {len(keys)} identities ({', '.join(keys)}) as {directory}/<role>.nk (0600)")
    print(f"wrote the server's authorization block to {config}: `include` it in every server's config")
    print(f"the cluster routes' secret is {directory}/{ROUTE_SECRET_FILE}, their CA {ca} (key {CLUSTER_CA_KEY_FILE})")
    print("copy the folder to every host")
    if args.rotate:
        print(f"rotated {', '.join(args.rotate)}: reload the servers (nats-server --signal reload), then restart")
        print("the processes of those roles with the new seeds")
    return EXIT_OK
